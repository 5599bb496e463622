"""Save a run: the model in HF layout, directions, abliteration.json and a model card, atomically."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .capture import ResidualMeans
from .directions import Candidates
from .edit import EditParams
from .errors import AbliterateError
from .model import DTYPES, LoadedModel, context_length
from .report import metrics_rows
from .select import Selection
from .settings import Settings


@contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on any failure it vanishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output folder should not be
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o666 & ~umask)  # safetensors writes its files private; the output should not be
        if out.exists():
            if not force:
                raise AbliterateError(f"output folder {out} appeared during the run; pass --force to replace it")
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)  # keep the previous output until the new one is in place
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        raise AbliterateError(
            f"could not write {out}: {exc.strerror or exc}; free disk space or pick another --out"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(lm: LoadedModel, folder: Path, dtype: str) -> None:
    """save_pretrained in the source dtype (float32 for GGUF sources) unless a dtype was asked for."""
    target = lm.source_dtype if dtype == "auto" else DTYPES[dtype]
    net = lm.model
    original = next(net.parameters()).dtype
    net.to(target)
    try:
        net.save_pretrained(folder, safe_serialization=True)
    finally:
        net.to(original)
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


def write_json(path: Path, data: dict) -> None:
    """Pretty JSON, UTF-8."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
        raise AbliterateError(f"{path} is not a usable abliteration record ({exc}); pass a run's abliteration.json") from None
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


def model_card(rec: dict) -> str:
    """README.md with YAML front matter, the metrics table, parameters and limitations."""
    model = rec["model"]
    sel = rec["selection"]
    induced = rec["edit"]["kind"] == "induce"
    norm_preserving = bool(rec["edit"].get("norm_preserving", False))
    front = ["---"]
    if model["base_model"]:
        front += [f"base_model: {model['base_model']}", "base_model_relation: finetune"]
    if model["license"]:
        front.append(f"license: {model['license']}")
    front += [
        "library_name: transformers",
        "tags:",
        "  - refusal-induced" if induced else "  - abliterated",
        "  - refusal-direction",
        "  - abliterate",
        "---",
    ]
    lines = front + [
        "",
        f"# {model['base_model'] or model['spec']}, {'refusal strengthened' if induced else 'abliterated'}",
        "",
        f"The refusal direction of `{model['base_model'] or model['spec']}` (difference of mean residual activations "
        f"on harmful and harmless prompts, layer {sel['layer']}, position {sel['position']} from the end of the prompt) "
        f"was {'amplified in' if induced else 'projected out of'} every matrix that writes to the residual stream, by "
        f"[abliterate](https://pypi.org/project/abliterate/) {rec['abliterate_version']}.",
        "",
        "## Evaluation",
        "",
    ]
    if "applied_to" in rec:
        lines += [f"This edit was re-applied to `{rec['applied_to']['source']}` with `abliterate apply`; the numbers below "
                  "were measured by the run that made it.", ""]  # fmt: skip
    if rec["metrics"]:
        lines += ["| metric | original | abliterated | paired p |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in metrics_rows(rec["metrics"])]
        lines += [
            "",
            "Rates over all answers with 95% Wilson intervals; p is an exact McNemar test on the same prompts; "
            f"greedy answers of {rec['settings']['max_new_tokens']} new tokens judged whole by abliterate's judge.",
        ]
    else:
        lines.append("Not evaluated (`--no-eval`).")
    lines += [
        "",
        "## Parameters",
        "",
        f"- direction from layer {sel['layer']}, position {sel['position']}; {sel['reason']}",
        f"- edit: scale {rec['edit']['scale']} (1 = full projection), writers from layer {rec['edit']['start_layer']} on"
        + ("; norm-preserving: every vector a writer adds to the residual stream keeps its original length"
           if norm_preserving else ""),
        f"- refusal openings learned from the model: {rec['refusal_tokens']['tokens']}",
        f"- prompts: train {rec['settings']['n_train']}, validation {rec['settings']['n_val']}, "
        f"test {rec['settings']['n_test']} of each kind; seed {rec['seed']}",
        "",
        "## Reproduce",
        "",
        "```",
        f"abliterate run {model['spec']} --out OUT --layer {sel['layer']} --seed {rec['seed']}"
        + (" --induce" if induced else "") + (" --norm-preserving" if norm_preserving else ""),
        "```",
        "",
        "`abliteration.json` holds every setting, prompt-set hashes and package versions; "
        "`directions.safetensors` holds the direction.",
        "",
        "## Limitations",
        "",
        "- Refusal is judged by abliterate's judge (rules, then a small classifier over sentence embeddings; "
        "`abliterate judge-accuracy --split test` measures it against held-out human labels). It misses some soft "
        "refusals, mostly answers to a safer question than the one asked, and flags a few compliant answers; "
        "`evaluation.json` holds every answer so you can check.",
        "- KL is measured on harmless prompts over the first tokens of the original model's answers; damage "
        "that shows later in long answers, or only on other kinds of input, is not in those numbers.",
        "- Strengthening refusal makes the model refuse more of everything that sounds dangerous, benign "
        "requests included; see the over-refusal row."
        if induced
        else "- Removing refusal removes a safeguard. The model will answer requests it used to decline.",
        "",
    ]
    return "\n".join(lines)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(temp_path) for a temp file beside `path`, then rename it into place; no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
