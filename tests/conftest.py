"""Shared fixtures: tiny random models of many architectures, built from configs with no download."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 320


def tiny_config(model_type: str, **overrides):
    """A few-layer config of the given transformers model type."""
    kw = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=256,
    )
    if model_type == "gpt2":
        kw = dict(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=1, eos_token_id=2)
    if model_type in ("gemma2", "gemma3_text", "gemma"):
        kw.update(head_dim=16)
    if model_type in ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss"):
        kw.update(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                  shared_expert_intermediate_size=80)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, dtype=torch.float64, seed: int = 0, **overrides):
    """A randomly initialised tiny model in eval mode; biases randomised too so bias edits matter."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    model.to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def rng():
    """A seeded torch generator."""
    return torch.Generator().manual_seed(1234)
