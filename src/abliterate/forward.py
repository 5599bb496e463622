"""Forward passes in memory or layer-streamed, for models bigger than memory.

A streamed model is built on the meta device: only its small parts (the final norm, every 1-D
tensor such as norm gains and biases, small embeddings such as GPT-2's positions, the buffers) are
real. The token embedding is read by the rows a batch uses and the output head in chunks. A decoder
layer's matrices are read from the safetensors checkpoint (through transformers' own key
conversion, so checkpoints storing one tensor per expert load fused, as they would whole) just
before the layer runs and dropped back to the meta device after it, so at most one layer is ever
materialized.

Two ways run it. A plain call of the model (and `generate`, with its KV cache) loads every layer
once per call, through hooks on the layers. `run` goes layer by layer over many batches at once:
the model's own forward is run with every layer replaced by a relay that records the arguments
the model passes it (attention masks, rotary embeddings, position ids, per-layer-type masks) and
hands its input on; then each layer is loaded once and all the batches' hidden states go through
it; a last pass of the model's own forward hands the final hidden states to its norm and head. The
real layer modules run in both ways, so hooks registered on layers or writers (capture, ablation)
fire unchanged, and the results equal the in-memory ones to float tolerance.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import safe_open
from torch import nn

from abliterate.architectures import Architecture, architecture_for, get
from abliterate.errors import AbliterateError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HIDDEN_BUDGET = 2**30  # bytes of hidden states `run` holds at once; more batches go in further sweeps
HEAD_CHUNK = 2**27  # bytes of the output head read at once


class _Relayed(Exception):
    """Raised by the last relay: the recording pass ends before the final norm and head."""


@dataclass
class LayerStream:
    """Where a streamed model's decoder layers come from, and which one is loaded now."""

    folder: Path
    layer_keys: list[list[str]]  # per decoder layer: the checkpoint keys loaded with it
    files: dict[str, str]  # checkpoint key -> the shard holding it
    weight_mapping: list  # transformers' conversion rules from checkpoint keys to the model's
    dtype: torch.dtype
    device: torch.device
    arch: Architecture
    loaded: int | None = None  # the materialized layer, if any
    loads: int = 0  # layer loads so far (a sweep over many batches loads each layer once)
    outputs: int | None = None  # length of the tuple a layer returns; 0: a bare tensor; None: not seen yet
    pinned: bool = False  # a sweep is loading layers itself; the per-call hooks stand aside

    def materialize(self, model: nn.Module, index: int) -> None:
        """Load layer `index`'s weights (and free any other loaded layer)."""
        if self.loaded == index:
            return
        if self.loaded is not None:
            self.release(model, self.loaded)
        _load_keys(model, self, self.layer_keys[index])
        self.loaded = index
        self.loads += 1

    def release(self, model: nn.Module, index: int) -> None:
        """Put layer `index`'s matrices back on the meta device; its 1-D tensors stay."""
        layer = get(model, self.arch.layers)[index]
        for module in layer.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.ndim > 1 and not param.is_meta:
                    module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
        if self.loaded == index:
            self.loaded = None


_STREAMS: weakref.WeakKeyDictionary[nn.Module, LayerStream] = weakref.WeakKeyDictionary()


def stream_of(model: nn.Module) -> LayerStream | None:
    """The layer stream of a streamed model; None for a model held in memory."""
    return _STREAMS.get(model)


