"""Every architecture-table entry, on a tiny random float64 model of its family.

For each family: the weight edit leaves no component along r anywhere in the residual stream, every
tabled weight (fused 3-D expert tensors included) is really edited, hooks equal the weight edit for
removal and induction, and induction scales each writer's component along its direction by 1 - scale.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import residual_streams

from abliterate.architectures import (
    ARCHITECTURES,
    Param,
    Writer,
    all_layer_writers,
    architecture_for,
    get,
    layers,
)
from abliterate.edit import (
    EditParams,
    Profile,
    _resolve_weights,
    ablation,
    add_hooks,
    check_removed,
    orthogonalize,
    unit,
    writer_directions,
)
from abliterate.errors import AbliterateError
from abliterate.tiny import VOCAB, tiny_model

torch.set_num_threads(1)  # keep CPU use light; the tiny models gain nothing from more

LLAMA_LIKE = "llama mistral qwen2 qwen3 phi3 granite gemma cohere cohere2 smollm3 helium".split()
OTHER_DENSE = ["olmo", "starcoder2", "phi", "gpt2", "gpt_neox"]
POST_NORMED = ["gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4", "glm4"]
MOE = ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "olmoe", "phimoe", "granitemoe"]
VLM = ["gemma3"]  # Gemma3ForConditionalGeneration, which AutoModelForCausalLM loads for a Gemma 3 checkpoint

# Families whose layers differ by type, each configured so that every layer type of the family occurs.
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48, experts_implementation="eager")
_DEEPSEEK = dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, **_MOE)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
_GATED_DELTA = dict(
    head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16
)
_MAMBA2 = dict(mamba_d_state=8, mamba_n_heads=8, mamba_d_head=16, mamba_expand=2)
HYBRID = {
    "deepseek_v3": dict(q_lora_rank=32, **_MLA, **_DEEPSEEK),  # dense layer 0, then MoE; MLA attention
    "deepseek_v2": dict(q_lora_rank=None, **_MLA, **_DEEPSEEK),
    "glm4_moe": dict(head_dim=16, **_DEEPSEEK),
    "llama4_text": dict(  # MoE (routed + shared expert) every second layer
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, intermediate_size_mlp=96, head_dim=16
    ),
    "qwen3_next": dict(  # gated-delta linear attention and full attention; one dense-MLP layer
        num_experts=4,
        mlp_only_layers=[1],
        layer_types=["linear_attention", "linear_attention", "full_attention"],
        shared_expert_intermediate_size=80,
        **_GATED_DELTA,
        **_MOE,
    ),
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention", "linear_attention"], **_GATED_DELTA),
    "qwen3_5_moe_text": dict(
        num_experts=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        shared_expert_intermediate_size=80,
        **_GATED_DELTA,
        **_MOE,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention", "conv"]),  # short convolutions and attention
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1, num_experts=4, **_MOE),
    "jamba": dict(  # Mamba and attention layers; MoE every second layer
        num_experts=4,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=3,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_expand=2,
        **_MOE,
    ),
    "bamba": dict(attn_layer_indices=[1], **_MAMBA2),
    "granitemoehybrid": dict(
        num_local_experts=4, layer_types=["mamba", "attention", "mamba"], shared_intermediate_size=80, **_MAMBA2, **_MOE
    ),
    "falcon_h1": dict(mamba_d_ssm=128, head_dim=16, **_MAMBA2),  # Mamba and attention side by side in every layer
    "nemotron_h": dict(  # one mixer per block: Mamba, MoE, attention or MLP
        layers_block_type=["mamba", "moe", "attention", "mlp"],
        num_hidden_layers=4,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_shared_expert_intermediate_size=80,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=2,
        head_dim=16,
        **_MOE,
    ),
}
COVERED = LLAMA_LIKE + OTHER_DENSE + POST_NORMED + MOE + VLM + list(HYBRID)
FLOAT32_EXPERT_SUMS = {"nemotron_h"}  # its eager experts accumulate in the router's float32


def test_every_table_entry_is_tested():
    assert len(COVERED) == len(set(COVERED))
    assert set(COVERED) == set(ARCHITECTURES)


def _setup(model_type, seed=0, **kw):
    model = tiny_model(model_type, seed=seed, **{**HYBRID.get(model_type, {}), **kw})
    arch = architecture_for(model)
    assert arch is ARCHITECTURES[model_type]
    gen = torch.Generator().manual_seed(1000 + seed)
    if arch.fused_experts:  # distinct tokens and strong random routers, so tokens spread over the experts
        with torch.no_grad():
            for name, p in model.named_parameters():
                if re.search(r"embed(_tokens|dings)\.weight$|\.(gate|router)\.weight$", name):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    r = unit(torch.randn(64, generator=gen, dtype=torch.float64))
    return model, arch, ids, r


def _tabled_tensors(model, arch):
    """(layer index, writer index, tensor, residual axis, spec) for every tabled writer weight."""
    for i, (layer, writers) in enumerate(zip(layers(model, arch), all_layer_writers(model, arch))):
        for j, writer in enumerate(writers):
            for spec in writer.weights:
                for tensor, axis in _resolve_weights(layer, spec):
                    yield i, j, tensor, axis, spec


def _experts_hit(model, arch, ids):
    """Per layer, the set of experts that routing sent tokens to (fused-expert families)."""
    modules = [
        get(layer, spec.path.rsplit(".", 1)[0])
        for layer, writers in zip(layers(model, arch), all_layer_writers(model, arch))
        for writer in writers
        for spec in writer.weights
        if isinstance(spec, Param) and spec.path.endswith("down_proj")
    ]
    hit = [set() for _ in modules]

    def recorder(seen):
        def hook(module, args, kwargs):
            # Fused experts are called as experts(hidden_states, top_k_index, top_k_weights), except
            # Llama 4's, which runs every expert on every (router-weighted) token.
            seen.update(args[1].unique().tolist() if len(args) > 1 else range(module.down_proj.shape[0]))

        return hook

    with add_hooks([(m, recorder(seen)) for m, seen in zip(modules, hit)], []):
        model(input_ids=ids)
    return hit


@pytest.mark.parametrize("model_type", COVERED)
def test_weight_edit_removes_component_everywhere(model_type):
    model, arch, ids, r = _setup(model_type)
    if arch.fused_experts:
        hit = _experts_hit(model, arch, ids)
        assert hit and all(len(h) >= 3 for h in hit), hit  # routing really spreads tokens over the experts
    before = residual_streams(model, arch, ids)
    assert max(((h @ r).abs() / h.norm(dim=-1)).max() for h in before) > 1e-3  # the check has teeth
    originals = [t.clone() for _, _, t, _, _ in _tabled_tensors(model, arch)]
    directions = writer_directions(model, arch, r)

    orthogonalize(model, arch, r)

    after = residual_streams(model, arch, ids)
    assert len(after) == len(before) == len(layers(model, arch)) + 1
    for h in after:
        assert ((h @ r).abs() / h.norm(dim=-1)).max() < 1e-5
    for (i, j, tensor, axis, spec), original in zip(_tabled_tensors(model, arch), originals, strict=True):
        u = directions[i][j].to(tensor.dtype)
        assert torch.tensordot(tensor, u, dims=([axis], [0])).abs().max() < 1e-10, spec
        changed = (tensor - original).flatten(1).abs().amax(1) if tensor.ndim == 3 else (tensor - original).abs().max()
        assert (changed > 1e-6).all(), (spec, changed)  # every expert's slice was edited, not just some


# A searched edit: attention and feed-forward writers on their own layer profiles, embeddings left alone.
PROFILED = EditParams(attention=Profile(0.9, 0.5, 1.5, 0.3), mlp=Profile(-0.4, 2.0, 1.0), embeddings=False)


@pytest.mark.parametrize(
    "params", [EditParams(), EditParams(scale=-0.5), PROFILED], ids=["remove", "induce", "profiled"]
)
@pytest.mark.parametrize("model_type", COVERED)
def test_hooks_equal_weight_edit(model_type, params):
    model, arch, ids, r = _setup(model_type, seed=1)
    original = model(input_ids=ids).logits
    with ablation(model, arch, r, params):
        hooked = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, original)  # the hooks leave nothing behind
    assert (hooked - original).abs().max() > 1e-4
    orthogonalize(model, arch, r, params)
    torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", COVERED)
def test_several_directions_are_removed_as_one_subspace_and_hooks_equal_weights(model_type):
    model, arch, ids, r = _setup(model_type, seed=2)
    gen = torch.Generator().manual_seed(7)
    rows = torch.stack([r, torch.randn(64, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen,
                        dtype=torch.float64)])  # fmt: skip
    basis = unit(rows)
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis[0], r)  # the first direction leads, sign and all
    span = lambda h: (h @ basis.T).norm(dim=-1) / h.norm(dim=-1)  # noqa: E731
    assert max(span(h).max() for h in residual_streams(model, arch, ids)) > 1e-2  # the check has teeth
    with ablation(model, arch, rows, PROFILED):
        hooked = model(input_ids=ids).logits
    with ablation(model, arch, rows):
        removed = residual_streams(model, arch, ids)
    assert all(span(h).max() < 1e-5 for h in removed)  # no component left anywhere in the span
    orthogonalize(model, arch, rows)
    assert all(span(h).max() < 1e-5 for h in residual_streams(model, arch, ids))
    check_removed(model, arch, ids.tolist(), rows)
    model, arch, ids, _ = _setup(model_type, seed=2)
    orthogonalize(model, arch, rows, PROFILED)
    torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, -0.5], ids=["remove", "induce"])
@pytest.mark.parametrize("model_type", COVERED)
def test_norm_preserving_edit_keeps_every_written_vectors_length(model_type, scale):
    model, arch, ids, r = _setup(model_type, seed=4)
    embedding = model.get_input_embeddings().weight
    tensors = [(embedding, 1)] + [(t, axis) for _, _, t, axis, _ in _tabled_tensors(model, arch)]
    lengths = [t.norm(dim=axis) for t, axis in tensors]
    originals = [t.clone() for t, _ in tensors]
    directions = [r] + [writer_directions(model, arch, r)[i][j] for i, j, *_ in _tabled_tensors(model, arch)]

    orthogonalize(model, arch, r, EditParams(scale=scale, norm_preserving=True))

    tensors = [(model.get_input_embeddings().weight, 1)] + [
        (t, axis) for _, _, t, axis, _ in _tabled_tensors(model, arch)
    ]
    for (tensor, axis), length, original, u in zip(tensors, lengths, originals, directions, strict=True):
        torch.testing.assert_close(tensor.norm(dim=axis), length, rtol=1e-12, atol=1e-14)  # lengths kept
        along_before = torch.tensordot(original, u.to(tensor.dtype), dims=([axis], [0])) / length.clamp_min(1e-30)
        along_after = torch.tensordot(tensor, u.to(tensor.dtype), dims=([axis], [0])) / length.clamp_min(1e-30)
        assert (along_before.abs() > 1e-3).any()  # there was a component to change
        if scale == 1.0:
            assert along_after.abs().max() < 1e-10  # removed from every vector, as in the plain edit
        else:  # a larger share of each vector's length now lies along the direction
            grew = along_after.abs() - along_before.abs()
            assert (grew[along_before.abs() > 1e-6] > 0).all()
    if scale == 1.0:  # so the residual stream has no component along r anywhere, as the plain edit promises
        for h in residual_streams(model, arch, ids):
            assert ((h @ r).abs() / h.norm(dim=-1)).max() < 1e-5
    with pytest.raises(ValueError, match="no hook form"):
        with ablation(model, arch, r, EditParams(norm_preserving=True)):
            pass


@pytest.mark.parametrize("model_type", MOE)
def test_fused_experts_edit_holds_under_the_default_kernel(model_type):
    """Real loads use the grouped_mm experts kernel (float32 here; float64 has none): it reads the same tensors."""
    model, arch, ids, r = _setup(model_type, seed=3, dtype=torch.float32, experts_implementation=None)
    assert model.config._experts_implementation == "grouped_mm"
    with ablation(model, arch, r):
        hooked = model(input_ids=ids).logits
    orthogonalize(model, arch, r)
    torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-4, atol=1e-5)
    for h in residual_streams(model, arch, ids):
        assert ((h @ r.float()).abs() / h.norm(dim=-1)).max() < 1e-4


def _capture_writer_calls(model, arch, ids):
    """Each writer's (module, args, kwargs, output) from one forward pass, plus the embeddings'."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((module, args, kwargs, output[0] if isinstance(output, tuple) else output))

    per_layer = zip(layers(model, arch), all_layer_writers(model, arch))
    post = [(get(layer, w.output), record) for layer, writers in per_layer for w in writers]
    handles = [module.register_forward_hook(fn, with_kwargs=True) for module, fn in post]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    embeds = [(get(model, name), (ids,), {}) for name in arch.embeddings]
    if "wpe" in arch.embeddings[-1]:  # GPT-2's position embedding takes positions, not tokens
        embeds[-1] = (embeds[-1][0], (torch.arange(ids.shape[1]),), {})
    return embeds, calls


