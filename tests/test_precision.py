"""Saved weights are the source's, edited in float64 and rounded once; quantized or offloaded weights are refused;
a writer the table misses is an error; fused experts are edited in bounded chunks; post-norm partial edits measured."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from abliterate import edit as edit_module
from abliterate import model, pipeline
from abliterate.apply import apply as apply_edit
from abliterate.architectures import ARCHITECTURES, architecture_for, layers
from abliterate.edit import (
    EditParams,
    check_removed,
    orthogonalize,
    remove_component_,
    unit,
    untie_embeddings,
    writer_directions,
)
from abliterate.errors import AbliterateError
from abliterate.selection import CandidateScore, RefusalTokens, Selection
from abliterate.settings import LoadOptions, Settings
from abliterate.tiny import VOCAB, recorded_edit, save_tiny_checkpoint, tiny_model

torch.set_num_threads(1)


def fixed_selection(scale: float = 1.0, start_layer: int = 0, layer: int = 1):
    """A stand-in for the selection stage: the tiny random model refuses nothing, so nothing would qualify."""

    def select(console, lm, settings, candidates, texts):
        chosen = CandidateScore(
            -1, layer, 0.0, refusal=0.0, kl=0.0, scale=scale, start_layer=start_layer, eligible=True
        )
        tokens = RefusalTokens((5,), ("x",), 1, 1, 1.0)
        return Selection(chosen, [chosen], 1.0, -1.0, 0.075, tokens, "fixed by the test")

    return select


def tiny_run(tmp_path, source, **overrides):
    """A whole in-process run on a tiny checkpoint, CPU, no evaluation; returns the output folder."""
    settings = Settings(
        model=str(source), out=str(tmp_path / "out"), n_train=4, n_val=2, n_test=1, batch_size=4, max_new_tokens=4,
        no_eval=True, device="cpu", **overrides,
    )  # fmt: skip
    return pipeline.run(settings).out


def source_edited_in_float64(source, out, save_dtype=None) -> dict[str, torch.Tensor]:
    """What the saved weights must be: the stored source tensors, each writer edited in float64 and rounded
    once to the save dtype (the source's own by default), every other tensor as stored (or cast once)."""
    from transformers import AutoModelForCausalLM

    record = json.loads((out / "abliteration.json").read_text())
    direction = load_file(str(out / "directions.safetensors"))["direction"]
    params = EditParams(record["edit"]["scale"], record["edit"]["start_layer"], record["edit"]["norm_preserving"])
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    orthogonalize(reference, architecture_for(reference), direction, params, dtype=save_dtype)
    return {k: v.to(save_dtype or v.dtype) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize(("scale", "start_layer"), [(1.0, 0), (0.7, 1)])
def test_bfloat16_compute_saves_the_float32_source_edited_in_float64(tmp_path, monkeypatch, scale, start_layer):
    source = save_tiny_checkpoint(tmp_path / "source")
    monkeypatch.setattr(pipeline, "_select", fixed_selection(scale, start_layer))
    out = tiny_run(tmp_path, source, dtype="bfloat16")

    stored = load_file(str(source / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    expected = source_edited_in_float64(source, out)
    record = json.loads((out / "abliteration.json").read_text())
    edited = set(record["edit"]["edited_tensors"])
    assert len(edited) >= 4 and record["model"]["source_dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), name
        if name in edited:
            # Not a bfloat16 rounding: the edit kept float32's precision.
            assert not torch.equal(tensor, tensor.to(torch.bfloat16).float()), name
        elif name in stored:
            assert torch.equal(tensor, stored[name]), name  # untouched: bit-identical to the source


def test_explicit_save_dtype_rounds_once_from_float64(tmp_path, monkeypatch):
    source = save_tiny_checkpoint(tmp_path / "source")
    monkeypatch.setattr(pipeline, "_select", fixed_selection(0.7, 1))
    out = tiny_run(tmp_path, source, save_dtype="bfloat16")
    saved = load_file(str(out / "model.safetensors"))
    expected = source_edited_in_float64(source, out, torch.bfloat16)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert all(torch.equal(t, expected[k]) for k, t in saved.items())


def test_unknown_save_dtype_is_refused_before_loading(tmp_path):
    with pytest.raises(AbliterateError, match="unknown save dtype 'float8'"):
        pipeline.check_settings(Settings(model="x", out=str(tmp_path / "o"), save_dtype="float8"))


@pytest.mark.parametrize("in_memory", [True, False])
def test_apply_edits_the_source_in_float64_and_rounds_once(tmp_path, in_memory):
    source = save_tiny_checkpoint(tmp_path / "source")
    edit = recorded_edit(tmp_path / "run", 64, 0.8)
    out = apply_edit(str(source), str(edit), str(tmp_path / "out"), dtype="bfloat16", in_memory=in_memory)
    saved = load_file(str(out / "model.safetensors"))
    stored = load_file(str(source / "model.safetensors"))
    direction = load_file(str(edit.parent / "directions.safetensors"))["direction"]
    edited = set(json.loads((out / "abliteration.json").read_text())["edit"]["edited_tensors"])
    net = tiny_model("llama", dtype=torch.float32)
    net.load_state_dict(stored, strict=False)
    targets = {t.name: t for t in edit_module.edit_targets(net, architecture_for(net), direction, EditParams(0.8))}
    assert set(targets) == edited
    for name, tensor in saved.items():
        assert tensor.dtype == torch.bfloat16, name
        if name in edited:
            t = targets[name]
            once = torch.empty_like(t.tensor, dtype=torch.bfloat16)
            remove_component_(t.tensor, t.axis, t.direction, 0.8, out=once)
            assert torch.equal(tensor, once), name
        else:
            assert torch.equal(tensor, stored[name].to(torch.bfloat16)), name


def quantized_checkpoint(folder, method: str):
    """A tiny checkpoint whose config says it is pre-quantized, as FP8 or GPTQ releases do."""
    save_tiny_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "activation_scheme": "dynamic", "fmt": "e4m3"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("method", ["fp8", "gptq", "compressed-tensors", "bitsandbytes"])
def test_pre_quantized_checkpoint_is_refused_at_load(tmp_path, method):
    folder = quantized_checkpoint(tmp_path / "q", method)
    with pytest.raises(AbliterateError, match=f"pre-quantized checkpoint \\({method}\\).*unquantized") as info:
        model.load(str(folder), LoadOptions(device="cpu"))
    assert "\n" not in str(info.value)
    edit = recorded_edit(tmp_path / "run", 64)
    with pytest.raises(AbliterateError, match=f"pre-quantized checkpoint \\({method}\\)"):
        apply_edit(str(folder), str(edit), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_gguf_quantization_config_is_not_refused(tmp_path):
    from types import SimpleNamespace

    model.check_not_quantized(SimpleNamespace(quantization_config={"quant_method": "gguf"}), "x")
    model.check_not_quantized(SimpleNamespace(quantization_config=None), "x")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.uint8])
def test_edit_refuses_quantized_codes_before_touching_anything(dtype):
    net = tiny_model("llama", dtype=torch.float32)
    arch = architecture_for(net)
    down = net.model.layers[1].mlp.down_proj
    down.weight = torch.nn.Parameter(down.weight.to(dtype), requires_grad=False)
    embed = net.model.embed_tokens.weight.clone()
    name = str(dtype).replace("torch.", "")
    with pytest.raises(
        AbliterateError, match=f"model.layers.1.mlp.down_proj.weight is quantized \\(its dtype is {name}\\)"
    ):
        orthogonalize(net, arch, torch.randn(64, dtype=torch.float64))
    assert torch.equal(net.model.embed_tokens.weight, embed)  # refused before the first tensor was edited
    with pytest.raises(AbliterateError, match="quantized"):
        remove_component_(down.weight, 0, unit(torch.randn(64)))


def test_edit_refuses_a_quantized_linear_subclass():
    class Linear4bit(torch.nn.Linear):  # what bitsandbytes layers look like: a Linear with a quant_state
        quant_state = object()

    net = tiny_model("llama", dtype=torch.float32)
    old = net.model.layers[0].self_attn.o_proj
    new = Linear4bit(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    net.model.layers[0].self_attn.o_proj = new
    with pytest.raises(AbliterateError, match="o_proj.weight is quantized \\(its module is a quantized Linear4bit\\)"):
        orthogonalize(net, architecture_for(net), torch.randn(64, dtype=torch.float64))


def test_tied_embeddings_are_compared_by_identity_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    from abliterate.tiny import tiny_config

    with torch.device("meta"):
        untied = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=False))
        tied = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=True))
    head = untied.lm_head.weight
    assert head.data_ptr() == untied.model.embed_tokens.weight.data_ptr() == 0  # why data_ptr() cannot tell
    assert untie_embeddings(untied) is False and untied.lm_head.weight is head
    assert untie_embeddings(tied) is True and tied.lm_head.weight is not tied.model.embed_tokens.weight


def test_offloaded_weights_are_refused_not_skipped():
    net = tiny_model("llama", dtype=torch.float32)
    down = net.model.layers[2].mlp.down_proj
    down.weight = torch.nn.Parameter(torch.empty(down.weight.shape, device="meta"), requires_grad=False)
    embed = net.model.embed_tokens.weight.clone()
    with pytest.raises(AbliterateError, match="layers.2.mlp.down_proj.weight is offloaded.*abliterate apply"):
        orthogonalize(net, architecture_for(net), torch.randn(64, dtype=torch.float64))
    assert torch.equal(net.model.embed_tokens.weight, embed)


def without_mlp_writer(arch):
    """The table entry with the MLP writer dropped: the edit then misses every layer's down_proj."""
    return dataclasses.replace(arch, writers=arch.writers[:1])


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
def test_check_removed_passes_a_full_edit_and_catches_a_missed_writer(model_type):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)).tolist()
    r = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = tiny_model(model_type, dtype=torch.float32)
    arch = architecture_for(net)
    with pytest.raises(AbliterateError, match="input of decoder layer 0"):  # unedited: the embeddings carry it
        check_removed(net, arch, ids, r)
    orthogonalize(net, arch, r)
    assert check_removed(net, arch, ids, r) < 1e-5

    net = tiny_model(model_type, dtype=torch.float32)
    orthogonalize(net, without_mlp_writer(arch), r)
    with pytest.raises(
        AbliterateError, match="input of decoder layer 1 .* a writer of decoder layer 0 is missing"
    ) as e:
        check_removed(net, arch, ids, r)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_full_edit_passes_the_check_and_a_missed_writer_does_not(dtype):
    """Rounding the edited weights and activations to 16 bits stays well inside the looser tolerance."""
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0)).tolist()
    r = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for model_type in ("llama", "gemma2", "qwen2"):
        net = tiny_model(model_type, dtype=dtype)
        arch = architecture_for(net)
        orthogonalize(net, arch, r)
        assert check_removed(net, arch, ids, r) < edit_module.removal_tolerance(dtype) / 4
        net = tiny_model(model_type, dtype=dtype)
        orthogonalize(net, without_mlp_writer(arch), r)
        with pytest.raises(AbliterateError, match="input of decoder layer 1"):
            check_removed(net, arch, ids, r)


