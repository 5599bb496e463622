"""Interventions on the residual stream: ablation and addition hooks, and weight orthogonalization."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from abliterate.architectures import (
    Architecture,
    Param,
    WriterKind,
    all_layer_writers,
    get,
    hidden_size,
    input_embeddings,
    layers,
    post_norm_gain,
)
from abliterate.errors import AbliterateError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The dtypes the edit can work on: a quantized code (int8, uint8, float8) is not the weight it stands for.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Attributes that quantized linear layers (bitsandbytes, FP8, GPTQ/AWQ, compressed-tensors, HQQ) carry.
_QUANT_ATTRS = ("quant_state", "SCB", "weight_scale", "weight_scale_inv", "scales", "qweight", "quantization_scheme")


def unit(vector: torch.Tensor) -> torch.Tensor:
    """The vector scaled to length one, in float64; for several directions (rows), an orthonormal basis of their span.

    The basis keeps the first row's direction and sign, so one direction and a set led by it agree.
    """
    vector = vector.detach().double()
    if vector.ndim == 1:
        return vector / vector.norm()
    q, r = torch.linalg.qr(vector.T)  # Gram-Schmidt in row order: q's first column spans the first row
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).T


def writer_directions(model: nn.Module, arch: Architecture, direction: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per layer and writer (in `all_layer_writers` order), the direction to remove from its output.

    A writer followed by a norm (out = g * y / rms(y)) has no component along r exactly when y has
    none along g*r, so the edit there uses the gain-scaled direction.
    """
    r = unit(direction)
    size = hidden_size(model)
    result = []
    for layer, writers in zip(layers(model, arch), all_layer_writers(model, arch)):
        per_writer = []
        for writer in writers:
            if writer.post_norm is None:
                per_writer.append(r)
            else:
                gain = post_norm_gain(get(layer, writer.post_norm), size).to(r.device)
                per_writer.append(unit(gain * r))
        result.append(per_writer)
    return result


