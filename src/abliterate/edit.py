"""Interventions on the residual stream: ablation and addition hooks, and weight orthogonalization."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import Architecture, Param, all_layer_writers, get, hidden_size, layers, post_norm_gain
from .errors import AbliterateError


def unit(vector: torch.Tensor) -> torch.Tensor:
    """The vector scaled to length one, in float64."""
    vector = vector.detach().double()
    return vector / vector.norm()


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
class EditParams:
    """How strongly and from which layer on the direction is removed.

    scale 1 removes the component fully; 0 < scale < 1 removes part of it; scale < 0 strengthens
    it (refusal induction). Writers in layers before start_layer are left alone, and the
    embeddings are edited only when start_layer is 0. norm_preserving rescales every vector a
    writer adds to the residual stream (a weight column, an embedding row, a bias) back to its
    original length after the edit; that exists only as a weight edit, not as hooks.
    """

    scale: float = 1.0
    start_layer: int = 0
    norm_preserving: bool = False


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
    scale, start = params.scale, params.start_layer
    pre, post = [], []
    if start == 0:
        for name in arch.embeddings:
            post.append((get(model, name), _output_hook(lambda x: _project_out(x, r, scale))))
    per_layer = zip(layers(model, arch), all_layer_writers(model, arch), writer_directions(model, arch, direction))
    for index, (layer, writers, directions) in enumerate(per_layer):
        if index < start:
            continue
        # A full projection of a clean stream is idempotent, so projecting layer inputs too changes
        # nothing numerically but guards against writers the table might miss. A partial one would
        # compound per layer, and with start_layer > 0 the stream is not clean, so skip it then.
        if scale == 1.0 and start == 0:
            pre.append((layer, _input_hook(lambda x: _project_out(x, r))))
        for writer, u in zip(writers, directions):
            post.append((get(layer, writer.output), _output_hook(lambda x, u=u: _project_out(x, u, scale))))
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
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return tied


def _residual_params(module: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(tensor, residual axis) for a module that writes to the residual stream."""
    if isinstance(module, nn.Embedding):
        return [(module.weight, 1)]
    if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
        return [(module.weight, 1)] + ([(module.bias, 0)] if module.bias is not None else [])
    if isinstance(module, nn.Linear):
        return [(module.weight, 0)] + ([(module.bias, 0)] if module.bias is not None else [])
    raise TypeError(f"don't know how {type(module).__name__} writes to the residual stream")


def _resolve_weights(root: nn.Module, spec: str | Param) -> list[tuple[torch.Tensor, int]]:
    if isinstance(spec, Param):
        return [(get(root, spec.path), spec.axis)]
    return _residual_params(get(root, spec))


@torch.no_grad()
def remove_component_(
    tensor: torch.Tensor, axis: int, u: torch.Tensor, scale: float = 1.0, preserve_norm: bool = False, chunk: int = 8192
) -> None:
    """In place: t <- t - scale * u (u . t) along `axis`, computed in float64 in chunks.

    With preserve_norm every vector along `axis` is then rescaled to its length before the edit
    (a vector that lay wholly along u stays zero).
    """
    u = u.to(tensor.device)
    shape = [1] * tensor.ndim
    shape[axis] = -1
    u_shaped = u.view(shape)
    chunk_dim = 0 if axis != 0 else 1
    if tensor.ndim == 1:
        parts = [tensor]
    else:
        parts = [
            tensor.narrow(chunk_dim, s, min(chunk, tensor.shape[chunk_dim] - s))
            for s in range(0, tensor.shape[chunk_dim], chunk)
        ]
    for part in parts:
        exact = part.double()
        length = exact.norm(dim=axis, keepdim=True) if preserve_norm else None
        coeff = torch.tensordot(exact, u, dims=([axis], [0])).unsqueeze(axis)
        exact.sub_(scale * coeff * u_shaped)  # in place: one float64 chunk fewer, same bits
        if length is not None:
            now = exact.norm(dim=axis, keepdim=True)
            exact.mul_(torch.where(now > 0, length / now.clamp_min(1e-300), torch.ones_like(now)))
        part.copy_(exact)


@dataclass(frozen=True)
class Target:
    """One tensor the weight edit changes: its parameter name, residual axis and the direction to remove."""

    name: str
    tensor: torch.Tensor
    axis: int
    direction: torch.Tensor


def edit_targets(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, params: EditParams = EditParams()
) -> list[Target]:
    """Every tensor `orthogonalize` edits, in order, with its axis and (gain-scaled) unit direction."""
    r = unit(direction)
    names = {id(p): n for n, p in model.named_parameters()}
    targets = []
    if params.start_layer == 0:
        for name in arch.embeddings:
            for tensor, axis in _residual_params(get(model, name)):
                targets.append(Target(names.get(id(tensor), name), tensor, axis, r))
    per_layer = zip(layers(model, arch), all_layer_writers(model, arch), writer_directions(model, arch, direction))
    for index, (layer, writers, directions) in enumerate(per_layer):
        if index < params.start_layer:
            continue
        for writer, u in zip(writers, directions):
            for spec in writer.weights:
                for tensor, axis in _resolve_weights(layer, spec):
                    targets.append(Target(names.get(id(tensor), str(spec)), tensor, axis, u))
    size = hidden_size(model)
    for target in targets:  # a table entry naming the wrong tensor fails here, before anything is edited
        if target.tensor.shape[target.axis] != size:
            raise AbliterateError(
                f"{target.name} has {target.tensor.shape[target.axis]} entries along its residual axis, not the "
                f"hidden size {size}; the architecture table entry for this model names the wrong tensor"
            )
    return targets


def orthogonalize(
    model: nn.Module, arch: Architecture, direction: torch.Tensor, params: EditParams = EditParams()
) -> list[str]:
    """Edit every residual-stream writer so its output loses (or gains) its component along the direction.

    Returns the names of the edited tensors. Tied embeddings are untied first.
    """
    untie_embeddings(model)
    targets = edit_targets(model, arch, direction, params)
    for target in targets:
        remove_component_(target.tensor, target.axis, target.direction, params.scale, params.norm_preserving)
    return [target.name for target in targets]
