"""What a run saves: the edited model in HF layout, its directions, and the abliteration.json record."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from abliterate import __version__
from abliterate.capture import ResidualMeans
from abliterate.directions import Candidates
from abliterate.edit import EditParams, orthogonalize
from abliterate.errors import AbliterateError
from abliterate.model import LoadedModel, context_length, load, save_dtype
from abliterate.prompts import BUILTIN_SETS, PARTS
from abliterate.selection import Selection
from abliterate.settings import Settings


def save_model(
    lm: LoadedModel,
    folder: Path,
    dtype: str = "source",
    edit: tuple[torch.Tensor, EditParams] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """save_pretrained the source weights, edited in float64 and cast once to the save dtype.

    dtype 'source' (or 'auto') keeps the checkpoint's dtype (float32 for GGUF sources). Without
    `edit`, lm.model is saved as it is (cast to that dtype). With `edit` (direction, params, already
    applied to lm.model) lm.model is saved only if it holds the source weights in that dtype; when it
    was computed in another dtype, the source is loaded again on the CPU in its own dtype and edited,
    so no tensor is rounded through the compute dtype and untouched tensors stay bit-identical.
    """
    target = save_dtype(dtype, lm.source_dtype)
    net = lm.model
    computed = next(net.parameters()).dtype
    if edit is not None and (computed != lm.source_dtype or target != lm.source_dtype):
        if progress:
            progress(
                f"  the edit was evaluated in {str(computed).replace('torch.', '')}; saving the "
                f"{str(lm.source_dtype).replace('torch.', '')} source weights with the same edit"
            )
        source = load(lm.source, "source", "cpu", lm.trust_remote_code, lm.allow_pickle, progress or (lambda _: None))
        orthogonalize(source.model, source.arch, edit[0], edit[1], dtype=target)
        net = source.model
    net.to(target)  # the edited tensors are in `target` already; every other one is cast once, if at all
    try:
        net.save_pretrained(folder, safe_serialization=True)
    finally:
        if net is lm.model:
            net.to(computed)
    lm.tokenizer.padding_side = "left"
    # The run lowered model_max_length to leave room for answers; save the model's real context.
    lm.tokenizer.model_max_length = context_length(net) or lm.tokenizer.model_max_length
    lm.tokenizer.save_pretrained(folder)


def save_directions(
    folder: Path, candidates: Candidates, harmful: ResidualMeans, harmless: ResidualMeans, chosen: torch.Tensor
) -> None:
    """The chosen direction, every candidate and the means it came from, as safetensors."""
    save_file(
        {
            "direction": chosen.double().contiguous(),  # float64, so `apply` reproduces the edit bit for bit
            "candidate_directions": candidates.directions.float().contiguous(),
            "mean_differences": candidates.diffs.float().contiguous(),
            "harmful_means": harmful.mean.float().contiguous(),
            "harmless_means": harmless.mean.float().contiguous(),
        },
        str(folder / "directions.safetensors"),
        metadata={"layout": "(position from last, layer input 0..L-1 then output of layer L-1, hidden)"},
    )


def _versions() -> dict:
    versions = {"python": platform.python_version(), "abliterate": __version__}
    for package in ("torch", "transformers", "safetensors", "gguf", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def prompt_source(spec: str) -> str:
    """A prompt source as evaluate can find it again: local files by absolute path, other names as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec not in BUILTIN_SETS and path.exists() else spec


def split_record(settings: Settings, splits: dict) -> dict:
    """How the prompts were cut, so `abliterate evaluate` can rebuild exactly the held-out test prompts."""
    return {
        "n_train": settings.n_train,
        "n_val": settings.n_val,
        "n_test": 0 if settings.no_eval else settings.n_test,
        "seed": settings.seed,
        "prompt_column": settings.prompt_column,
        "category_column": settings.category_column,
        "sources": {key: prompt_source(getattr(settings, key)) for key in ("harmful", "harmless", "benign")},
        "train_sets": ["harmful", "harmless"],  # benign prompts are only ever test prompts
        "sha256": {key: {part: getattr(s, part).sha256 for part in PARTS} for key, s in splits.items()},
    }


