"""The ablation edit removes the direction everywhere; hooks and weights agree; saves reload."""

from __future__ import annotations

import pytest
import torch
from helpers import residual_streams

from abliterate.architectures import architecture_for
from abliterate.directions import Candidates
from abliterate.edit import EditParams, Profile, ablation, orthogonalize, trial_edit, unit
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


def test_profile_strengths_and_which_writers_they_reach():
    p = Profile(peak=1.0, center=2.0, width=2.0, floor=0.2)
    assert [p.at(i) for i in range(6)] == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2, 0.0])
    assert Profile(0.5, 1.0, 0.0).at(1) == 0.5 and Profile(0.5, 1.0, 0.0).at(2) == 0.0  # width 0: one layer
    params = EditParams(scale=0.3, attention=p, embeddings=True)
    assert params.writer_scale(1, "mixer") == pytest.approx(0.6)  # the attention profile
    assert params.writer_scale(1, "mlp") == 0.3  # no mlp profile: scale from start_layer on
    assert params.embedding_scale == 0.3 and not params.full
    assert EditParams(start_layer=2).embedding_scale == 0 and EditParams().full
    assert EditParams(embeddings=False).embedding_scale == 0 and not EditParams(embeddings=False).full


def test_a_profiled_edit_touches_exactly_the_writers_it_reaches(rng):
    model = tiny_model("llama", dtype=torch.float64)
    arch = architecture_for(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = torch.randn(64, generator=rng, dtype=torch.float64)
    params = EditParams(attention=Profile(1.0, 0.0, 0.0), mlp=Profile(0.5, 2.0, 0.5), embeddings=False)
    edited = set(orthogonalize(model, arch, r, params))
    assert edited == {"model.layers.0.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name not in edited), name  # the rest bit for bit
    u = unit(r)
    o_proj = model.model.layers[0].self_attn.o_proj.weight
    assert (u @ o_proj).abs().max() < 1e-12  # strength 1: the whole component gone
    down, old = model.model.layers[2].mlp.down_proj.weight, before["model.layers.2.mlp.down_proj.weight"]
    torch.testing.assert_close(u @ down, 0.5 * (u @ old))  # strength 0.5: half of it


def test_a_direction_between_layers_blends_its_neighbours():
    directions = torch.zeros(1, 3, 4, dtype=torch.float64)
    directions[0, 0, 0] = directions[0, 1, 1] = directions[0, 2, 2] = 1.0
    c = Candidates(directions.clone(), directions)
    torch.testing.assert_close(c.between(0, 1.0), directions[0, 1])
    torch.testing.assert_close(c.between(0, 2.0), directions[0, 2])
    half = c.between(0, 0.5)
    assert half.norm() == pytest.approx(1.0) and half[0] == pytest.approx(half[1]) and half[2] == 0
    assert c.between(0, 1.25)[1] > c.between(0, 1.25)[2] > 0
    with pytest.raises(ValueError, match="outside 0..2"):
        c.between(0, 2.5)


def test_several_directions_lead_with_the_mean_difference_then_the_spread_around_it(rng):
    hidden, prompts = 16, 200
    mean = torch.zeros(hidden, dtype=torch.float64)
    mean[0] = 3.0
    wide, narrow = torch.zeros(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64)
    wide[1], narrow[2] = 1.0, 1.0
    # each harmful prompt: the mean difference, plus much variation along `wide` and some along `narrow`
    spread = (mean + 2.0 * torch.randn(prompts, 1, generator=rng, dtype=torch.float64) * wide
              + 0.5 * torch.randn(prompts, 1, generator=rng, dtype=torch.float64) * narrow
              + 0.01 * torch.randn(prompts, hidden, generator=rng, dtype=torch.float64))  # fmt: skip
    spread = torch.stack([spread, spread], dim=1).float()  # two layers alike
    diffs = torch.stack([mean, mean])[None]
    c = Candidates(diffs, diffs / diffs.norm(dim=-1, keepdim=True), spread)
    torch.testing.assert_close(c.several(0, 0.5, 1), c.between(0, 0.5))
    three = c.several(0, 0.5, 3)
    assert three.shape == (3, hidden)
    torch.testing.assert_close(three @ three.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(three[0], c.between(0, 0.5))
    assert abs(three[1] @ wide) > 0.99 and abs(three[2] @ narrow) > 0.99  # by variance, largest first
    with pytest.raises(ValueError, match="last-token activations"):
        Candidates(diffs, diffs).several(0, 0.0, 2)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("embeddings", [True, False])
def test_a_norm_preserving_trial_edits_in_place_and_restores_every_bit(tied, embeddings, rng):
    model = tiny_model("qwen2", dtype=torch.float32, tie_word_embeddings=tied)
    arch = architecture_for(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(3, VOCAB, (2, 10), generator=rng)
    r = torch.randn(64, generator=rng, dtype=torch.float64)
    params = EditParams(scale=0.8, attention=Profile(0.8, 1.0, 1.0, 0.2), embeddings=embeddings, norm_preserving=True)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    reference = tiny_model("qwen2", dtype=torch.float32, tie_word_embeddings=tied)
    orthogonalize(reference, arch, r, params)
    with torch.no_grad():
        with trial_edit(model, arch, r, params):
            inside = model(input_ids=ids).logits
        torch.testing.assert_close(inside, reference(input_ids=ids).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="no hook form"), ablation(model, arch, r, params):
            pass
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert (
        model.lm_head.weight is model.model.embed_tokens.weight
    ) == tied and model.config.tie_word_embeddings == tied
