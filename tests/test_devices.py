"""Accelerators: these run wherever a GPU is present and skip with a reason elsewhere."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import DATA
from transformers import AutoModelForCausalLM

from abliterate import model as M
from abliterate.architectures import architecture_for
from abliterate.capture import collect
from abliterate.directions import difference_of_means
from abliterate.edit import ablation, orthogonalize
from abliterate.evaluation.measure import MeasureOptions, measure
from abliterate.prompts import builtin, format_all, load
from abliterate.selection import find_refusal_tokens, select_direction
from abliterate.settings import LoadOptions
from abliterate.tiny import VOCAB, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
multi_gpu = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least two CUDA devices")
mps = pytest.mark.skipif(
    not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()), reason="needs Apple MPS"
)


def _hooks_equal_weights(device: str, dtype: torch.dtype, tol: float) -> None:
    model = tiny_model("qwen2", dtype=dtype).to(device)
    arch = architecture_for(model)
    ids = torch.randint(3, VOCAB, (2, 12), device=device)
    r = torch.randn(64, dtype=torch.float64)
    with ablation(model, arch, r):
        hooked = model(input_ids=ids).logits.float()
    orthogonalize(model, arch, r)
    torch.testing.assert_close(model(input_ids=ids).logits.float(), hooked, rtol=tol, atol=tol)


@pytest.mark.gpu
@cuda
def test_cuda_hooks_equal_weight_edit():
    _hooks_equal_weights("cuda", torch.float32, 1e-4)


@pytest.mark.gpu
@cuda
def test_cuda_bfloat16_default_and_collect(tiny_checkpoint):
    lm = M.load(str(tiny_checkpoint), LoadOptions(device="cuda"))
    assert lm.device.type == "cuda" and next(lm.model.parameters()).dtype == torch.bfloat16
    texts = ["<|user|>hello<|end|><|assistant|>", "<|user|>a longer prompt here<|end|><|assistant|>"]
    means = collect(lm.model, lm.tokenizer, lm.arch, texts, batch_size=2)
    assert torch.isfinite(means.mean).all() and means.count == 2


@pytest.mark.gpu
@multi_gpu
def test_device_map_across_gpus_matches_one_device(tiny_checkpoint):
    texts = ["<|user|>hello<|end|><|assistant|>", "<|user|>a longer prompt here<|end|><|assistant|>"]
    loaded = M.load(str(tiny_checkpoint), LoadOptions(dtype="float32", device="cuda"))
    assert getattr(loaded.model, "hf_device_map", None), "with two GPUs, load must place the model with a device map"
    # "auto" may leave a model this small on one GPU; put the later layers on the second one by hand.
    n = loaded.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map.update({f"model.layers.{i}": 0 if i < n // 2 else 1 for i in range(n)})
    spread = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, device_map=device_map)
    assert {p.device for p in spread.parameters()} == {torch.device("cuda", 0), torch.device("cuda", 1)}
    single = M.load(str(tiny_checkpoint), LoadOptions(dtype="float32", device="cpu"))
    a = collect(spread, single.tokenizer, architecture_for(spread), texts, batch_size=2)
    b = collect(single.model, single.tokenizer, single.arch, texts, batch_size=2)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-3, atol=1e-3)


def spread_and_single(checkpoint, first, second) -> tuple[M.LoadedModel, M.LoadedModel]:
    """The checkpoint with its first half of layers on `first` and the rest on `second`, and loaded on the CPU."""
    single = M.load(str(checkpoint), LoadOptions(dtype="float32", device="cpu"), progress=lambda _: None)
    n = single.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    device_map.update({f"model.layers.{i}": first if i < n // 2 else second for i in range(n)})
    spread = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map=device_map).eval()
    spread.requires_grad_(False)
    return replace(single, model=spread, arch=architecture_for(spread)), single


def tiny_sets(tokenizer) -> tuple[dict, dict]:
    """The tiny prompt files (planted refusals and not) and the built-in benign set: as sets and chat-formatted."""
    sets = {"harmful": load(str(DATA / "tiny_harmful.txt")), "harmless": load(str(DATA / "tiny_harmless.txt")),
            "benign": builtin("benign_alarming")}  # fmt: skip
    sets = {key: replace(s, prompts=s.prompts[:8]) for key, s in sets.items()}
    return sets, {key: format_all(tokenizer, s.texts) for key, s in sets.items()}


def select_on(lm: M.LoadedModel, texts: dict):
    """Collect, difference of means, refusal tokens and selection, as `run` chains them."""
    means = {k: collect(lm.model, lm.tokenizer, lm.arch, texts[k], batch_size=4) for k in ("harmful", "harmless")}
    candidates = difference_of_means(means["harmful"], means["harmless"])
    tokens = find_refusal_tokens(lm.model, lm.tokenizer, texts["harmful"], texts["harmless"], 4, 8, min_answers=4)
    return select_direction(lm.model, lm.tokenizer, lm.arch, candidates, texts["harmful"], texts["harmless"], tokens, 4)


def check_select_and_evaluate_spread(checkpoint, first, second) -> None:
    """Selection and measurement of a model spread over two devices equal those of the model on one."""
    from rich.console import Console

    spread, single = spread_and_single(checkpoint, first, second)
    sets, texts = tiny_sets(single.tokenizer)
    a, b = select_on(spread, texts), select_on(single, texts)
    assert (a.chosen.layer, a.chosen.params) == (b.chosen.layer, b.chosen.params)
    assert a.chosen.kl == pytest.approx(b.chosen.kl, rel=1e-3, abs=1e-5)
    console, options = Console(quiet=True), MeasureOptions(max_new_tokens=8, kl_tokens=4, batch_size=4)
    x, y = (measure(lm, sets, texts, options, console, "x") for lm in (spread, single))
    assert all(x.answers[k].responses == y.answers[k].responses for k in ("harmful", "benign"))
    assert x.reference is not None and y.reference is not None and x.reference.answer_ids == y.reference.answer_ids
    torch.testing.assert_close(torch.tensor(x.damage.text_nll), torch.tensor(y.damage.text_nll), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@multi_gpu
def test_select_and_evaluate_across_gpus_match_one_device(tiny_checkpoint):
    check_select_and_evaluate_spread(tiny_checkpoint, 0, 1)


@pytest.mark.gpu
@mps
def test_mps_hooks_equal_weight_edit():
    _hooks_equal_weights("mps", torch.float32, 1e-4)
