"""Declarative table of model families: where the layers are and what writes to the residual stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from abliterate.errors import AbliterateError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Param:
    """A raw parameter (not a Linear) that writes to the residual stream, with its residual axis."""

    path: str
    axis: int


WriterKind = Literal["mixer", "mlp"]  # what an edit's per-layer profile is chosen for


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
    kind: WriterKind = "mlp"  # "mixer": attention or another token mixer; "mlp": a feed-forward block or experts


@dataclass(frozen=True)
class Absent:
    """An alternative that matches a layer lacking this module (a dense layer of a MoE-capable family)."""

    path: str


@dataclass(frozen=True)
class OneOf:
    """A sub-block whose writer depends on the layer's type (attention or linear attention, MLP or MoE).

    Each layer takes the first alternative whose modules it all has (list the most specific first); a
    layer that matches none is an error, never a silent partial edit.
    """

    kind: str
    alternatives: tuple[Writer | Absent, ...]


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its decoder layers, embeddings and residual-stream writers."""

    layers: str
    embeddings: tuple[str, ...]
    writers: tuple[Writer | OneOf, ...]
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
            Writer(attn, (f"{attn}.{attn_out}",), post_norm=post_norms[0], kind="mixer"),
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


_ATTENTION = Writer("self_attn", ("self_attn.o_proj",), kind="mixer")


def _mixer(other: Writer, attention: Writer = _ATTENTION) -> OneOf:
    """Hybrids: some layers mix tokens with attention, the others with a recurrent or convolutional block."""
    return OneOf("token mixer", (other, attention))


def _mamba(path: str = "mamba") -> Writer:
    return Writer(path, (f"{path}.out_proj",), kind="mixer")


def _moe_or_dense(mlp: str = "mlp", shared: str | None = "shared_experts", down_axis: int = 1) -> OneOf:
    """Fused routed experts (plus a shared expert) in some layers, a dense MLP in the others."""
    routed: tuple = (Param(f"{mlp}.experts.down_proj", down_axis),)
    routed += (f"{mlp}.{shared}.down_proj",) if shared else ()
    return OneOf("feed-forward", (Writer(mlp, routed), Writer(mlp, (f"{mlp}.down_proj",))))


def _hybrid(*writers: Writer | OneOf, final_norm: str = "norm", fused_experts: bool = True) -> Architecture:
    """A decoder whose layers differ by type: `model.layers`, `model.embed_tokens`, the given writers."""
    return Architecture("model.layers", ("model.embed_tokens",), writers, f"model.{final_norm}", fused_experts)


_GATED_DELTA = _mixer(Writer("linear_attn", ("linear_attn.out_proj",), kind="mixer"))
_LFM2_MIXER = _mixer(
    Writer("conv", ("conv.out_proj",), kind="mixer"), Writer("self_attn", ("self_attn.out_proj",), kind="mixer")
)
_LFM2_MLP = Writer("feed_forward", ("feed_forward.w2",))

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
        writers=(Writer("attn", ("attn.c_proj",), kind="mixer"), Writer("mlp", ("mlp.c_proj",))),
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": Architecture(
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        writers=(Writer("attention", ("attention.dense",), kind="mixer"), Writer("mlp", ("mlp.dense_4h_to_h",))),
        final_norm="gpt_neox.final_layer_norm",
    ),
    **{t: _fused_moe() for t in ("mixtral", "qwen3_moe", "olmoe", "phimoe")},
    "granitemoe": _fused_moe(mlp="block_sparse_moe"),
    "qwen2_moe": _fused_moe(shared="shared_expert"),
    "gpt_oss": _fused_moe(down_axis=2, bias=True),
    # Heterogeneous layers: a OneOf picks each layer's writer by which modules that layer has.
    **{t: _hybrid(_ATTENTION, _moe_or_dense()) for t in ("deepseek_v2", "deepseek_v3", "glm4_moe")},
    "llama4_text": _hybrid(_ATTENTION, _moe_or_dense("feed_forward", "shared_expert", down_axis=2)),
    # Qwen3-Next and Qwen 3.5: gated-delta linear attention in most layers, full attention in the rest.
    **{t: _hybrid(_GATED_DELTA, _moe_or_dense(shared="shared_expert")) for t in ("qwen3_next", "qwen3_5_moe_text")},
    "qwen3_5_text": _hybrid(_GATED_DELTA, Writer("mlp", ("mlp.down_proj",)), fused_experts=False),
    # LFM2 applies its "embedding_norm" after the last layer; LFM2-MoE's first layers are dense.
    "lfm2": _hybrid(_LFM2_MIXER, _LFM2_MLP, final_norm="embedding_norm", fused_experts=False),
    "lfm2_moe": _hybrid(
        _LFM2_MIXER,
        OneOf("feed-forward", (Writer("feed_forward", (Param("feed_forward.experts.down_proj", 1),)), _LFM2_MLP)),
        final_norm="embedding_norm",
    ),
    "jamba": _hybrid(_mixer(_mamba()), _moe_or_dense("feed_forward", shared=None), final_norm="final_layernorm"),
    "bamba": _hybrid(
        _mixer(_mamba()),
        Writer("feed_forward", ("feed_forward.down_proj",)),
        final_norm="final_layernorm",
        fused_experts=False,
    ),
    # Granite 4: Mamba or attention; routed experts unless the model is dense; a shared MLP always.
    "granitemoehybrid": _hybrid(
        _mixer(_mamba()),
        OneOf(
            "routed experts",
            (Writer("block_sparse_moe", (Param("block_sparse_moe.experts.down_proj", 1),)), Absent("block_sparse_moe")),
        ),
        Writer("shared_mlp", ("shared_mlp.output_linear",)),
    ),
    # Falcon-H1 runs Mamba and attention side by side in every layer: both write to the stream.
    "falcon_h1": _hybrid(
        _mamba(),
        _ATTENTION,
        Writer("feed_forward", ("feed_forward.down_proj",)),
        final_norm="final_layernorm",
        fused_experts=False,
    ),
    # Nemotron-H: each block is one mixer (Mamba, attention, MLP or MoE) under the same name. A latent
    # MoE's experts write to a smaller space that fc2_latent_proj maps into the stream, so it is listed
    # before the plain MoE (the first match wins).
    "nemotron_h": Architecture(
        layers="model.layers",
        embeddings=("model.embeddings",),
        writers=(
            OneOf(
                "mixer",
                (
                    _mamba("mixer"),
                    Writer("mixer", ("mixer.o_proj",), kind="mixer"),
                    Writer("mixer", ("mixer.down_proj",)),
                    Writer("mixer", ("mixer.fc2_latent_proj", "mixer.shared_experts.down_proj")),
                    Writer("mixer", (Param("mixer.experts.down_proj", 1), "mixer.shared_experts.down_proj")),
                ),
            ),
        ),
        final_norm="model.norm_f",
        fused_experts=True,
    ),
}