@pytest.mark.parametrize("model_type", COVERED)
def test_induction_scales_each_writers_component(model_type):
    scale = -0.5
    model, arch, ids, r = _setup(model_type, seed=2)
    directions = [u for per_layer in writer_directions(model, arch, r) for u in per_layer]
    embeds, calls = _capture_writer_calls(model, arch, ids)
    assert len(calls) == len(directions) == sum(map(len, all_layer_writers(model, arch)))
    embed_before = [module(*args) for module, args, _ in embeds]

    orthogonalize(model, arch, r, EditParams(scale=scale))

    def check(old, new, u):
        u = u.to(old.dtype)
        along = old @ u
        assert (along.abs() / old.norm(dim=-1)).max() > 1e-3  # there is a component to strengthen
        torch.testing.assert_close(new @ u, (1 - scale) * along, **tolerance)
        # ... and nothing orthogonal to the direction changed
        torch.testing.assert_close(new - (new @ u)[..., None] * u, old - along[..., None] * u, **tolerance)

    tolerance = dict(rtol=1e-5, atol=1e-8) if model_type in FLOAT32_EXPERT_SUMS else dict(rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        for (module, args, _), old in zip(embeds, embed_before):
            check(old, module(*args), r)
        for (module, args, kwargs, old), u in zip(calls, directions):
            new = module(*args, **kwargs)
            check(old, new[0] if isinstance(new, tuple) else new, u)


def _fake(model_type, text_type=None):
    text = SimpleNamespace(model_type=text_type) if text_type else None
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type, text_config=text))


