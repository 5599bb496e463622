"""What a run saves: the edited model in HF layout, its directions, and the abliteration.json record.

`RunRecord` is the one owner of abliteration.json: `write_record` writes it, `load_record` reads and
validates it, and every reader (apply, the adapter and GGUF exports, the report, `evaluate
--split-from`, a model folder's base model) goes through them.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from abliterate import __version__
from abliterate.capture import ResidualMeans
from abliterate.directions import Candidates
from abliterate.edit import EditParams, Profile, orthogonalize
from abliterate.errors import AbliterateError
from abliterate.evaluation.metrics import Metrics
from abliterate.files import write_json
from abliterate.model import LoadedModel, ModelSource, context_length, load, save_dtype
from abliterate.prompts import BUILTIN_SETS, PARTS
from abliterate.search import Scored, SearchResult, storage_label
from abliterate.selection import RefusalTokens, Selection
from abliterate.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
        options = dataclasses.replace(lm.options, dtype="source", device="cpu")
        source = load(lm.source, options, progress or (lambda _: None))
        orthogonalize(source.model, source.arch, edit[0], edit[1], dtype=target)
        net = source.model
    net.to(target)  # the edited tensors are in `target` already; every other one is cast once, if at all
    try:
        cast("PreTrainedModel", net).save_pretrained(folder, safe_serialization=True)
    finally:
        if net is lm.model:
            net.to(computed)
    tokenizer = copy.copy(lm.tokenizer)  # a copy: the loaded tokenizer is left as it is
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = context_length(net) or tokenizer.model_max_length  # the model's real context
    tokenizer.save_pretrained(folder)


def save_directions(
    folder: Path, candidates: Candidates, harmful: ResidualMeans, harmless: ResidualMeans, chosen: torch.Tensor,
    front: dict[int, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """The chosen direction (a vector, or (k, hidden) rows for several), every candidate, the means it came from
    and each searched front point's own direction(s), as safetensors."""
    save_file(
        {
            "direction": chosen.double().contiguous(),  # float64, so `apply` reproduces the edit bit for bit
            "candidate_directions": candidates.directions.float().contiguous(),
            "mean_differences": candidates.diffs.float().contiguous(),
            "harmful_means": harmful.mean.float().contiguous(),
            "harmless_means": harmless.mean.float().contiguous(),
            # apply --trial takes these as they are: several directions come from per-prompt activations not kept here
            **{f"front.{trial}": d.double().contiguous() for trial, d in (front or {}).items()},
        },
        str(folder / "directions.safetensors"),
        metadata={"layout": "(position from last, layer input 0..L-1 then output of layer L-1, hidden)"},
    )


def _versions() -> dict:
    versions: dict[str, str | None] = {"python": platform.python_version(), "abliterate": __version__}
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


RECORD = "abliteration.json"
SCHEMA = 2  # layout of abliteration.json; files without "schema" are version 1, which reads the same


@dataclass(frozen=True)
class ModelInfo:
    """The model a run edited."""

    spec: str
    kind: str
    base_model: str | None = None
    license: str | None = None
    sha256: str | None = None
    model_type: str | None = None
    num_layers: int | None = None
    source_dtype: str | None = None


@dataclass(frozen=True)
class EditInfo:
    """The edit, enough to apply it again: its parameters and where its direction is stored."""

    kind: str  # "orthogonalize" (remove refusal) or "induce" (strengthen it)
    scale: float
    start_layer: int = 0
    norm_preserving: bool = False
    edited_tensors: list[str] = dataclasses.field(default_factory=list)
    tie_word_embeddings: bool = False
    direction_file: str = "directions.safetensors"
    direction_key: str = "direction"
    attention: dict[str, float] | None = None  # a Profile's fields, where the edit has per-layer strengths
    mlp: dict[str, float] | None = None
    embeddings: bool | None = None

    @property
    def params(self) -> EditParams:
        """The parameters orthogonalize() takes."""
        profile = lambda d: Profile(**d) if d is not None else None  # noqa: E731
        return EditParams(
            self.scale, self.start_layer, self.norm_preserving, profile(self.attention), profile(self.mlp),
            self.embeddings,
        )  # fmt: skip

    @classmethod
    def of(cls, params: EditParams, edited: list[str], tied: bool) -> EditInfo:
        """The record of an applied edit."""
        profile = lambda p: asdict(p) if p is not None else None  # noqa: E731
        kind = "induce" if params.scale < 0 else "orthogonalize"
        return cls(kind, params.scale, params.start_layer, params.norm_preserving, edited, tied,
                   attention=profile(params.attention), mlp=profile(params.mlp), embeddings=params.embeddings)  # fmt: skip


