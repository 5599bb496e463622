"""`apply` on a sharded safetensors folder: streamed shard by shard, equal bit for bit to the in-memory edit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import all_tensors
from safetensors.torch import load_file, save_file

from abliterate.apply import apply as apply_edit
from abliterate.output.record import load_record
from abliterate.tiny import recorded_edit, tiny_model, tiny_tokenizer


def sharded_checkpoint(folder, model_type: str, **overrides):
    """A tiny float32 model saved in many small shards, with a tokenizer."""
    model = tiny_model(model_type, dtype=torch.float32, **overrides)
    model.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


CASES = [
    ("llama", {"tie_word_embeddings": True}, 1.0, 0, "auto"),  # tied: the head keeps the original embedding
    ("qwen2", {}, 0.7, 1, "auto"),
    ("gpt2", {}, 1.0, 0, "auto"),  # Conv1D writers with biases, two embeddings, tied head
    ("gemma2", {}, -1.0, 0, "float64"),  # post-norm writers: gain-scaled directions from norms in other shards
]


@pytest.mark.parametrize(("model_type", "overrides", "scale", "start_layer", "dtype"), CASES)
def test_streamed_apply_equals_in_memory_bit_for_bit(tmp_path, model_type, overrides, scale, start_layer, dtype):
    source = sharded_checkpoint(tmp_path / "source", model_type, **overrides)
    shards = list(source.glob("model-*.safetensors"))
    assert len(shards) >= 8 and (source / "model.safetensors.index.json").is_file()
    edit = recorded_edit(tmp_path / "run", 64, scale, start_layer)
    memory = apply_edit(str(source), str(edit), str(tmp_path / "memory"), dtype=dtype, in_memory=True)
    streamed = apply_edit(str(source), str(edit), str(tmp_path / "streamed"), dtype=dtype)

    assert sorted(p.name for p in streamed.glob("model-*.safetensors")) == sorted(p.name for p in shards)
    original, expected, got = all_tensors(source), all_tensors(memory), all_tensors(streamed)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    changed = [n for n in original if not torch.equal(original[n].to(expected[n].dtype), expected[n])]
    record = json.loads((streamed / "abliteration.json").read_text())
    assert sorted(changed) == sorted(record["edit"]["edited_tensors"])
    assert len(changed) >= 4
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((memory / name).read_text()), name
    assert json.loads((streamed / "config.json").read_text()).get("tie_word_embeddings") is False
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for name in ("tokenizer.json", "chat_template.jinja", "directions.safetensors", "README.md"):
        assert (streamed / name).is_file(), name


def test_single_file_stream_writes_the_same_bytes_as_save_pretrained(tmp_path):
    source = tmp_path / "source"
    tiny_model("llama", dtype=torch.float32).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    edit = recorded_edit(tmp_path / "run", 64)
    memory = apply_edit(str(source), str(edit), str(tmp_path / "memory"), in_memory=True)
    streamed = apply_edit(str(source), str(edit), str(tmp_path / "streamed"))
    assert (streamed / "model.safetensors").read_bytes() == (memory / "model.safetensors").read_bytes()


def test_renamed_checkpoint_falls_back_to_loading(tmp_path):
    from rich.console import Console

    source = sharded_checkpoint(tmp_path / "source", "llama")
    index_file = source / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(index["weight_map"])[0]
    shard = source / index["weight_map"][first]
    tensors = load_file(str(shard))
    tensors["model." + first] = tensors.pop(first)  # a name only transformers' key mapping would resolve
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["model." + first] = index["weight_map"].pop(first)
    index_file.write_text(json.dumps(index))
    edit = recorded_edit(tmp_path / "run", 64)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    apply_edit(str(source), str(edit), str(tmp_path / "out"), console=console)
    console.file.close()
    log = (tmp_path / "log.txt").read_text()
    assert "loading the whole model" in log and "differ from the model's" in log
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_wrong_hidden_size_is_one_clear_error(tmp_path):
    from abliterate.errors import AbliterateError

    source = sharded_checkpoint(tmp_path / "source", "llama")
    edit = recorded_edit(tmp_path / "run", 32)
    with pytest.raises(AbliterateError, match="hidden size"):
        apply_edit(str(source), str(edit), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_streamed_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    from abliterate.architectures import architecture_for
    from abliterate.edit import EditParams, orthogonalize

    source = tmp_path / "source"
    tiny_model("llama", dtype=torch.bfloat16, tie_word_embeddings=True).save_pretrained(source, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(source)
    edit = recorded_edit(tmp_path / "run", 64, 0.8)
    streamed = all_tensors(apply_edit(str(source), str(edit), str(tmp_path / "streamed")))
    # The reference: the bfloat16 source edited in float64 and rounded once back to bfloat16, never through
    # the CPU's float32 compute dtype.
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    orthogonalize(reference, architecture_for(reference), load_file(str(edit.parent / "directions.safetensors"))["direction"],
                  EditParams(0.8))  # fmt: skip
    expected = reference.state_dict()
    assert set(streamed) == set(expected)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, expected[k]) for k, t in streamed.items())


def test_a_profiled_edit_streams_bit_for_bit_as_in_memory(tmp_path):
    from abliterate.edit import EditParams, Profile

    source = tmp_path / "source"
    tiny_model("qwen2", dtype=torch.float32).save_pretrained(source, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(source)
    params = EditParams(attention=Profile(0.9, 1.0, 1.0, 0.4), mlp=Profile(0.6, 2.0, 0.0), embeddings=False)
    edit = recorded_edit(tmp_path / "run", 64, params=params)
    memory = apply_edit(str(source), str(edit), str(tmp_path / "memory"), in_memory=True)
    streamed = apply_edit(str(source), str(edit), str(tmp_path / "streamed"))
    a, b = all_tensors(memory), all_tensors(streamed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    original = all_tensors(source)
    changed = sorted(k for k in a if not torch.equal(a[k], original[k]))
    assert changed == sorted(json.loads((streamed / "abliteration.json").read_text())["edit"]["edited_tensors"])
    assert "model.embed_tokens.weight" not in changed and "model.layers.1.mlp.down_proj.weight" not in changed
    assert "model.layers.0.self_attn.o_proj.weight" in changed and "model.layers.2.mlp.down_proj.weight" in changed
    assert load_record(streamed).edit.params == params  # the record keeps the whole edit