def test_lookup_prefers_top_level_type_then_text_tower():
    assert architecture_for(_fake("gemma3", "gemma3_text")) is ARCHITECTURES["gemma3"]
    assert architecture_for(_fake("llava_like", "mistral")) is ARCHITECTURES["mistral"]
    assert architecture_for(_fake("qwen2")) is ARCHITECTURES["qwen2"]


@pytest.mark.parametrize("text_type", [None, "fakeformer_text"])
def test_unknown_type_names_it_and_the_fix(text_type):
    with pytest.raises(AbliterateError) as err:
        architecture_for(_fake("fakeformer", text_type))
    message = str(err.value)
    assert "'fakeformer'" in message and "architectures.py" in message and "llama" in message
    if text_type:
        assert "'fakeformer_text'" in message


@pytest.mark.parametrize("model_type", list(HYBRID))
def test_hybrid_edit_survives_save_and_reload(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model, arch, ids, r = _setup(model_type, seed=4)
    orthogonalize(model, arch, r)
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        dtype=torch.float64,
        attn_implementation=model.config._attn_implementation,
        experts_implementation="eager",
    ).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-7, atol=1e-8)
    for h in residual_streams(reloaded, architecture_for(reloaded), ids):
        assert ((h @ r).abs() / h.norm(dim=-1)).max() < 1e-5


