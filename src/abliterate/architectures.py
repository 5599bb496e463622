"""Declarative table of model families: where the layers are and what writes to the residual stream."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _llama_like(prefix: str = "model", mlp_out: str = "mlp.down_proj", **kw) -> Architecture:
    return Architecture(
        layers=f"{prefix}.layers",
        embeddings=(f"{prefix}.embed_tokens",),
        writers=(Writer("self_attn", ("self_attn.o_proj",)), Writer("mlp", (mlp_out,))),
        final_norm=f"{prefix}.norm",
        **kw,
    )


def _post_normed(prefix: str = "model") -> Architecture:
    return Architecture(
        layers=f"{prefix}.layers",
        embeddings=(f"{prefix}.embed_tokens",),
        writers=(
            Writer("self_attn", ("self_attn.o_proj",), post_norm="post_attention_layernorm"),
            Writer("mlp", ("mlp.down_proj",), post_norm="post_feedforward_layernorm"),
        ),
        final_norm=f"{prefix}.norm",
    )


def _fused_moe(down_axis: int, bias: bool = False, shared: str | None = None) -> Architecture:
    mlp: tuple = (Param("mlp.experts.down_proj", down_axis),)
    if bias:
        mlp += (Param("mlp.experts.down_proj_bias", 1),)
    if shared:
        mlp += (shared,)
    return Architecture(
        layers="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(Writer("self_attn", ("self_attn.o_proj",)), Writer("mlp", mlp)),
        final_norm="model.norm",
        fused_experts=True,
    )


_GPT2 = Architecture(
    layers="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    writers=(Writer("attn", ("attn.c_proj",)), Writer("mlp", ("mlp.c_proj",))),
    final_norm="transformer.ln_f",
)

ARCHITECTURES: dict[str, Architecture] = {
    **{t: _llama_like() for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma", "cohere")},
    "starcoder2": _llama_like(mlp_out="mlp.c_proj"),
    "gemma2": _post_normed(),
    "gemma3_text": _post_normed(),
    "olmo2": _post_normed(),
    "gpt2": _GPT2,
    "gpt_neox": Architecture(
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        writers=(Writer("attention", ("attention.dense",)), Writer("mlp", ("mlp.dense_4h_to_h",))),
        final_norm="gpt_neox.final_layer_norm",
    ),
    "mixtral": _fused_moe(down_axis=1),
    "qwen3_moe": _fused_moe(down_axis=1),
    "qwen2_moe": _fused_moe(down_axis=1, shared="mlp.shared_expert.down_proj"),
    "gpt_oss": _fused_moe(down_axis=2, bias=True),
}


def model_type(model: nn.Module) -> str:
    """The transformers model_type of the text tower."""
    config = model.config
    return getattr(getattr(config, "text_config", None), "model_type", None) or config.model_type


def architecture_for(model: nn.Module) -> Architecture:
    """Look up a model's architecture; unknown families get an error naming what to add."""
    kind = model_type(model)
    arch = ARCHITECTURES.get(kind)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise AbliterateError(
            f"model type '{kind}' is not in abliterate's architecture table (known: {known}); "
            "add an entry to abliterate/architectures.py naming its layers and residual writers"
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
