"""Apply a recorded edit to a safetensors checkpoint one shard at a time, never holding the whole model.

The model is built on the meta device only to learn which checkpoint tensors the edit touches
(`edit.edit_targets`, the same list `orthogonalize` works through), along which axis and
direction; post-norm gains are read from the checkpoint one tensor at a time, in their stored
dtype. Each shard is then loaded, its writer tensors edited with `edit.remove_component_` (float64,
rounded once to the save dtype) on the same device as the in-memory path, every other tensor kept
bit for bit (or cast once to an asked-for save dtype), and saved, so the result equals it bit for bit.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from abliterate.architectures import architecture_for, hidden_size
from abliterate.edit import EditParams, check_editable, edit_targets, remove_component_, untie_embeddings
from abliterate.errors import AbliterateError
from abliterate.model import check_not_quantized, pick_device, save_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Written fresh by the stream or by `apply`; never copied from the source folder.
REWRITTEN = {INDEX, "config.json", "generation_config.json", "README.md", "abliteration.json"}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"}


class NotStreamable(Exception):
    """The checkpoint's layout is not one the stream can edit faithfully; load it in memory instead."""


@dataclass
class StreamPlan:
    """What to edit in which shard, decided before any output is written."""

    folder: Path
    shards: dict[str, list[str]]  # shard file -> the tensor names it holds
    targets: dict[str, tuple[int, torch.Tensor, float]]  # tensor name -> (residual axis, unit direction, strength)
    params: EditParams
    head_copy: tuple[str, str] | None  # (output head name, embedding name) when the edit unties them
    save_dtype: torch.dtype | None  # None: every tensor keeps its own dtype
    device: str
    config: PreTrainedConfig

    def write(self, out: Path) -> list[str]:
        """Write the edited checkpoint, config and the source's other files into `out`; return edited names."""
        weight_map = {}
        sizes = 0
        for file, keys in self.shards.items():
            tensors = load_file(str(self.folder / file))
            edited = {}
            for key in keys:
                tensor = tensors.pop(key)
                if self.head_copy and key == self.head_copy[1]:
                    edited[self.head_copy[0]] = self._cast(tensor).clone()  # the head keeps the original
                if key in self.targets:
                    axis, u, scale = self.targets[key]
                    check_editable(key, tensor)
                    work = tensor.to(self.device)  # the loaded tensor is ours to edit in place
                    same = self.save_dtype in (None, work.dtype)
                    result = work if same else torch.empty_like(work, dtype=self.save_dtype)
                    remove_component_(work, axis, u, scale, self.params.norm_preserving, out=result)
                    edited[key] = result.to("cpu")
                else:
                    edited[key] = self._cast(tensor)
            save_file(edited, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(edited, file))
            sizes += sum(t.numel() * t.element_size() for t in edited.values())
            del tensors, edited
        if (self.folder / INDEX).is_file():
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
            index["metadata"] = {**index.get("metadata", {}), "total_size": sizes}
            index["weight_map"] = dict(sorted(weight_map.items()))
            (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self._write_configs(out)
        for item in self.folder.iterdir():
            skip = item.name in REWRITTEN or item.suffix in WEIGHT_SUFFIXES or item.name.startswith(".")
            if item.is_file() and not skip:
                shutil.copyfile(item, out / item.name)  # tokenizer files, chat template, license
        return list(self.targets)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """An unedited tensor as saved: as stored, or cast once to the asked-for save dtype."""
        if not tensor.is_floating_point() or self.save_dtype is None:
            return tensor
        return tensor.to(self.save_dtype)

    def _write_configs(self, out: Path) -> None:
        from transformers import GenerationConfig

        if self.save_dtype is not None:
            self.config.dtype = self.save_dtype
        self.config.save_pretrained(out)
        if (self.folder / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(self.folder)
        else:
            generation = GenerationConfig.from_model_config(self.config)
        generation.save_pretrained(out)


def _checkpoint_shards(folder: Path) -> dict[str, list[str]]:
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            shards.setdefault(file, []).append(key)
        return shards
    if (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), "pt") as f:
            return {SINGLE: list(f.keys())}
    raise NotStreamable(f"{folder} has no {SINGLE} or {INDEX}")


def _materialize(folder: Path, shards: dict[str, list[str]], wanted: dict, device: str) -> None:
    """Load the named (module, attribute) parameters from the checkpoint in their stored dtype, opening each shard once."""
    for file, keys in shards.items():
        present = [k for k in keys if k in wanted]
        if not present:
            continue
        with safe_open(str(folder / file), "pt") as f:
            for key in present:
                module, name = wanted[key]
                module._parameters[name] = nn.Parameter(f.get_tensor(key).to(device), requires_grad=False)


def prepare(
    folder: Path,
    direction: torch.Tensor,
    params: EditParams,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> StreamPlan:
    """Plan the streamed edit of an HF safetensors folder; NotStreamable if its layout does not allow it.

    dtype is the save dtype: 'source' (or 'auto') keeps every tensor's own.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    check_not_quantized(config, str(folder))
    shards = _checkpoint_shards(folder)
    device = pick_device(device)
    saved = None if dtype in ("source", "auto") else save_dtype(dtype, torch.float32)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        raise NotStreamable(f"its model could not be built on the meta device ({exc})") from None
    arch = architecture_for(skeleton)
    if direction.shape[-1] != hidden_size(skeleton):
        raise AbliterateError(
            f"the direction has {direction.shape[-1]} dimensions but {folder} has hidden size "
            f"{hidden_size(skeleton)}; use the model the edit was made on"
        )

    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    module_names = {id(m): n for n, m in skeleton.named_modules()}
    head_copy = None
    if head is not None and head.weight is embed.weight:
        head_key = f"{module_names[id(head)]}.weight"
        head_copy = (head_key, f"{module_names[id(embed)]}.weight")
        shards = {f: [k for k in keys if k != head_key] for f, keys in shards.items()}
    untie_embeddings(skeleton)  # as orthogonalize does: the config no longer ties them

    expected = set(skeleton.state_dict())
    stored = {k for keys in shards.values() for k in keys}
    if not stored <= expected:
        odd = sorted(stored - expected)[:3]
        raise NotStreamable(
            f"its tensor names ({', '.join(odd)}, ...) differ from the model's, so loading renames them"
        )

    # Post-norm gains are measured by running the norms, so give every vector (norm gains, biases) its
    # real value: a few per layer, small next to any matrix.
    vectors = {
        f"{prefix}.{name}" if prefix else name: (module, name)
        for prefix, module in skeleton.named_modules()
        for name, param in module.named_parameters(recurse=False)
        if param.ndim == 1
    }
    _materialize(folder, shards, vectors, device)

    targets = {t.name: (t.axis, t.direction, t.scale) for t in edit_targets(skeleton, arch, direction, params)}
    missing = sorted(set(targets) - stored)
    if missing:
        raise NotStreamable(f"it lacks {missing[0]}, which the edit changes")
    return StreamPlan(folder, shards, targets, params, head_copy, saved, device, config)