def test_latent_moe_edits_the_latent_up_projection():
    """Nemotron-H with a latent MoE: the experts write to a smaller space; fc2_latent_proj writes to the stream."""
    model, arch, ids, r = _setup("nemotron_h", seed=5, moe_latent_size=32)
    moe_writer = all_layer_writers(model, arch)[1][0]
    assert moe_writer.weights == ("mixer.fc2_latent_proj", "mixer.shared_experts.down_proj")
    with ablation(model, arch, r):
        hooked = model(input_ids=ids).logits
    orthogonalize(model, arch, r)
    torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-6)
    for h in residual_streams(model, arch, ids):
        assert ((h @ r).abs() / h.norm(dim=-1)).max() < 1e-5


def _snapshot(model):
    return {name: p.clone() for name, p in model.named_parameters()}


def test_unmatched_layer_type_is_an_error_before_any_edit():
    model, arch, ids, r = _setup("qwen3_next")
    layers(model, arch)[2].self_attn = None  # a full-attention layer whose mixer the table would not know
    before = _snapshot(model)
    for action in (lambda: orthogonalize(model, arch, r), lambda: ablation(model, arch, r).__enter__()):
        with pytest.raises(AbliterateError) as err:
            action()
        message = str(err.value)
        assert "decoder layer 2" in message and "token mixer" in message and "linear_attn.out_proj" in message
        assert "architectures.py" in message
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_table_entry_naming_the_wrong_tensor_is_an_error_before_any_edit():
    model = tiny_model("llama")
    wrong = dataclasses.replace(
        ARCHITECTURES["llama"], writers=(ARCHITECTURES["llama"].writers[0], Writer("self_attn", ("self_attn.k_proj",)))
    )
    before = _snapshot(model)
    with pytest.raises(AbliterateError, match=r"k_proj.* 32 entries .* hidden size 64"):
        orthogonalize(model, wrong, torch.randn(64, dtype=torch.float64))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("model_type", COVERED)
def test_every_layer_has_a_token_mixer_or_feed_forward_writer_of_a_declared_kind(model_type):
    """Profiles pick writers by kind: each table entry declares its token mixers, so a profile reaches them."""
    model, arch, _, _ = _setup(model_type)
    kinds = {w.kind for writers in all_layer_writers(model, arch) for w in writers}
    assert kinds <= {"mixer", "mlp"} and "mixer" in kinds, kinds