def _project_out(x: torch.Tensor, u: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    u = u.to(device=x.device, dtype=x.dtype)
    if u.ndim == 2:  # orthonormal rows: remove the component in their span
        return x - scale * (x @ u.T) @ u
    return x - scale * (x @ u).unsqueeze(-1) * u


def _edit_first(output, fn):
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@contextlib.contextmanager
def add_hooks(pre_hooks: list, post_hooks: list) -> Iterator[None]:
    """Register (module, fn) forward pre-hooks and forward hooks; remove them all on exit."""
    handles = []
    try:
        for module, fn in pre_hooks:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in post_hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_hook(edit):
    def hook(module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    return hook


def _output_hook(edit):
    def hook(module, args, output):
        return _edit_first(output, edit)

    return hook


@dataclass(frozen=True)
class Profile:
    """An edit strength over layers: `peak` at layer `center`, linear to `floor` at `width` layers away, 0 beyond."""

    peak: float
    center: float
    width: float
    floor: float = 0.0

    def at(self, layer: int) -> float:
        """The strength at one layer."""
        distance = abs(layer - self.center)
        if distance > self.width:
            return 0.0
        return self.peak + (self.floor - self.peak) * (distance / self.width if self.width > 0 else 0.0)


@dataclass(frozen=True)
class EditParams:
    """How strongly, and in which layers and writers, the direction is removed.

    scale 1 removes the component fully; 0 < scale < 1 removes part of it; scale < 0 strengthens
    it (refusal induction). Writers in layers before start_layer are left alone, and the
    embeddings are edited only when start_layer is 0. A profile, where given, sets the strength of
    every token-mixer (`attention`) or feed-forward (`mlp`) writer layer by layer instead, and
    `embeddings` says whether the embeddings are edited (at `scale`). norm_preserving rescales every
    vector a writer adds to the residual stream (a weight column, an embedding row, a bias) back to
    its original length after the edit; that exists only as a weight edit, not as hooks.
    """

    scale: float = 1.0
    start_layer: int = 0
    norm_preserving: bool = False
    attention: Profile | None = None
    mlp: Profile | None = None
    embeddings: bool | None = None  # None: when start_layer is 0

    def writer_scale(self, layer: int, kind: WriterKind) -> float:
        """The strength of one writer's edit: its kind's profile at this layer, else scale from start_layer on."""
        profile = self.attention if kind == "mixer" else self.mlp
        if profile is not None:
            return profile.at(layer)
        return self.scale if layer >= self.start_layer else 0.0

    @property
    def embedding_scale(self) -> float:
        """The strength of the embeddings' edit (0: left alone)."""
        edited = self.start_layer == 0 if self.embeddings is None else self.embeddings
        return self.scale if edited else 0.0

    def describe(self) -> str:
        """The edit in words, for the card and the report."""
        if self.attention is None and self.mlp is None:
            where = f"at scale {self.scale:g} (1 = full projection), writers from layer {self.start_layer} on"
        else:
            kind = lambda name, p: (  # noqa: E731
                f"{name} writers {p.peak:.2f} at layer {p.center:.1f}, falling to {p.floor:.2f} over {p.width:.1f} layers"
                if p
                else f"{name} writers at scale {self.scale:g} from layer {self.start_layer} on"
            )
            where = f"{kind('attention', self.attention)}; {kind('feed-forward', self.mlp)}"
        where += "; embeddings " + ("edited" if self.embedding_scale else "left alone")
        if self.norm_preserving:
            where += "; norm-preserving: every vector a writer adds to the residual stream keeps its original length"
        return where

    @property
    def full(self) -> bool:
        """Whether every writer and the embeddings lose the whole component: the stream then carries none of it."""
        return (
            self.scale == 1.0
            and self.start_layer == 0
            and self.attention is None
            and self.mlp is None
            and (self.embeddings is not False)
        )


@contextlib.contextmanager
def ablation(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, params: EditParams = EditParams()
) -> Iterator[None]:
    """Project the direction out of the residual stream while the context is open.

    Edits the embeddings' output, the input of every layer and every writer's output, so the
    result equals the weight edit exactly; the model is unchanged on exit.
    """
    if params.norm_preserving:
        raise ValueError("a norm-preserving edit rescales weights per input; it has no hook form: use orthogonalize")
    r = unit(direction)
    pre, post = [], []
    if params.embedding_scale:
        for name in arch.embeddings:
            post.append((get(model, name), _output_hook(lambda x: _project_out(x, r, params.embedding_scale))))
    per_layer = zip(layers(model, arch), all_layer_writers(model, arch), writer_directions(model, arch, direction))
    for index, (layer, writers, directions) in enumerate(per_layer):
        # A full projection of a clean stream is idempotent, so projecting layer inputs too changes
        # nothing numerically but guards against writers the table might miss. A partial one would
        # compound per layer, and with start_layer > 0 the stream is not clean, so skip it then.
        if params.full:
            pre.append((layer, _input_hook(lambda x: _project_out(x, r))))
        for writer, u in zip(writers, directions):
            scale = params.writer_scale(index, writer.kind)
            if scale:
                post.append((get(layer, writer.output), _output_hook(lambda x, u=u, s=scale: _project_out(x, u, s))))
    with add_hooks(pre, post):
        yield


@contextlib.contextmanager
def addition(model: nn.Module, arch: Architecture, vector: torch.Tensor, layer: int) -> Iterator[None]:
    """Add a vector to the residual stream at the input of one layer, at every position."""
    vec = vector.detach()

    def add(x: torch.Tensor) -> torch.Tensor:
        return x + vec.to(device=x.device, dtype=x.dtype)

    with add_hooks([(layers(model, arch)[layer], _input_hook(add))], []):
        yield


def untie_embeddings(model: nn.Module) -> bool:
    """Give the output head its own copy of tied embeddings, so editing one leaves the other."""
    hf = cast("PreTrainedModel", model)
    head = hf.get_output_embeddings()
    embed = input_embeddings(model)
    # Identity, not data_ptr(): every tensor on the meta device (offloaded weights) has data_ptr() 0.
    tied = head is not None and head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    for config in (hf.config, getattr(hf.config, "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return tied


def _quantized(module: nn.Module | None, tensor: torch.Tensor) -> str | None:
    """Why a tensor holds quantized codes rather than float weights, or None if it is a plain float tensor."""
    if tensor.dtype not in FLOAT_DTYPES:
        return f"its dtype is {str(tensor.dtype).replace('torch.', '')}"
    if type(tensor) not in (torch.Tensor, nn.Parameter):  # Params4bit, Int8Params, torchao tensor subclasses
        return f"it is a {type(tensor).__name__}"
    if module is not None:
        library = type(module).__module__.split(".")[0]
        found = [a for a in _QUANT_ATTRS if getattr(module, a, None) is not None]
        if found or library in (
            "bitsandbytes",
            "auto_gptq",
            "gptqmodel",
            "awq",
            "compressed_tensors",
            "hqq",
            "torchao",
        ):
            return f"its module is a quantized {type(module).__name__}"
    return None


def _refuse_quantized(name: str, tensor: torch.Tensor, module: nn.Module | None = None) -> None:
    reason = _quantized(module, tensor)
    if reason:
        raise AbliterateError(
            f"{name} is quantized ({reason}); abliterate edits float weights only: use the model's unquantized "
            "(float16, bfloat16 or float32) checkpoint"
        )


def check_editable(name: str, tensor: torch.Tensor, module: nn.Module | None = None) -> None:
    """Refuse a tensor the float64 edit would corrupt: quantized codes, or weights offloaded to the meta device."""
    _refuse_quantized(name, tensor, module)
    if tensor.device.type == "meta":
        raise AbliterateError(
            f"{name} is offloaded (on the meta device): there is not enough memory to hold the model; edit the saved "
            "folder with `abliterate apply`, which works shard by shard, or use a machine with more memory"
        )


def _residual_params(module: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(tensor, residual axis) for a module that writes to the residual stream."""
    if isinstance(module, nn.Embedding):
        return [(module.weight, 1)]
    if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
        return [(module.weight, 1)] + ([(module.bias, 0)] if module.bias is not None else [])
    if isinstance(module, nn.Linear):
        return [(module.weight, 0)] + ([(module.bias, 0)] if module.bias is not None else [])
    raise AbliterateError(
        f"abliterate does not know how a {type(module).__name__} writes to the residual stream; it edits nn.Linear, "
        "nn.Embedding and Conv1D weights (a quantized checkpoint has other layers: use an unquantized one)"
    )


def _resolve_weights(root: nn.Module, spec: str | Param) -> list[tuple[torch.Tensor, int]]:
    if isinstance(spec, Param):
        return [(get(root, spec.path), spec.axis)]
    return _residual_params(get(root, spec))


def _as_float64(part: torch.Tensor) -> torch.Tensor:
    """A float64 copy of one chunk (its own function so tests can see each chunk's size)."""
    return part.to(torch.float64, copy=True)  # a copy even in float64: the source must survive an edit into `out`


@torch.no_grad()
def remove_component_(
    tensor: torch.Tensor,
    axis: int,
    u: torch.Tensor,
    scale: float = 1.0,
    preserve_norm: bool = False,
    chunk: int = 8192,
    out: torch.Tensor | None = None,
) -> None:
    """In place: t <- t - scale * u (u . t) along `axis`, computed in float64 in chunks.

    With `out` (same shape, any float dtype) the result goes there instead, rounded once from float64.
    A tensor of three or more dimensions (fused experts) is edited one leading slice at a time, so no
    float64 copy is larger than `chunk` vectors. With preserve_norm every vector along `axis` is then
    rescaled to its length before the edit (a vector that lay wholly along u stays zero). A 2-D `u`
    holds several orthonormal directions as rows; the component in their span is removed.
    """
    check_editable("the tensor to edit", tensor)
    out = tensor if out is None else out
    if out.shape != tensor.shape or out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"out must be a float tensor of shape {tuple(tensor.shape)}")
    axis = axis % tensor.ndim
    if tensor.ndim > 2 and axis != 0:
        for index in range(tensor.shape[0]):
            remove_component_(tensor[index], axis - 1, u, scale, preserve_norm, chunk, out[index])
        return
    u = u.to(tensor.device, torch.float64)
    shape = [1] * tensor.ndim
    shape[axis] = -1
    u_shaped = u.view(shape) if u.ndim == 1 else None  # several directions: see below
    chunk_dim = 0 if axis != 0 else 1
    if tensor.ndim == 1:
        parts = [(tensor, out)]
    else:
        size = tensor.shape[chunk_dim]
        parts = [
            (tensor.narrow(chunk_dim, s, min(chunk, size - s)), out.narrow(chunk_dim, s, min(chunk, size - s)))
            for s in range(0, size, chunk)
        ]
    for part, target in parts:
        exact = _as_float64(part)
        length = exact.norm(dim=axis, keepdim=True) if preserve_norm else None
        if u_shaped is not None:
            coeff = torch.tensordot(exact, u, dims=([axis], [0])).unsqueeze(axis)
            exact.sub_(scale * coeff * u_shaped)  # in place: one float64 chunk fewer, same bits
        else:  # orthonormal rows of u: the residual axis last (a view), minus its component in their span
            moved = exact.movedim(axis, -1)
            moved.sub_(scale * (moved @ u.T) @ u)
        if length is not None:
            now = exact.norm(dim=axis, keepdim=True)
            exact.mul_(torch.where(now > 0, length / now.clamp_min(1e-300), torch.ones_like(now)))
        target.copy_(exact)


@dataclass(frozen=True)
class Target:
    """One tensor the weight edit changes: its parameter name, residual axis, the direction and how much of it."""

    name: str
    tensor: torch.Tensor
    axis: int
    direction: torch.Tensor
    scale: float = 1.0


def edit_targets(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, params: EditParams = EditParams()
) -> list[Target]:
    """Every tensor `orthogonalize` edits, in order, with its axis, (gain-scaled) unit direction and strength.

    Writers whose strength is 0 are not targets: they are left bit for bit as they are.
    """
    r = unit(direction)
    names = {id(p): n for n, p in model.named_parameters()}
    targets = []
    modules = []  # the module each target belongs to (None for a raw parameter), to spot quantized layers
    if params.embedding_scale:
        for name in arch.embeddings:
            for tensor, axis in _residual_params(get(model, name)):
                targets.append(Target(names.get(id(tensor), name), tensor, axis, r, params.embedding_scale))
                modules.append(get(model, name))
    per_layer = zip(layers(model, arch), all_layer_writers(model, arch), writer_directions(model, arch, direction))
    for index, (layer, writers, directions) in enumerate(per_layer):
        for writer, u in zip(writers, directions):
            scale = params.writer_scale(index, writer.kind)
            if not scale:
                continue
            for spec in writer.weights:
                for tensor, axis in _resolve_weights(layer, spec):
                    targets.append(Target(names.get(id(tensor), str(spec)), tensor, axis, u, scale))
                    modules.append(None if isinstance(spec, Param) else get(layer, spec))
    for target, module in zip(targets, modules):  # quantized codes are refused before anything is edited
        _refuse_quantized(target.name, target.tensor, module)
    size = hidden_size(model)
    for target in targets:  # a table entry naming the wrong tensor fails here, before anything is edited
        if target.tensor.shape[target.axis] != size:
            raise AbliterateError(
                f"{target.name} has {target.tensor.shape[target.axis]} entries along its residual axis, not the "
                f"hidden size {size}; the architecture table entry for this model names the wrong tensor"
            )
    return targets


def orthogonalize(
    model: nn.Module,
    arch: Architecture,
    direction: torch.Tensor,
    params: EditParams = EditParams(),
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Edit every residual-stream writer so its output loses (or gains) its component along the direction.

    Returns the names of the edited tensors. Tied embeddings are untied first. With `dtype` each edited
    tensor is rounded once from float64 straight to that dtype (the caller casts the others).
    """
    untie_embeddings(model)
    targets = edit_targets(model, arch, direction, params)
    for target in targets:  # quantized codes were refused by edit_targets; offloaded weights are refused here
        check_editable(target.name, target.tensor)
    for target in targets:
        if dtype is None or dtype == target.tensor.dtype:
            remove_component_(target.tensor, target.axis, target.direction, target.scale, params.norm_preserving)
        else:
            result = torch.empty(target.tensor.shape, dtype=dtype, device=target.tensor.device)
            remove_component_(
                target.tensor, target.axis, target.direction, target.scale, params.norm_preserving, out=result
            )
            target.tensor.data = result  # the same Parameter object, now holding the edit in `dtype`
    return [target.name for target in targets]


@contextlib.contextmanager
def trial_edit(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, params: EditParams = EditParams()
) -> Iterator[None]:
    """The edit while the context is open, the model bit for bit as before on exit.

    Hooks where they equal the weight edit; a norm-preserving edit has no hook form, so its weights
    are edited in place and every edited tensor is restored from a copy (tied embeddings re-tied).
    """
    if not params.norm_preserving:
        with ablation(model, arch, direction, params):
            yield
        return
    hf = cast("PreTrainedModel", model)
    head, embed = hf.get_output_embeddings(), input_embeddings(model)
    tied = head is not None and head.weight is embed.weight
    config_tied = [(c, c.tie_word_embeddings) for c in (hf.config, getattr(hf.config, "text_config", None))
                   if c is not None and hasattr(c, "tie_word_embeddings")]  # fmt: skip
    saved = [(t.tensor, t.tensor.detach().clone()) for t in edit_targets(model, arch, direction, params)]
    try:
        orthogonalize(model, arch, direction, params)  # checks every target before editing any; unties (re-tied below)
        yield
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)
        if tied and head.weight is not embed.weight:
            head.weight = embed.weight
        for config, value in config_tied:
            config.tie_word_embeddings = value


def removal_tolerance(dtype: torch.dtype) -> float:
    """The largest share |x.r| / |x| of the residual stream a full removal may leave, from rounding alone.

    About 100x what rounding leaves on 64-wide test models (4e-8, 2e-4, 1.5e-3); wider models leave less.
    """
    return {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 1e-2}.get(dtype, 2e-2)


@torch.no_grad()
def check_removed(
    model: nn.Module,
    arch: Architecture,
    token_ids: list[list[int]],
    direction: torch.Tensor,
    tolerance: float | None = None,
) -> float:
    """After a full removal, fail if any layer's input or the last layer's output keeps a component along r.

    Runs each token sequence alone (no padding) and returns the largest |x.r| / |x| seen. A writer
    the architecture table misses shows up here as an error naming the first layer whose input
    carries the component, never as a silently weaker edit.
    """
    r = unit(direction)
    embed = input_embeddings(model).weight
    tolerance = removal_tolerance(embed.dtype) if tolerance is None else tolerance
    blocks = layers(model, arch)
    worst = [0.0] * (len(blocks) + 1)  # inputs of layers 0..L-1, then the output of the last layer

    def record(index: int, x: torch.Tensor) -> None:
        x = x.detach().double()
        u = r.to(x.device)
        along = (x @ u.T).norm(dim=-1) if u.ndim == 2 else (x @ u).abs()  # several directions: their span
        share = along / x.norm(dim=-1).clamp_min(1e-30)
        worst[index] = max(worst[index], share.max().item())

    pre = [(block, lambda m, a, k, i=i: record(i, a[0] if a else k["hidden_states"])) for i, block in enumerate(blocks)]
    post = [(blocks[-1], lambda m, a, o: record(len(blocks), o[0] if isinstance(o, tuple) else o))]
    with add_hooks(pre, post):
        for ids in filter(len, token_ids):
            model(input_ids=torch.tensor([list(ids)], device=embed.device), use_cache=False)
    for index, share in enumerate(worst):
        if share > tolerance:
            where = f"the input of decoder layer {index}" if index < len(blocks) else "the output of the last layer"
            culprit = "the embeddings" if index == 0 else f"decoder layer {index - 1}"
            raise AbliterateError(
                f"after the edit, {where} still has {share:.2g} of its length along the direction (tolerance "
                f"{tolerance:g}): a writer of {culprit} is missing from the architecture table entry for this "
                "model; nothing was saved, report the model type"
            )
    return max(worst)
