"""`abliterate benchmark MODEL --tasks a,b`: lm-evaluation-harness tasks, the original and the model side by side.

lm-eval is an optional dependency (`pip install 'abliterate[benchmark]'`); the tasks' datasets are
fetched by lm-eval itself, so this is for users who have them. Models are loaded by abliterate and
handed to lm-eval's HFLM wrapper, so built-in names and GGUF files work as everywhere else.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from abliterate import model
from abliterate.errors import AbliterateError
from abliterate.files import atomic_write_text, check_report_pair
from abliterate.settings import LoadOptions

INSTALL = "lm-evaluation-harness is not installed; pip install 'abliterate[benchmark]'"


def _lm_eval():
    """The lm_eval package and its HFLM wrapper, or a one-line error saying how to install them."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise AbliterateError(INSTALL) from None
    return lm_eval, HFLM


def run(model_spec: str, baseline_spec: str | None, tasks: list[str], limit: int | None = None, batch_size: int = 8,
        out: str | None = None, force: bool = False, load: LoadOptions = LoadOptions(),
        console: Console | None = None) -> dict:  # fmt: skip
    """Evaluate the baseline (if any), then the model, one at a time; print and optionally write the comparison."""
    console = console or Console(stderr=True, soft_wrap=True)
    if not tasks:
        raise AbliterateError("no tasks given; pass --tasks with lm-eval task names, e.g. --tasks arc_easy")
    if limit is not None and limit < 1:
        raise AbliterateError("--limit must be at least 1")
    path = _check_out(out, force)
    lm_eval, hflm = _lm_eval()
    sources = {"model": model.resolve(model_spec, load.allow_pickle)}
    if baseline_spec:
        sources = {"baseline": model.resolve(baseline_spec, load.allow_pickle), **sources}
    results = {}
    for role, source in sources.items():
        console.print(f"[bold]benchmarking[/] {role} {source.spec} on {', '.join(tasks)}")
        lm = model.load(source, load, console.print)
        lm.tokenizer.padding_side = "left"
        wrapped = hflm(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
        try:
            output = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=limit)
        except (KeyError, ValueError) as exc:  # lm-eval's errors for unknown tasks
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AbliterateError(f"lm-eval could not run tasks {tasks}: {first}; check the task names") from None
        results[role] = output["results"]
        del lm, wrapped
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows = side_by_side(results.get("baseline"), results["model"])
    report = {
        "model": model_spec,
        "baseline": baseline_spec,
        "tasks": tasks,
        "limit": limit,
        "rows": rows,
        "results": results,
    }
    _print(console, rows, bool(baseline_spec))
    if path:
        _check_out(out, force)  # again: the files may have appeared while the models ran
        atomic_write_text(path.with_suffix(".md"), markdown(report))
        atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
        console.print(f"[bold green]wrote[/] {path} and {path.with_suffix('.md')}")
    return report


def _check_out(out: str | None, force: bool) -> Path | None:
    return check_report_pair(out, force, "benchmark")


def _metrics(task_result: dict) -> dict[str, tuple[float, float | None]]:
    """lm-eval's 'name,filter' entries as name -> (value, stderr); aliases and non-numbers are skipped."""
    found = {}
    for key, value in task_result.items():
        name, _, filt = key.partition(",")
        if name.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        stderr = task_result.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
        label = name if filt in ("", "none") else f"{name} ({filt})"
        found[label] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return found


def side_by_side(baseline: dict | None, edited: dict) -> list[dict]:
    """One row per (task, metric): the baseline's value, the model's, their stderr and the difference."""
    rows = []
    for task in sorted(edited):
        base_metrics = _metrics(baseline.get(task, {})) if baseline else {}
        for metric, (value, stderr) in sorted(_metrics(edited[task]).items()):
            row = {"task": task, "metric": metric, "model": value, "model_stderr": stderr}
            if baseline is not None:
                b, b_err = base_metrics.get(metric, (None, None))
                row.update(baseline=b, baseline_stderr=b_err, difference=None if b is None else value - b)
            rows.append(row)
    return rows


def _value(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _table(rows: list[dict], with_baseline: bool) -> tuple[list[str], list[list[str]]]:
    if with_baseline:
        header = ["task", "metric", "baseline", "model", "difference"]
        body = [
            [r["task"], r["metric"], _value(r["baseline"], r["baseline_stderr"]), _value(r["model"], r["model_stderr"]),
             "-" if r["difference"] is None else f"{r['difference']:+.4f}"]
            for r in rows
        ]  # fmt: skip
    else:
        header = ["task", "metric", "model"]
        body = [[r["task"], r["metric"], _value(r["model"], r["model_stderr"])] for r in rows]
    return header, body


def _print(console: Console, rows: list[dict], with_baseline: bool) -> None:
    header, body = _table(rows, with_baseline)
    table = Table(title="lm-evaluation-harness (± standard error as lm-eval reports it)")
    for col in header:
        table.add_column(col)
    for row in body:
        table.add_row(*row)
    console.print(table)


def markdown(report: dict) -> str:
    """The comparison as a Markdown table."""
    header, body = _table(report["rows"], report["baseline"] is not None)
    title = f"# lm-evaluation-harness: `{report['model']}`"
    if report["baseline"]:
        title += f" against `{report['baseline']}`"
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    note = "± is the standard error lm-eval reports."
    if report["limit"]:
        note += f" Only {report['limit']} examples per task (--limit): a quick look, not a result."
    return "\n".join(lines + ["", note]) + "\n"