def model_type(model: nn.Module) -> str:
    """The transformers model_type of the text tower."""
    config: Any = model.config  # a transformers config: which attributes it has depends on the family
    return getattr(getattr(config, "text_config", None), "model_type", None) or config.model_type


def model_types(model: nn.Module) -> tuple[str, ...]:
    """The model's own model_type, then its text tower's if it has one (a VLM is tabled under its own)."""
    config: Any = model.config
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


def _has(root: nn.Module, path: str) -> bool:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)  # hybrids set the sublayer a layer lacks to None
        if obj is None:
            return False
    return True


def _matches(layer: nn.Module, alternative: Writer | Absent) -> bool:
    if isinstance(alternative, Absent):
        return not _has(layer, alternative.path)
    paths = [alternative.output, alternative.post_norm]
    # A module writer must have a weight: an nn.Identity standing in for an unused projection does not count.
    paths += [w.path if isinstance(w, Param) else f"{w}.weight" for w in alternative.weights]
    return all(_has(layer, p) for p in paths if p)


def _describe(alternative: Writer | Absent) -> str:
    if isinstance(alternative, Absent):
        return f"no {alternative.path}"
    return " + ".join(w.path if isinstance(w, Param) else w for w in alternative.weights)


def layer_writers(layer: nn.Module, arch: Architecture, index: int) -> tuple[Writer, ...]:
    """The writers of one decoder layer: plain writers, and each OneOf's one alternative this layer has."""
    found = []
    for spec in arch.writers:
        if isinstance(spec, Writer):
            found.append(spec)
            continue
        matched = next((alt for alt in spec.alternatives if _matches(layer, alt)), None)
        if matched is None:
            options = "; ".join(_describe(alt) for alt in spec.alternatives)
            raise AbliterateError(
                f"decoder layer {index} ({type(layer).__name__}) has none of the {spec.kind} writers the "
                f"architecture table lists ({options}); add this layer type's writer to the model's entry "
                "in abliterate/architectures.py"
            )
        if isinstance(matched, Writer):
            found.append(matched)
    return tuple(found)


def all_layer_writers(model: nn.Module, arch: Architecture) -> list[tuple[Writer, ...]]:
    """Every decoder layer's writers, in layer order (errors before anything is edited)."""
    return [layer_writers(layer, arch, i) for i, layer in enumerate(layers(model, arch))]


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    config: Any = getattr(model.config, "text_config", None) or model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding of a transformers model (its weight is vocab x hidden)."""
    return cast(nn.Embedding, cast("PreTrainedModel", model).get_input_embeddings())


def post_norm_gain(norm: nn.Module, size: int) -> torch.Tensor:
    """Effective elementwise gain of a norm, measured rather than read (Gemma stores 1+w)."""
    param = next(norm.parameters())
    ones = torch.ones(1, size, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        # A ones vector has RMS 1, so the output is the gain up to eps, and only its direction matters.
        return norm(ones)[0].double()
