"""Save a run: the model in HF layout, directions, abliteration.json and a model card, atomically."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import struct
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
from .edit import EditParams, orthogonalize
from .errors import AbliterateError
from .model import LoadedModel, context_length, load, save_dtype
from .prompts import BUILTIN_SETS
from .report import metrics_rows
from .select import Selection
from .settings import Settings


def _json(path: Path):
    """The parsed JSON file, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_run_folder(path: Path) -> bool:
    """An output folder of run, apply or export-adapter: its abliteration.json record names a version and an edit."""
    rec = _json(path / "abliteration.json")
    return isinstance(rec, dict) and "abliterate_version" in rec and isinstance(rec.get("edit"), dict)


def _is_report_folder(path: Path) -> bool:
    """A run's report/ folder: plain .png files only."""
    return all(p.is_file() and not p.is_symlink() and p.suffix == ".png" for p in path.iterdir())


def _json_with(*keys: str) -> Callable[[Path], bool]:
    def ours(path: Path) -> bool:
        data = _json(path)
        return isinstance(data, dict) and all(k in data for k in keys)

    return ours


def _starts_with(prefix: str) -> Callable[[Path], bool]:
    def ours(path: Path) -> bool:
        try:
            with path.open(encoding="utf-8") as f:
                return f.read(len(prefix)) == prefix
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def _is_labels(path: Path) -> bool:
    """`abliterate judge` output: every line a JSON object with a label and a score."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return bool(rows) and all(isinstance(r, dict) and "label" in r and "score" in r for r in rows)


def _is_our_gguf(path: Path) -> bool:
    """A GGUF written by export-gguf: it carries the abliterate.version key."""
    from .gguf_export import MARKER_KEY, read_metadata

    try:
        return MARKER_KEY in read_metadata(path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return False


# kind -> (is a folder, recognizer of our own earlier output, what that output is)
OUTPUTS: dict[str, tuple[bool, Callable[[Path], bool], str]] = {
    "folder": (True, _is_run_folder, "an earlier abliterate output folder (one with its abliteration.json record)"),
    "report": (True, _is_report_folder, "a report folder of .png files"),
    "gguf": (False, _is_our_gguf, "a GGUF written by abliterate export-gguf"),
    "evaluation": (False, _json_with("abliterate_version", "metrics", "answers"), "an abliterate evaluate report"),
    "evaluation-md": (False, _starts_with("# Evaluation of `"), "an abliterate evaluate report"),
    "benchmark": (False, _json_with("tasks", "rows", "results"), "an abliterate benchmark report"),
    "benchmark-md": (False, _starts_with("# lm-evaluation-harness: `"), "an abliterate benchmark report"),
    "labels": (False, _is_labels, "labels written by abliterate judge"),
    "classifier": (False, _json_with("features", "labels", "coef"), "a classifier written by abliterate judge-train"),
}


def check_output(path: str | Path, force: bool, kind: str = "folder") -> Path:
    """Refuse an output path that would destroy data; return it expanded.

    A missing path is fine. An existing one is replaced only with `force`, and only if it is an
    empty folder (for folder outputs) or what abliterate itself wrote there (OUTPUTS says how each
    kind is recognised). The current directory, the home folder and the folders above them never are.
    """
    folder, ours, what = OUTPUTS[kind]
    path = Path(path).expanduser()
    resolved = path.resolve()
    for name, guarded in (("your home folder", Path.home().resolve()), ("the current directory", Path.cwd().resolve())):
        if resolved == guarded or resolved in guarded.parents:
            raise AbliterateError(f"--out {path} is {name} or a folder above it; name a new folder or file instead")
    if path.is_symlink():
        raise AbliterateError(f"--out {path} is a symbolic link; name the real path or a new one")
    if not path.exists():
        return path
    if folder and not path.is_dir():
        raise AbliterateError(f"--out {path} is an existing file, not a folder; name a new folder instead")
    if not folder and path.is_dir():
        raise AbliterateError(f"--out {path} is a folder; name a file instead")
    if not (folder and not any(path.iterdir())) and not ours(path):
        raise AbliterateError(
            f"{path} exists and is not {what}; --force replaces only "
            f"{'an empty folder or ' if folder else ''}that, so choose another --out"
        )
    if not force:
        raise AbliterateError(f"{path} already exists; pass --force to replace it or choose another --out")
    return path


@contextmanager
def staging(out: Path, force: bool, kind: str = "folder") -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on any failure it vanishes.

    `out` is checked with check_output again just before it is replaced: it may have changed during the run.
    """
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
        check_output(out, force, kind)
        if out.exists():
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


PARTS = ("train", "val", "test")


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
