"""The ablation edit removes the direction everywhere; hooks and weights agree; saves reload."""

from __future__ import annotations

import pytest
import torch
from helpers import residual_streams

from abliterate.architectures import architecture_for
from abliterate.edit import EditParams, ablation, orthogonalize, unit
from abliterate.tiny import VOCAB, tiny_model

TYPES = ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2"]


@pytest.mark.parametrize("model_type", TYPES)
def test_weight_edit_removes_component_at_every_layer(model_type, rng):
    model = tiny_model(model_type)
    arch = architecture_for(model)
    ids = torch.randint(3, VOCAB, (2, 12), generator=rng)
    r = unit(torch.randn(64, generator=rng, dtype=torch.float64))
    before = residual_streams(model, arch, ids)
    assert max((h @ r).abs().max() / h.norm(dim=-1).max() for h in before) > 1e-3  # the check has teeth
    orthogonalize(model, arch, r)
    for h in residual_streams(model, arch, ids):
        assert ((h @ r).abs() / h.norm(dim=-1)).max() < 1e-5


PARAMS = [EditParams(), EditParams(scale=0.7, start_layer=1), EditParams(scale=-0.5)]


@pytest.mark.parametrize("params", PARAMS, ids=["full", "partial-from-1", "induce"])
@pytest.mark.parametrize("model_type", TYPES)
def test_hooks_equal_weight_edit_and_restore(model_type, params, rng):
    model = tiny_model(model_type)
    arch = architecture_for(model)
    ids = torch.randint(3, VOCAB, (2, 10), generator=rng)
    r = torch.randn(64, generator=rng, dtype=torch.float64)
    original = model(input_ids=ids).logits
    with ablation(model, arch, r, params):
        hooked = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, original)  # hooks leave nothing behind
    assert (hooked - original).abs().max() > 1e-4
    orthogonalize(model, arch, r, params)
    edited = model(input_ids=ids).logits
    # Gemma norms compute in float32 internally, hence a tolerance above float64 rounding.
    torch.testing.assert_close(edited, hooked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma2", "qwen2"])
def test_saved_edit_reloads_with_same_logits(model_type, tmp_path, rng):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    arch = architecture_for(model)
    tied_before = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(3, VOCAB, (1, 9), generator=rng)
    head_before = model.get_output_embeddings().weight.clone()
    orthogonalize(model, arch, torch.randn(64, generator=rng, dtype=torch.float64))
    # Untying kept the output head as it was; only the input embedding was edited.
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    if tied_before:
        assert not model.config.tie_word_embeddings
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, attn_implementation=model.config._attn_implementation
    ).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-7, atol=1e-8)
