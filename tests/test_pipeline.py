"""A whole run on a tiny saved model: every artifact exists, reloads and holds the edit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAST, check_run_folder, check_saved_weights, run_cli
from safetensors.torch import load_file

from abliterate.tiny import recorded_edit


def test_tiny_run_end_to_end(tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, env={"ABLITERATE_CACHE": str(tmp_path / "c1")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "before / after" in r.stderr and "candidate directions" in r.stderr
    record, _ = check_run_folder(out, tiny_checkpoint)
    assert record["model"]["kind"] == "folder"
    assert record["settings"]["n_train"] == 8
    metrics = record["metrics"]
    assert metrics["harmful_refusal"]["before"]["n"] == 4
    assert metrics["kl_first_token_harmless"]["n"] == 4
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert len(evaluation["harmful"]) == 4 and {"before", "after", "before_label"} <= set(evaluation["harmful"][0])
    # The same seed, with an empty cache, chooses the same direction and writes bit-identical weights.
    again = tmp_path / "again"
    r = run_cli(
        "run",
        str(tiny_checkpoint),
        "--out",
        str(again),
        *FAST,
        "--no-eval",
        env={"ABLITERATE_CACHE": str(tmp_path / "c2")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stderr
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # A rerun with the same cache resumes the collect and select stages and gives the same weights.
    third = tmp_path / "third"
    r = run_cli(
        "run",
        str(tiny_checkpoint),
        "--out",
        str(third),
        *FAST,
        "--no-eval",
        env={"ABLITERATE_CACHE": str(tmp_path / "c2")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "collect residual means: resumed" in r.stderr and "selection: resumed" in r.stderr
    assert (third / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((third / "abliteration.json").read_text())["selection"] == record["selection"]


def test_apply_reproduces_a_run_bit_for_bit(tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval", "--layer", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    applied = tmp_path / "applied"
    r = run_cli("apply", str(tiny_checkpoint), "--edit", str(out / "abliteration.json"), "--out", str(applied))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (applied / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert "re-applied" in (applied / "README.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = run_cli("apply", str(tiny_checkpoint), "--edit", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "not a usable run record" in r.stderr and not (tmp_path / "x").exists()


def test_norm_preserving_run_saves_lengths_and_reapplies(tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval", "--layer", "1", "--norm-preserving")
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "abliteration.json").read_text())
    assert record["edit"]["norm_preserving"] is True and record["settings"]["norm_preserving"] is True
    card = (out / "README.md").read_text()
    assert "norm-preserving: every vector" in card and "--layer 1 --seed 0 --norm-preserving" in card
    saved, source = load_file(str(out / "model.safetensors")), load_file(str(tiny_checkpoint / "model.safetensors"))
    direction = load_file(str(out / "directions.safetensors"))["direction"].double()
    for name in record["edit"]["edited_tensors"]:
        axis = 1 if "embed" in name else 0  # llama: embedding rows, Linear columns
        new, old = saved[name].double(), source[name].double()
        torch.testing.assert_close(new.norm(dim=axis), old.norm(dim=axis), rtol=1e-6, atol=1e-7)  # float32 storage
        if record["edit"]["scale"] == 1.0 and "layernorm" not in name:
            u = direction / direction.norm()
            assert torch.tensordot(new, u, dims=([axis], [0])).abs().max() < 1e-4
    assert not torch.equal(saved[record["edit"]["edited_tensors"][-1]], source[record["edit"]["edited_tensors"][-1]])
    # apply (streamed, shard by shard) re-applies it bit for bit; an adapter cannot express it.
    r = run_cli(
        "apply", str(tiny_checkpoint), "--edit", str(out / "abliteration.json"), "--out", str(tmp_path / "again")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    r = run_cli("export-adapter", str(out), "--base", str(tiny_checkpoint), "--out", str(tmp_path / "lora"))
    assert r.returncode == 2 and "norm-preserving" in r.stderr and not (tmp_path / "lora").exists()


def test_induce_strengthens_the_direction(tmp_path, tiny_checkpoint):
    out = tmp_path / "induced"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval", "--induce", "--max-kl", "100")
    assert r.returncode == 0, r.stderr[-3000:]
    record, _ = check_run_folder(out, tiny_checkpoint)  # the saved model equals the original under induction hooks
    assert record["edit"]["kind"] == "induce" and record["edit"]["scale"] < 0
    assert record["settings"]["induce"] is True
    card = (out / "README.md").read_text()
    assert "refusal-induced" in card and "amplified in" in card
    assert "refuse more of everything" in card and "removes a safeguard" not in card
    assert " --induce" in card and "--norm-preserving" not in card


def test_in_memory_apply_saves_in_the_checkpoints_own_dtype(tmp_path, tiny_checkpoint):
    from abliterate.tiny import save_tiny_checkpoint

    bf16 = save_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    run = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(run), *FAST, "--no-eval", "--layer", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "applied"
    r = run_cli(
        "apply", str(bf16), "--edit", str(run / "abliteration.json"), "--out", str(out), "--in-memory",
        "--dtype", "float32",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # --dtype float32 asks for float32 compute and output; the default keeps the source's bfloat16.
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    out2 = tmp_path / "applied2"
    r = run_cli("apply", str(bf16), "--edit", str(run / "abliteration.json"), "--out", str(out2), "--in-memory")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {t.dtype for t in load_file(str(out2 / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out2 / "config.json").read_text())["dtype"] == "bfloat16"


def test_saved_weight_check_holds_a_partial_edit_and_catches_a_wrong_one(tmp_path, tiny_checkpoint):
    # A partial edit from layer 1 (the case the full-strength residual check never saw): the check passes
    # on what apply saved, and fails once the record claims another strength or start layer.
    edit = recorded_edit(tmp_path / "edit", 64, scale=0.6, start_layer=1)
    out = tmp_path / "applied"
    r = run_cli("apply", str(tiny_checkpoint), "--edit", str(edit), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "abliteration.json").read_text())
    direction = load_file(str(out / "directions.safetensors"))["direction"]
    check_saved_weights(out, tiny_checkpoint, record, direction)
    for wrong in ({"scale": 1.0}, {"start_layer": 0}, {"start_layer": 2}):
        with pytest.raises(AssertionError):
            check_saved_weights(out, tiny_checkpoint, {**record, "edit": {**record["edit"], **wrong}}, direction)
