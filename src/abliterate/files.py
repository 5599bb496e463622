"""Files we write: atomic writes, staged output folders, and the check that never replaces a user's data.

A leaf: it imports nothing of abliterate's except the error type.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from abliterate.errors import AbliterateError


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


# kind -> (is a folder, recognizer of our own earlier output, what that output is)
OUTPUTS: dict[str, tuple[bool, Callable[[Path], bool], str]] = {
    "folder": (True, _is_run_folder, "an earlier abliterate output folder (one with its abliteration.json record)"),
    "report": (True, _is_report_folder, "a report folder of .png files"),
    "gguf": (False, lambda path: False, "a GGUF written by abliterate export-gguf"),  # export.gguf passes its reader
    "evaluation": (False, _json_with("abliterate_version", "metrics", "answers"), "an abliterate evaluate report"),
    "evaluation-md": (False, _starts_with("# Evaluation of `"), "an abliterate evaluate report"),
    "benchmark": (False, _json_with("tasks", "rows", "results"), "an abliterate benchmark report"),
    "benchmark-md": (False, _starts_with("# lm-evaluation-harness: `"), "an abliterate benchmark report"),
    "labels": (False, _is_labels, "labels written by abliterate judge"),
    "classifier": (False, _json_with("features", "labels", "coef"), "a classifier written by abliterate judge-train"),
}


def check_output(
    path: str | Path, force: bool, kind: str = "folder", ours: Callable[[Path], bool] | None = None
) -> Path:
    """Refuse an output path that would destroy data; return it expanded.

    A missing path is fine. An existing one is replaced only with `force`, and only if it is an
    empty folder (for folder outputs) or what abliterate itself wrote there (OUTPUTS says how each
    kind is recognised). The current directory, the home folder and the folders above them never are.
    """
    folder, recognizer, what = OUTPUTS[kind]
    ours = ours or recognizer
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


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
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


def write_json(path: Path, data: dict) -> None:
    """Pretty JSON, UTF-8."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_report_pair(out: str | None, force: bool, kind: str) -> Path | None:
    """A --out FILE.json with its Markdown twin beside it: both checked as `kind` and `kind-md`; None without --out."""
    if not out:
        return None
    path = Path(out).expanduser()
    if path.suffix.lower() != ".json":
        raise AbliterateError(f"--out {out} must name a .json file; the Markdown report is written beside it")
    check_output(path.with_suffix(".md"), force, f"{kind}-md")
    return check_output(path, force, kind)