def checkpoint_files(folder: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file, from the index or the single file; {} if there are none."""
    if (folder / INDEX).is_file():
        return dict(json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"])
    if (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), "pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)
    return {}


def checkpoint_bytes(folder: Path, dtype: torch.dtype | None = None) -> int:
    """The bytes the folder's floating-point weights take in `dtype` (None: as stored), read from the headers only."""
    total = 0
    for file in sorted(set(checkpoint_files(folder).values())):
        with open(folder / file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for n in info["shape"]:
                numel *= n
            floating = info["dtype"] in ("F64", "F32", "F16", "BF16")
            stored = int(re.sub(r"\D", "", info["dtype"]) or 8) // 8  # F32 -> 4, BF16 -> 2, BOOL -> 1
            size = dtype.itemsize if dtype is not None and floating else stored
            total += numel * size
    return total


def available_memory(device: torch.device | str) -> int:
    """Bytes free for a model on the device: free GPU memory, else the system's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # no /proc/meminfo (not Linux): all physical memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(available, _cgroup_limit() or available)


def _cgroup_limit() -> int | None:
    """The memory a cgroup (a container, systemd-run -p MemoryMax) leaves this process, if one limits it."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 2**60:
            used = Path(path).with_name("memory.current" if path.endswith(".max") else "memory.usage_in_bytes")
            try:
                return int(limit) - int(used.read_text().strip())
            except (OSError, ValueError):
                return int(limit)
    return None


def parse_size(text: str) -> int:
    """'6GB', '512MiB', '1.5G', '2e9' -> bytes; a one-line error otherwise."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise AbliterateError(f"--max-memory {text!r} is not a size; write auto or a size such as 6GB or 512MiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


def should_stream(folder: Path | None, max_memory: str, dtype: torch.dtype, device: str) -> bool:
    """Whether a model must be layer-streamed: its weights in `dtype` exceed --max-memory (auto: 80% of free memory)."""
    if max_memory in ("auto", "") and folder is None:
        return False
    if folder is None or not checkpoint_files(folder):
        if max_memory not in ("auto", ""):
            raise AbliterateError(
                f"--max-memory {max_memory}: layer streaming reads a folder of safetensors weights, and this "
                "model is not one; convert it (a built-in or GGUF model is dequantized to one once) or drop --max-memory"
            )
        return False
    size = checkpoint_bytes(folder, dtype)
    limit = int(0.8 * available_memory(device)) if max_memory in ("auto", "") else parse_size(max_memory)
    return size > limit


def load_streamed(folder: Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False) -> nn.Module:
    """A model on the meta device whose decoder layers are loaded one at a time from `folder` as they run."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    arch = architecture_for(model)
    files = checkpoint_files(folder)
    mapping = get_model_conversion_mapping(model, None, None)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    expected = model.state_dict()
    n_layers = len(get(model, arch.layers))
    pattern = re.compile(rf"^{re.escape(arch.layers)}\.(\d+)\.")
    layer_keys: list[list[str]] = [[] for _ in range(n_layers)]
    resident = []
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    vocab = {f"{names[id(m)]}.weight": m for m in (embed, head) if m is not None}
    vocab_keys: dict[str, str] = {}  # the token embedding's and the head's checkpoint keys: read by rows, never whole
    for key in files:
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if renamed in vocab and converted is None:
            vocab_keys[renamed] = key
            continue
        found = pattern.match(renamed)
        vector = converted is None and renamed in expected and expected[renamed].ndim <= 1
        if found and not vector:
            layer_keys[int(found.group(1))].append(key)
        else:
            resident.append(key)  # embeddings, final norm, head, and every layer's norm gains and biases
    stream = LayerStream(folder, layer_keys, files, mapping, dtype, torch.device(device), arch)
    _load_keys(model, stream, resident)
    model.tie_weights()
    _stream_vocabulary(model, stream, embed, head, vocab_keys, names)
    for module in model.modules():  # buffers (rotary frequencies, embedding scales) were built real, on the CPU
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != stream.device:
                module._buffers[name] = buffer.to(stream.device)
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(f"{arch.layers}.")]
    if missing:
        raise AbliterateError(
            f"{folder}'s checkpoint lacks {missing[0]} (names differ from the model's); load it without --max-memory"
        )
    _STREAMS[model] = stream
    for index, layer in enumerate(get(model, arch.layers)):
        layer.register_forward_pre_hook(_loader(model, stream, index), prepend=True)
        layer.register_forward_hook(_unloader(model, stream, index), always_call=True)
    return model


@dataclass(frozen=True)
class _Rows:
    """A vocabulary-sized matrix (token embedding, output head) read from its checkpoint a few rows at a time."""

    path: Path
    key: str
    dtype: torch.dtype
    device: torch.device

    def gather(self, ids: list[int]) -> torch.Tensor:
        """The rows at sorted, distinct ids, read in contiguous runs."""
        runs: list[list[int]] = []
        for i in ids:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        with safe_open(str(self.path), "pt", backend="pread") as f:
            part = f.get_slice(self.key)
            return torch.cat([part[a:b] for a, b in runs]).to(self.device, self.dtype)

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) of the whole matrix, `rows` at a time."""
        with safe_open(str(self.path), "pt", backend="pread") as f:
            part = f.get_slice(self.key)
            total = part.get_shape()[0]
            for start in range(0, total, rows):
                yield start, part[start : min(total, start + rows)].to(self.device, self.dtype)


def _stream_vocabulary(model: nn.Module, stream: LayerStream, embed: nn.Module, head: nn.Module | None,
                       keys: dict[str, str], names: dict[int, str]) -> None:  # fmt: skip
    """Read the token embedding by the rows a batch uses and the head in chunks, so neither is ever whole in memory.

    Their weights become zero-stride placeholders of the right shape, dtype and device (what callers ask
    of them); hooks read the real rows as each call needs them.
    """
    tied = head is not None and head.weight is embed.weight
    placeholders: dict[int, nn.Parameter] = {}
    for module in (embed, head):
        if module is None or id(module.weight) in placeholders:
            continue
        name = f"{names[id(module)]}.weight"
        key = keys.get(name) or (keys.get(f"{names[id(embed)]}.weight") if tied else None)
        if key is None:
            raise AbliterateError(f"{stream.folder}'s checkpoint has no {name}; load it without --max-memory")
        rows = _Rows(stream.folder / stream.files[key], key, stream.dtype, stream.device)
        shape = cast(torch.Tensor, module.weight).shape
        placeholder = nn.Parameter(torch.zeros((), dtype=stream.dtype, device=stream.device).expand(shape),
                                   requires_grad=False)  # fmt: skip
        placeholders[id(module.weight)] = placeholder
        if module is embed:
            embed.register_forward_pre_hook(_embedding_rows(rows), with_kwargs=True)
            embed.register_forward_hook(_restore(placeholder), always_call=True)
        if module is head or tied:
            assert head is not None
            head.register_forward_pre_hook(_head_input(), prepend=True)
            head.register_forward_hook(_head_chunks(rows, head))
    for module in (embed, head):
        if module is not None:
            module._parameters["weight"] = placeholders[id(module.weight)]


def _embedding_rows(rows: _Rows):
    def hook(module, args, kwargs):
        ids = args[0] if args else next(iter(kwargs.values()))
        distinct, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        module._parameters["weight"] = nn.Parameter(rows.gather(distinct.tolist()), requires_grad=False)
        return (inverse, *args[1:]), kwargs

    return hook


def _restore(placeholder: nn.Parameter):
    def hook(module, args, output):
        module._parameters["weight"] = placeholder

    return hook


def _head_input():
    def hook(module, args):
        module._streamed_input = args[0]
        return (args[0][..., :0, :],)  # the layer's own product is replaced: make it empty

    return hook


def _head_chunks(rows: _Rows, head: nn.Module):
    def hook(module, args, output):
        x = module.__dict__.pop("_streamed_input")
        weight = module.weight
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        bias = getattr(module, "bias", None)
        for start, part in rows.chunks(max(1, HEAD_CHUNK // (weight.shape[1] * weight.element_size()))):
            stop = start + part.shape[0]
            out[..., start:stop] = nn.functional.linear(x, part, None if bias is None else bias[start:stop])
        return out

    return hook


def _loader(model: nn.Module, stream: LayerStream, index: int):
    def hook(module, args):
        if not stream.pinned:
            stream.materialize(model, index)

    return hook


def _unloader(model: nn.Module, stream: LayerStream, index: int):
    def hook(module, args, output):
        if output is not None:  # None: the layer raised (always_call still frees it)
            stream.outputs = len(output) if isinstance(output, tuple) else 0
        if not stream.pinned:
            stream.release(model, index)

    return hook


def _load_keys(model: nn.Module, stream: LayerStream, keys: list[str]) -> None:
    """Read checkpoint tensors (pread, not mmap: memory stays what is used) into the model, converted as transformers would."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(stream.files[key], []).append(key)
    handles = [safe_open(str(stream.folder / file), "pt", backend="pread") for file in by_file]
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tensors = {key: handle.get_slice(key) for handle, names in zip(handles, by_file.values()) for key in names}
        config = LoadStateDictConfig(weight_mapping=stream.weight_mapping, dtype=stream.dtype,
                                     device_map={"": stream.device})  # fmt: skip
        convert_and_load_state_dict_in_model(cast("PreTrainedModel", model), tensors, config)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        del handles


