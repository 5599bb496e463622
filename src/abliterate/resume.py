"""Per-stage artifacts in the cache, so an interrupted or repeated run resumes instead of recomputing.

A stage's result is stored under $ABLITERATE_CACHE/stages/KEY/, where KEY hashes everything the
result depends on (model identity, prompt hashes, the settings that matter, abliterate's version).
Files are written to a temp name and renamed, so a Ctrl-C never leaves a half-written artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file

from abliterate import __version__, offline
from abliterate.capture import ResidualMeans
from abliterate.files import atomic_write
from abliterate.judge import learned, rules
from abliterate.model import ModelSource
from abliterate.selection import CandidateScore, RefusalTokens, Selection

T = TypeVar("T")


def model_identity(source: ModelSource) -> str:
    """A string that changes when the model's weights change."""
    if source.sha256:
        return source.sha256
    if source.kind == "folder" and source.path:
        files = sorted(p for p in source.path.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
        return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return source.spec


def judge_fingerprint() -> str:
    """Hash of the shipped judge (classifier weights and rule source): a changed judge labels refusals anew."""
    digest = hashlib.sha256()
    for path in (learned.CLASSIFIER_FILE, Path(rules.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(source: ModelSource, stage: str, inputs: dict) -> str:
    """Hash of a stage's inputs."""
    payload = json.dumps({"v": __version__, "model": model_identity(source), "stage": stage, **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Stage(Generic[T]):
    """A cached stage: its name in the key, and how its result is stored and read back."""

    name: str
    load: Callable[[str], T | None]
    save: Callable[[str, T], None]


def cached(
    stage: Stage[T], source: ModelSource, inputs: dict, compute: Callable[[], T], on_hit: Callable[[], None]
) -> T:
    """The stage's stored result for these inputs, or compute it and store it (on_hit tells the user it resumed)."""
    key = stage_key(source, stage.name, inputs)
    found = stage.load(key)
    if found is not None:
        on_hit()
        return found
    result = compute()
    stage.save(key, result)
    return result


def _folder(key: str) -> Path:
    return offline.cache_dir() / "stages" / key


def save_means(key: str, means: tuple[ResidualMeans, ResidualMeans]) -> None:
    """Store both running sums (harmful, harmless) with their counts."""
    harmful, harmless = means
    tensors = {"harmful": harmful.sums, "harmless": harmless.sums}
    for name, part in (("harmful", harmful), ("harmless", harmless)):
        if part.position_counts is not None:
            tensors[f"{name}_position_counts"] = part.position_counts
        if part.last_token is not None:
            tensors[f"{name}_last_token"] = part.last_token
    meta = {"harmful_count": str(harmful.count), "harmless_count": str(harmless.count)}
    atomic_write(_folder(key) / "means.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_means(key: str) -> tuple[ResidualMeans, ResidualMeans] | None:
    """The stored means, or None if this stage has not finished before."""
    path = _folder(key) / "means.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    means = lambda name: ResidualMeans(  # noqa: E731
        tensors[name].to(torch.float64), int(meta[f"{name}_count"]), tensors.get(f"{name}_position_counts"),
        tensors.get(f"{name}_last_token"),
    )  # fmt: skip
    return means("harmful"), means("harmless")


def save_selection(key: str, selection: Selection) -> None:
    """Store the selection (every score and the choice) as JSON."""
    data = {
        "chosen": selection.scores.index(selection.chosen),
        "scores": [s.as_dict() for s in selection.scores],
        "baseline_refusal_harmful": selection.baseline_refusal_harmful,
        "baseline_refusal_harmless": selection.baseline_refusal_harmless,
        "kl_threshold": selection.kl_threshold,
        "refusal_tokens": dataclasses.asdict(selection.refusal_tokens),
        "reason": selection.reason,
        "baseline_refused": selection.baseline_refused,
        "n_val": selection.n_val,
    }
    atomic_write(_folder(key) / "selection.json", lambda tmp: Path(tmp).write_text(json.dumps(data)))


def load_selection(key: str) -> Selection | None:
    """The stored selection, or None."""
    path = _folder(key) / "selection.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    scores = [CandidateScore(**s) for s in data["scores"]]
    tokens = data["refusal_tokens"]
    refusal_tokens = RefusalTokens(**{**tokens, "ids": tuple(tokens["ids"]), "tokens": tuple(tokens["tokens"])})
    return Selection(
        scores[data["chosen"]],
        scores,
        data["baseline_refusal_harmful"],
        data["baseline_refusal_harmless"],
        data["kl_threshold"],
        refusal_tokens,
        data["reason"],
        data.get("baseline_refused"),
        data.get("n_val"),
    )


COLLECT = Stage("collect", load_means, save_means)
SELECT = Stage("select", load_selection, save_selection)
