"""export-adapter: PeftModel.from_pretrained(base, adapter) reproduces the orthogonalized model."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from abliterate.architectures import architecture_for
from abliterate.edit import EditParams, Profile, orthogonalize
from abliterate.errors import AbliterateError
from abliterate.export.adapter import build, export_adapter
from abliterate.tiny import VOCAB, recorded_edit, save_tiny_checkpoint, tiny_model


def load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


CASES = [
    ("llama", {"tie_word_embeddings": False}, EditParams()),
    ("llama", {"tie_word_embeddings": True}, EditParams()),  # the head keeps the original embedding
    ("qwen2", {}, EditParams(0.7, 1)),
    ("gpt2", {}, EditParams()),  # Conv1D, biases (lora_bias), two embeddings, tied head
    ("gemma2", {}, EditParams(-1.0)),  # post-norm writers, induced
    ("mixtral", {}, EditParams()),  # fused experts via target_parameters
    # a searched edit: per-layer strengths for attention and experts, each writer its own
    ("mixtral", {}, EditParams(attention=Profile(0.8, 1.0, 1.0, 0.3), mlp=Profile(0.5, 2.0, 1.0), embeddings=True)),
]


@pytest.mark.parametrize(("model_type", "overrides", "params"), CASES)
def test_adapter_reproduces_the_edited_model(tmp_path, model_type, overrides, params):
    source = save_tiny_checkpoint(tmp_path / "base", model_type, **overrides)
    edit = recorded_edit(tmp_path / "run", 64, params=params)
    out = export_adapter(str(edit.parent), str(source), str(tmp_path / "adapter"))

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 1
    weights = load_file(str(out / "adapter_model.safetensors"))
    factors = [t for n, t in weights.items() if ("lora_A" in n or "lora_embedding_A" in n) and "experts" not in n]
    assert factors and all(t.shape[0] == 1 for t in factors)  # rank 1 per edited matrix
    assert json.loads((out / "abliteration.json").read_text())["adapter"]["max_abs_weight_error"] < 1e-6

    edited = load(source)
    orthogonalize(edited, architecture_for(edited), load_file(str(edit.parent / "directions.safetensors"))["direction"],
                  params)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(load(source), str(out)).eval()
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got, original = (m(input_ids=ids).logits for m in (edited, adapted, load(source)))
    assert (expected - original).abs().max() > 1e-2  # the edit matters, so matching it means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = adapted.merge_and_unload().state_dict()
    for name, tensor in edited.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_gpt_oss_expert_biases_are_refused_by_name():
    model = tiny_model("gpt_oss", dtype=torch.float32)
    with pytest.raises(AbliterateError, match="gpt_oss.*down_proj_bias.*abliterate apply"):
        build(model, architecture_for(model), torch.randn(64, dtype=torch.float64), EditParams())


def test_a_non_projection_edit_is_refused(tmp_path, tiny_checkpoint):
    edit = recorded_edit(tmp_path / "run", 64)
    record = json.loads(edit.read_text())
    record["edit"]["kind"] = "norm_preserving"
    edit.write_text(json.dumps(record))
    with pytest.raises(AbliterateError, match="unknown edit kind 'norm_preserving'"):  # the record refuses it
        export_adapter(str(edit.parent), str(tiny_checkpoint), str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_cli_export_adapter(tmp_path, tiny_checkpoint, capsys):
    from abliterate.cli import main

    edit = recorded_edit(tmp_path / "run", 64)
    assert main(["export-adapter", str(edit.parent), "--base", str(tiny_checkpoint), "--out", str(tmp_path / "a")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not private
    code = main(
        ["export-adapter", str(tmp_path / "nowhere"), "--base", str(tiny_checkpoint), "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and "does not exist; pass the --out folder of a finished run" in err and not (tmp_path / "b").exists()
    )