class _Relay(nn.Module):
    """Stands in for decoder layer `index` while the model's own forward runs: records its arguments, passes a
    hidden state on."""

    def __init__(self, real: nn.Module, index: int, last: bool, outputs: int, calls: list,
                 final: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        for name, value in vars(real).items():  # what the model's loop may read off a layer (Nemotron-H's block_type)
            if not name.startswith("_") and isinstance(value, (str, int, float, bool)):
                setattr(self, name, value)
        self.index, self.last, self.outputs, self.calls, self.final = index, last, outputs, calls, final

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.final is None:
            self.calls.append((args, kwargs))
            if self.last:
                raise _Relayed
        else:
            hidden = self.final if self.last else hidden
        return (hidden,) + (None,) * (self.outputs - 1) if self.outputs else hidden


def _with_relays(model: nn.Module, stream: LayerStream, calls: list, final: torch.Tensor | None = None):
    """Context: every decoder layer replaced by a relay; the real layers put back on exit."""
    import contextlib

    @contextlib.contextmanager
    def swap():
        blocks = get(model, stream.arch.layers)
        real = list(blocks)
        n = len(real)
        try:
            for i in range(n):
                blocks[i] = _Relay(real[i], i, i == n - 1, stream.outputs or 0, calls, final)
            yield
        finally:
            for i, layer in enumerate(real):
                blocks[i] = layer

    return swap()


def _layer_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The recorded call of a layer with its hidden state replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run(model: nn.Module, batches: list[dict[str, Any]], **kwargs: Any) -> Iterator[Any]:
    """The model's output for each batch of inputs, in order; `use_cache` is off.

    In memory each batch is one forward call. Streamed, the batches go through the layers together
    (each layer loaded once per sweep of up to HIDDEN_BUDGET bytes of hidden states). Outputs are
    made as they are consumed: hooks must stay registered until the iterator is exhausted.
    """
    stream = stream_of(model)
    kwargs = {**kwargs, "use_cache": False}
    if stream is None:
        for batch in batches:
            yield model(**batch, **kwargs)
        return
    start = 0
    if stream.outputs is None and batches:  # a plain call first: it shows what a layer returns
        yield model(**batches[0], **kwargs)
        start = 1
    group: list[dict[str, torch.Tensor]] = []
    held = 0
    for batch in batches[start:]:
        size = _hidden_bytes(model, batch, stream)
        if group and held + size > HIDDEN_BUDGET:
            yield from _sweep(model, stream, group, kwargs)
            group, held = [], 0
        group.append(batch)
        held += size
    if group:
        yield from _sweep(model, stream, group, kwargs)


def _hidden_bytes(model: nn.Module, batch: dict[str, torch.Tensor], stream: LayerStream) -> int:
    from abliterate.architectures import hidden_size

    return batch["input_ids"].numel() * hidden_size(model) * stream.dtype.itemsize


@torch.no_grad()
def _sweep(model: nn.Module, stream: LayerStream, batches: list[dict], kwargs: dict) -> Iterator[Any]:
    """Record every batch's layer arguments, run the batches through each layer in turn, then the head."""
    blocks = list(get(model, stream.arch.layers))
    recorded: list[list] = []
    for batch in batches:
        calls: list = []
        with _with_relays(model, stream, calls):
            try:
                model(**batch, **kwargs)
            except _Relayed:
                pass
        if len(calls) != len(blocks):
            raise AbliterateError(
                f"the model ran {len(calls)} of its {len(blocks)} decoder layers in one forward pass; layer "
                "streaming needs every layer called once: load it without --max-memory"
            )
        recorded.append(calls)
    hidden = [calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"] for calls in recorded]
    stream.pinned = True
    try:
        for index, layer in enumerate(blocks):
            stream.materialize(model, index)
            for b, calls in enumerate(recorded):
                args, kw = calls[index]
                args, kw = _layer_input(args, kw, hidden[b])
                out = layer(*args, **kw)
                hidden[b] = out[0] if isinstance(out, tuple) else out
            stream.release(model, index)
    finally:
        stream.pinned = False
    for batch, final in zip(batches, hidden):
        with _with_relays(model, stream, [], final):
            yield model(**batch, **kwargs)
