"""Accelerators: these run wherever a GPU is present and skip with a reason elsewhere."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from abliterate import model as M
from abliterate.architectures import architecture_for
from abliterate.capture import collect
from abliterate.edit import ablation, orthogonalize
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


@pytest.mark.gpu
@mps
def test_mps_hooks_equal_weight_edit():
    _hooks_equal_weights("mps", torch.float32, 1e-4)
