"""Every architecture-table entry, on a tiny random float64 model of its family.

For each family: the weight edit leaves no component along r anywhere in the residual stream, every
tabled weight (fused 3-D expert tensors included) is really edited, hooks equal the weight edit for
removal and induction, and induction scales each writer's component along its direction by 1 - scale.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_edit import residual_streams

from abliterate.architectures import ARCHITECTURES, Param, architecture_for, get, layers
from abliterate.edit import EditParams, _resolve_weights, ablation, add_hooks, orthogonalize, unit, writer_directions
from abliterate.errors import AbliterateError

torch.set_num_threads(1)  # keep CPU use light; the tiny models gain nothing from more

LLAMA_LIKE = "llama mistral qwen2 qwen3 phi3 granite gemma cohere cohere2 smollm3 helium".split()
OTHER_DENSE = ["olmo", "starcoder2", "phi", "gpt2", "gpt_neox"]
POST_NORMED = ["gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4", "glm4"]
MOE = ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "olmoe", "phimoe", "granitemoe"]
VLM = ["gemma3"]  # Gemma3ForConditionalGeneration, which AutoModelForCausalLM loads for a Gemma 3 checkpoint
COVERED = LLAMA_LIKE + OTHER_DENSE + POST_NORMED + MOE + VLM


def test_every_table_entry_is_tested():
    assert len(COVERED) == len(set(COVERED))
    assert set(COVERED) == set(ARCHITECTURES)


def _setup(model_type, seed=0, **kw):
    model = tiny_model(model_type, seed=seed, **kw)
    arch = architecture_for(model)
    assert arch is ARCHITECTURES[model_type]
    gen = torch.Generator().manual_seed(1000 + seed)
    if arch.fused_experts:  # distinct tokens and strong random routers, so tokens spread over the experts
        with torch.no_grad():
            for name, p in model.named_parameters():
                if re.search(r"embed_tokens\.weight$|\.(gate|router)\.weight$", name):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    r = unit(torch.randn(64, generator=gen, dtype=torch.float64))
    return model, arch, ids, r


def _tabled_tensors(model, arch):
    """(layer index, writer index, tensor, residual axis, spec) for every tabled writer weight."""
    for i, layer in enumerate(layers(model, arch)):
        for j, writer in enumerate(arch.writers):
            for spec in writer.weights:
                for tensor, axis in _resolve_weights(layer, spec):
                    yield i, j, tensor, axis, spec


def _experts_hit(model, arch, ids):
    """Per layer, the set of experts that routing sent tokens to (fused-expert families)."""
    modules = [
        get(layer, spec.path.rsplit(".", 1)[0])
        for layer in layers(model, arch)
        for writer in arch.writers
        for spec in writer.weights
        if isinstance(spec, Param) and spec.path.endswith("down_proj")
    ]
    hit = [set() for _ in modules]

    def recorder(seen):
        def hook(module, args, kwargs):
            # Every fused experts module is called as experts(hidden_states, top_k_index, top_k_weights).
            seen.update(args[1].unique().tolist())

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


@pytest.mark.parametrize("params", [EditParams(), EditParams(scale=-0.5)], ids=["remove", "induce"])
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

    post = [(get(layer, w.output), record) for layer in layers(model, arch) for w in arch.writers]
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
    assert len(calls) == len(directions) == len(layers(model, arch)) * len(arch.writers)
    embed_before = [module(*args) for module, args, _ in embeds]

    orthogonalize(model, arch, r, EditParams(scale=scale))

    def check(old, new, u):
        u = u.to(old.dtype)
        along = old @ u
        assert (along.abs() / old.norm(dim=-1)).max() > 1e-3  # there is a component to strengthen
        torch.testing.assert_close(new @ u, (1 - scale) * along, rtol=1e-9, atol=1e-12)
        # ... and nothing orthogonal to the direction changed
        torch.testing.assert_close(new - (new @ u)[..., None] * u, old - along[..., None] * u, rtol=1e-9, atol=1e-12)

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
