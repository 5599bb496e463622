"""Declarative table of model families: where the layers are and what writes to the residual stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import AbliterateError


@dataclass(frozen=True)
class Param:
    """A raw parameter (not a Linear) that writes to the residual stream, with its residual axis."""

    path: str
    axis: int


@dataclass(frozen=True)
class Writer:
    """A sublayer whose output is added to the residual stream.

    `output` is the module whose output the ablation hook edits; `weights` are the modules or raw
    parameters that produce it. `post_norm` names a norm applied to the output before the add
    (Gemma 2/3, OLMo 2): the edit then uses the norm-gain-scaled direction.
    """

    output: str
    weights: tuple[str | Param, ...]
    post_norm: str | None = None


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its decoder layers, embeddings and residual-stream writers."""

    layers: str
    embeddings: tuple[str, ...]
    writers: tuple[Writer, ...]
    final_norm: str
    fused_experts: bool = False


def _decoder(
    mlp_weights: tuple[str | Param, ...] = ("mlp.down_proj",),
    *,
    prefix: str = "model",
    attn: str = "self_attn",
    attn_out: str = "o_proj",
    mlp: str = "mlp",
    post_norms: tuple[str | None, str | None] = (None, None),
    final_norm: str = "norm",
    **kw,
) -> Architecture:
    """The common shape: `prefix.layers`, `prefix.embed_tokens`, one attention and one MLP writer per layer."""
    return Architecture(
        layers=f"{prefix}.layers",
        embeddings=(f"{prefix}.embed_tokens",),
        writers=(
            Writer(attn, (f"{attn}.{attn_out}",), post_norm=post_norms[0]),
            Writer(mlp, mlp_weights, post_norm=post_norms[1]),
        ),
        final_norm=f"{prefix}.{final_norm}",
        **kw,
    )


def _post_normed(
    prefix: str = "model", norms=("post_attention_layernorm", "post_feedforward_layernorm")
) -> Architecture:
    """Each sublayer's output is normed before the add (Gemma 2/3, OLMo 2/3, EXAONE 4, GLM-4)."""
    return _decoder(prefix=prefix, post_norms=norms)


def _fused_moe(down_axis: int = 1, bias: bool = False, shared: str | None = None, mlp: str = "mlp") -> Architecture:
    """Routed experts stored as one 3-D `down_proj` tensor, optionally with a bias and a shared expert.

    transformers 5 fuses the experts of every decoder-only MoE this way; only the encoder-decoder
    nllb_moe and switch_transformers still keep one module per expert.
    """
    weights: tuple = (Param(f"{mlp}.experts.down_proj", down_axis),)
    if bias:
        weights += (Param(f"{mlp}.experts.down_proj_bias", 1),)
    if shared:
        weights += (f"{mlp}.{shared}.down_proj",)
    return _decoder(weights, mlp=mlp, fused_experts=True)


_LLAMA_LIKE = "llama mistral qwen2 qwen3 phi3 granite gemma cohere cohere2 smollm3 olmo helium".split()

ARCHITECTURES: dict[str, Architecture] = {
    **{t: _decoder() for t in _LLAMA_LIKE},
    "starcoder2": _decoder(("mlp.c_proj",)),
    "phi": _decoder(("mlp.fc2",), attn_out="dense", final_norm="final_layernorm"),
    **{t: _post_normed() for t in ("gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4")},
    "glm4": _post_normed(norms=("post_self_attn_layernorm", "post_mlp_layernorm")),
    "gemma3": _post_normed(prefix="model.language_model"),  # Gemma3ForConditionalGeneration's text tower
    "gpt2": Architecture(
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        writers=(Writer("attn", ("attn.c_proj",)), Writer("mlp", ("mlp.c_proj",))),
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": Architecture(
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        writers=(Writer("attention", ("attention.dense",)), Writer("mlp", ("mlp.dense_4h_to_h",))),
        final_norm="gpt_neox.final_layer_norm",
    ),
    **{t: _fused_moe() for t in ("mixtral", "qwen3_moe", "olmoe", "phimoe")},
    "granitemoe": _fused_moe(mlp="block_sparse_moe"),
    "qwen2_moe": _fused_moe(shared="shared_expert"),
    "gpt_oss": _fused_moe(down_axis=2, bias=True),
}


def model_type(model: nn.Module) -> str:
    """The transformers model_type of the text tower."""
    config = model.config
    return getattr(getattr(config, "text_config", None), "model_type", None) or config.model_type


def model_types(model: nn.Module) -> tuple[str, ...]:
    """The model's own model_type, then its text tower's if it has one (a VLM is tabled under its own)."""
    config = model.config
    return tuple(dict.fromkeys(t for t in (config.model_type, model_type(model)) if t))


def architecture_for(model: nn.Module) -> Architecture:
    """Look up a model's architecture; unknown families get an error naming what to add."""
    kinds = model_types(model)
    arch = next((ARCHITECTURES[k] for k in kinds if k in ARCHITECTURES), None)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        tried = " or ".join(f"'{k}'" for k in kinds)
        raise AbliterateError(
            f"model type {tried} is not in abliterate's architecture table (known: {known}); "
            f"add an entry for '{kinds[0]}' to abliterate/architectures.py naming its decoder layers, "
            "embeddings and residual-stream writers"
        )
    return arch


def get(root: nn.Module, path: str):
    """Resolve a dotted path to a submodule or parameter, with a clear error if it is missing."""
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AbliterateError(
                f"{type(root).__name__} has no '{path}' (missing '{part}'); "
                "the architecture table entry does not match this model"
            )
        obj = getattr(obj, part)
    return obj


def layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    """The decoder layers."""
    return get(model, arch.layers)


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    config = getattr(model.config, "text_config", None) or model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def post_norm_gain(norm: nn.Module, size: int) -> torch.Tensor:
    """Effective elementwise gain of a norm, measured rather than read (Gemma stores 1+w)."""
    param = next(norm.parameters())
    ones = torch.ones(1, size, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        # A ones vector has RMS 1, so the output is the gain up to eps, and only its direction matters.
        return norm(ones)[0].double()