def record(
    lm: LoadedModel, settings: Settings, splits: dict, selection: Selection, edited: list[str], metrics: dict
) -> dict:
    """Everything needed to reproduce the run and to re-apply the edit."""
    chosen = selection.chosen
    src = lm.source
    return {
        "abliterate_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "spec": src.spec,
            "kind": src.kind,
            "base_model": src.base_model,
            "license": src.license,
            "sha256": src.sha256,
            "model_type": lm.model.config.model_type,
            "num_layers": getattr(lm.model.config, "num_hidden_layers", None),
            "source_dtype": str(lm.source_dtype).replace("torch.", ""),
        },
        "prompts": {
            key: {
                part: {"n": len(getattr(s, part)), "sha256": getattr(s, part).sha256}
                for part in ("train", "val", "test")
            }
            for key, s in splits.items()
        },
        "split": split_record(settings, splits),
        "settings": settings.as_dict(),
        "seed": settings.seed,
        "refusal_tokens": {
            "ids": list(selection.refusal_tokens.ids),
            "tokens": list(selection.refusal_tokens.tokens),
            "precision": selection.refusal_tokens.precision,
        },
        "selection": {
            "position": chosen.position,
            "layer": chosen.layer,
            "reason": selection.reason,
            "kl_threshold": selection.kl_threshold,
            "baseline_refusal_log_odds": {
                "harmful": selection.baseline_refusal_harmful,
                "harmless": selection.baseline_refusal_harmless,
            },
            "candidates": [s.as_dict() for s in selection.scores],
        },
        "edit": {
            "kind": "induce" if chosen.scale < 0 else "orthogonalize",
            "direction_file": "directions.safetensors",
            "direction_key": "direction",
            "scale": chosen.scale,
            "start_layer": chosen.start_layer,
            "norm_preserving": settings.norm_preserving,
            "edited_tensors": edited,
            "tie_word_embeddings": bool(getattr(lm.model.config, "tie_word_embeddings", False)),
        },
        "metrics": metrics,
        "versions": _versions(),
    }


@dataclass(frozen=True)
class RecordedEdit:
    """A run's edit, read back from its abliteration.json and the directions file beside it."""

    record: dict
    params: EditParams
    direction: torch.Tensor
    directions_file: Path


def read_edit(edit_file: str | Path) -> RecordedEdit:
    """Read the edit `record()` wrote; a one-line error if the file is missing or not a record."""
    from safetensors.torch import load_file

    path = Path(edit_file).expanduser()
    if not path.is_file():
        raise AbliterateError(f"edit file {path} does not exist; pass the abliteration.json of a run")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        edit = rec["edit"]
        params = EditParams(
            float(edit["scale"]), int(edit.get("start_layer", 0)), bool(edit.get("norm_preserving", False))
        )
        directions_file = path.parent / edit["direction_file"]
        direction = load_file(str(directions_file))[edit["direction_key"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError) as exc:
        raise AbliterateError(
            f"{path} is not a usable abliteration record ({exc}); pass a run's abliteration.json"
        ) from None
    return RecordedEdit(rec, params, direction, directions_file)


def answers_record(before: dict, after: dict) -> dict:
    """Every test prompt with both answers and labels, for auditing the judge."""
    result = {}
    for key in ("harmful", "benign"):
        b, a = before[key], after[key]
        result[key] = [
            {
                "prompt": b.prompts[i],
                "category": b.categories[i],
                "before": b.responses[i],
                "before_label": b.labels[i],
                "after": a.responses[i],
                "after_label": a.labels[i],
            }
            for i in range(len(b.prompts))
        ]
    return result