@dataclass(frozen=True)
class RunRecord:
    """Everything needed to reproduce a run and to re-apply its edit: the content of abliteration.json."""

    abliterate_version: str
    created: str
    model: ModelInfo
    edit: EditInfo
    selection: dict[str, Any]  # the chosen layer and position, the reason, every candidate's scores
    settings: dict[str, Any]  # Settings.as_dict() of the run
    seed: int
    refusal_tokens: dict[str, Any] = dataclasses.field(default_factory=dict)
    prompts: dict[str, Any] = dataclasses.field(default_factory=dict)  # sizes and hashes of every part
    split: dict[str, Any] | None = None  # how the prompts were cut (split_record); None in version-1 files
    metrics: Metrics | None = None  # None for --no-eval runs
    versions: dict[str, Any] = dataclasses.field(default_factory=dict)
    applied_to: dict[str, Any] | None = None  # set by `apply`: the model the edit was re-applied to
    adapter: dict[str, Any] | None = None  # set by `export-adapter`
    heal: dict[str, Any] | None = None  # set by `heal`: a LoRA fine-tune on top of the edit, not a rank-1 edit
    schema: int = SCHEMA

    @property
    def induce(self) -> bool:
        """Whether the edit strengthens refusal instead of removing it."""
        return self.edit.kind == "induce"

    @property
    def direction_source(self) -> str:
        """Where the edit's direction came from, in words, for the card and the report."""
        sel = self.selection
        k = int(sel.get("directions", 1))
        what = (
            "direction"
            if k == 1
            else f"{k} directions (the mean difference, then the harmful prompts' principal directions around it)"
        )
        return f"{what} from layer {sel['layer']}, position {sel['position']}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form, in the file's key order."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data = {"schema": self.schema, **{k: v for k, v in data.items() if k != "schema"}}
        data |= {"model": asdict(self.model), "edit": asdict(self.edit)}
        data["metrics"] = self.metrics.as_dict() if self.metrics else {}
        return {k: v for k, v in data.items() if v is not None or k == "split"}

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        """Validate the JSON form; raises ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise ValueError(f"schema {schema!r} is newer than this abliterate reads ({SCHEMA}); upgrade abliterate")
        missing = [k for k in ("abliterate_version", "model", "edit", "selection", "settings", "seed") if k not in data]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        try:
            fields |= {
                "schema": SCHEMA,  # read once, written back in the current layout
                "created": str(data.get("created", "")),
                "model": _typed(ModelInfo, data["model"]),
                "edit": _typed(EditInfo, data["edit"]),
                "metrics": Metrics.from_dict(data.get("metrics")),
            }
            record = cls(**fields)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed {exc}") from None
        if record.edit.kind not in ("orthogonalize", "induce"):
            raise ValueError(f"unknown edit kind {record.edit.kind!r}")
        return record


def _typed(kind: type, data: Any):
    """A dataclass from its JSON object, unknown keys ignored; TypeError when a required one is missing."""
    if not isinstance(data, dict):
        raise TypeError(f"{kind.__name__} is not an object")
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in data.items() if k in names})


def write_record(folder: Path, record: RunRecord) -> None:
    """Write abliteration.json into a (staging) folder."""
    write_json(folder / RECORD, record.as_dict())


def load_record(where: str | Path) -> RunRecord:
    """Read a run's record from its folder or its abliteration.json; one-line error if absent or not a record."""
    path = Path(where).expanduser()
    file = path / RECORD if path.is_dir() else path
    if not file.is_file():
        raise AbliterateError(f"{path} has no {RECORD}; pass the --out folder of a finished run (or its {RECORD})")
    try:
        return RunRecord.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise AbliterateError(f"{file} is not a usable run record ({exc}); pass a run's {RECORD}") from None


def base_model(source: ModelSource) -> str | None:
    """The hub id of the original model: what resolve() found, or what a folder we wrote records."""
    if source.kind == "folder" and source.path is not None and (source.path / RECORD).is_file():
        return load_record(source.path).model.base_model
    return source.base_model


def record(
    lm: LoadedModel,
    settings: Settings,
    splits: dict,
    selection: Selection | None,
    found: SearchResult | None,
    params: EditParams,
    edited: list[str],
    metrics: Metrics | None,
) -> RunRecord:
    """Everything needed to reproduce the run and to re-apply the edit (the ladder's selection, or the search's)."""
    src = lm.source
    how, tokens = _choice(selection, found)
    return RunRecord(
        abliterate_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            spec=src.spec,
            kind=src.kind,
            base_model=base_model(src),
            license=src.license,
            sha256=src.sha256,
            model_type=cast("PreTrainedModel", lm.model).config.model_type,
            num_layers=getattr(lm.model.config, "num_hidden_layers", None),
            source_dtype=str(lm.source_dtype).replace("torch.", ""),
        ),
        prompts={
            key: {part: {"n": len(getattr(s, part)), "sha256": getattr(s, part).sha256} for part in PARTS}
            for key, s in splits.items()
        },
        split=split_record(settings, splits),
        settings={**settings.as_dict(), "storage": settings.storage and storage_label(settings.storage)},
        seed=settings.seed,
        refusal_tokens={"ids": list(tokens.ids), "tokens": list(tokens.tokens), "precision": tokens.precision},
        selection=how,
        edit=EditInfo.of(params, edited, bool(getattr(lm.model.config, "tie_word_embeddings", False))),
        metrics=metrics,
        versions=_versions(),
    )