def test_run_with_a_missed_writer_fails_and_writes_nothing(tmp_path, monkeypatch):
    source = save_tiny_checkpoint(tmp_path / "source")
    monkeypatch.setattr(pipeline, "_select", fixed_selection(1.0, 0))
    monkeypatch.setitem(ARCHITECTURES, "llama", without_mlp_writer(ARCHITECTURES["llama"]))
    with pytest.raises(AbliterateError, match="a writer of decoder layer 0 is missing from the architecture table"):
        tiny_run(tmp_path, source)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


def test_fused_experts_are_edited_one_expert_chunk_at_a_time(monkeypatch):
    net = tiny_model("mixtral", dtype=torch.float32)
    tensor = net.model.layers[0].mlp.experts.down_proj  # (experts, hidden, intermediate), residual axis 1
    assert tensor.ndim == 3 and tensor.shape[1] == 64
    u = unit(torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    exact = tensor.double()
    reference = (exact - u[None, :, None] * torch.einsum("ehi,h->ei", exact, u)[:, None, :]).float()
    sizes = []
    real = edit_module._as_float64
    monkeypatch.setattr(edit_module, "_as_float64", lambda part: sizes.append(part.shape) or real(part))
    remove_component_(tensor, 1, u, chunk=16)
    assert len(sizes) == tensor.shape[0] * -(-tensor.shape[2] // 16)
    assert max(s.numel() for s in sizes) <= 64 * 16  # never the whole (experts x hidden x intermediate) tensor
    torch.testing.assert_close(tensor, reference, rtol=1e-6, atol=1e-7)
    assert torch.tensordot(tensor.double(), u, dims=([1], [0])).abs().max() < 1e-5
    # Chunk size changes nothing but memory: the default chunk gives the same bits.
    again = net.model.layers[1].mlp.experts.down_proj
    other = again.clone()
    remove_component_(again, 1, u)
    remove_component_(other, 1, u, chunk=1)
    assert torch.equal(again, other)


def post_norm_component_ratio(model_type: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position: the component along r at a post-normed writer's output after / before a weight edit of
    strength `scale` (same writer input), the predicted (1 - s) / sqrt(1 - s (2 - s) c^2) (with the norm's
    eps), and c, the share of the writer's pre-norm output along its direction."""
    net = tiny_model(model_type, dtype=torch.float64)
    arch = architecture_for(net)
    layer = layers(net, arch)[1]
    attn_out, norm = layer.self_attn.o_proj, layer.post_attention_layernorm
    seen = []
    handle = attn_out.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    net(input_ids=torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0)))
    handle.remove()
    h = seen[0][0]
    y = attn_out(h)
    r = unit(norm(y).mean(0))  # a direction the output really carries, as a refusal direction is
    u = writer_directions(net, arch, r)[1][0]
    before = norm(y) @ r
    orthogonalize(net, arch, r, EditParams(scale))
    after = norm(attn_out(h)) @ r
    c = (y @ u) / y.norm(dim=-1)
    # |y'|^2 = |y|^2 (1 - s (2 - s) c^2); the norm divides by sqrt(mean square + eps).
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    square = y.pow(2).mean(-1)
    predicted = (1 - scale) * torch.sqrt((square + eps) / (square * (1 - scale * (2 - scale) * c**2) + eps))
    return after / before, predicted, c


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2"])
@pytest.mark.parametrize("scale", [0.5, -1.0])
def test_post_norm_partial_edit_scales_the_component_by_an_rms_ratio(model_type, scale):
    ratio, predicted, c = post_norm_component_ratio(model_type, scale)
    torch.testing.assert_close(ratio, predicted, rtol=1e-6, atol=1e-9)
    assert c.abs().min() > 0.4  # the direction is a large part of the output, so the effect is visible
    # Not 1 - s: partial removal leaves more than asked, induction adds less.
    assert ((ratio - (1 - scale)) * (1 if scale > 0 else -1)).min() > 0.01