def _choice(selection: Selection | None, found: SearchResult | None) -> tuple[dict[str, Any], RefusalTokens]:
    """The record's selection section, and the refusal openings the choice was measured with."""
    if found is not None:
        point = found.chosen.point
        how = {"position": point.position, "layer": point.layer, "directions": point.directions, "reason": found.reason,
               "kl_threshold": found.kl_threshold, "candidates": [], "search": found.as_dict()}  # fmt: skip
        return how, found.refusal_tokens
    if selection is None:
        raise ValueError("a record needs the selection or the search that chose its edit")
    chosen = selection.chosen
    how = {
        "position": chosen.position,
        "layer": chosen.layer,
        "reason": selection.reason,
        "kl_threshold": selection.kl_threshold,
        "baseline_refusal_log_odds": {
            "harmful": selection.baseline_refusal_harmful,
            "harmless": selection.baseline_refusal_harmless,
        },
        "candidates": [s.as_dict() for s in selection.scores],
    }
    return how, selection.refusal_tokens


@dataclass(frozen=True)
class RecordedEdit:
    """A run's edit, read back from its abliteration.json and the directions file beside it."""

    record: RunRecord
    direction: torch.Tensor
    directions_file: Path
    tensors: dict[str, torch.Tensor]  # everything the directions file holds, read once
    metadata: dict[str, str] | None

    @property
    def params(self) -> EditParams:
        """The recorded edit's parameters."""
        return self.record.edit.params

    def save_directions(self, folder: Path) -> None:
        """The run's directions file into `folder`, its direction this edit's (another front trial's, if picked)."""
        # a copy: the direction may be one of the file's own tensors (a front point's), and safetensors refuses
        # to write two names for one storage
        tensors = {**self.tensors, self.record.edit.direction_key: self.direction.to(torch.float64, copy=True)}
        save_file(tensors, str(folder / "directions.safetensors"), metadata=self.metadata)


def read_edit(edit_file: str | Path, trial: int | None = None) -> RecordedEdit:
    """The recorded edit and its direction (or front trial `trial`'s of a searched run); one line if unusable."""
    path = Path(edit_file).expanduser()
    if not path.exists():
        raise AbliterateError(f"edit file {path} does not exist; pass the abliteration.json of a run")
    rec = load_record(path)
    if rec.heal:
        raise AbliterateError(
            f"{path} records a healed model ({rec.heal.get('note', 'a LoRA fine-tune, not a rank-1 edit')}); "
            f"pass the run folder it was healed from ({rec.heal.get('run', 'see its record')}) to reuse the edit"
        )
    folder = path if path.is_dir() else path.parent
    directions_file = folder / rec.edit.direction_file
    try:
        tensors = load_file(str(directions_file))
        with safe_open(str(directions_file), "pt") as f:
            metadata = f.metadata()
        direction = tensors[rec.edit.direction_key]
        if trial is not None:
            rec, direction = _front_trial(rec, tensors, trial)
    except (KeyError, OSError, ValueError, SafetensorError) as exc:
        raise AbliterateError(
            f"{directions_file} does not hold the run's direction ({exc}); keep it beside the run's {RECORD}"
        ) from None
    return RecordedEdit(rec, direction, directions_file, tensors, metadata)


def _front_trial(rec: RunRecord, tensors: dict[str, torch.Tensor], trial: int) -> tuple[RunRecord, torch.Tensor]:
    """The record and direction of another point of a searched run's front: chosen afterwards, without a search."""
    search = rec.selection.get("search")
    if not search:
        raise AbliterateError("--trial picks a point of a searched run's front; this run did not search (--search)")
    entry = next((p for p in search["front"] if p["trial"] == trial), None)
    if entry is None:
        on_front = ", ".join(str(p["trial"]) for p in search["front"])
        raise AbliterateError(f"trial {trial} is not on the run's Pareto front; pick one of {on_front}")
    scored = Scored.from_dict(entry)
    candidates = Candidates(tensors["mean_differences"].double(), tensors["candidate_directions"].double())
    reason = (
        f"front trial {trial}, picked after the search with `abliterate apply --trial {trial}`: validation "
        f"P(refusal opening) {scored.refusal:.3f}, over-refusal {scored.over_refusal:.3f}, first-token KL "
        f"{scored.kl:.3g} (upper bound {scored.kl_bound:.3g})"
    )
    point = scored.point
    selection = {**rec.selection, "position": point.position, "layer": point.layer, "directions": point.directions,
                 "reason": reason,
                 "search": {**search, "chosen": trial}}  # fmt: skip
    edit = EditInfo.of(point.params, [], rec.edit.tie_word_embeddings)
    # Runs since several directions store each front point's; older ones had one, rebuilt from the candidates.
    direction = tensors.get(f"front.{trial}")
    direction = point.direction(candidates) if direction is None else direction
    # The run's metrics measured its own choice, not this point: they do not travel with it.
    return replace(rec, selection=selection, edit=edit, metrics=None), direction
