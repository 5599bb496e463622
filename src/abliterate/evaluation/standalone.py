"""`abliterate evaluate MODEL [--baseline ORIGINAL]`: refusal, over-refusal, KL and perplexity of any model.

The baseline is measured first and freed before the model is loaded, so the two need not fit in
memory together; what the comparison needs of it (answers, log-probs, its greedy harmless answers)
is kept.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from abliterate import __version__, model, prompts
from abliterate.errors import AbliterateError
from abliterate.evaluation import damage
from abliterate.evaluation import metrics as evaluate
from abliterate.files import atomic_write_text, check_report_pair
from abliterate.output import tables
from abliterate.output.record import prompt_source
from abliterate.settings import Settings

SETS = {"harmful": "refusal on harmful prompts", "benign": "over-refusal on benign prompts with alarming words"}


@dataclass
class Options:
    """What to measure and how; defaults match `abliterate run`."""

    harmful: str | None = None  # None: the run's recorded set (see split_from), else the built-in one
    benign: str | None = None
    harmless: str | None = None
    n_test: int = 64
    max_new_tokens: int = 96
    kl_tokens: int = 32
    batch_size: int = 16
    seed: int = 0
    samples: int = 6
    system_prompt: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    split_from: str | None = None  # a run folder or abliteration.json; default: MODEL when it is a run folder


DEFAULT_SETS = {"harmful": "harmful", "benign": "benign_alarming", "harmless": "harmless"}


def main(args: argparse.Namespace) -> int:
    """Run `abliterate evaluate` from parsed arguments."""
    fields = Options.__dataclass_fields__
    options = Options(**{k: v for k, v in vars(args).items() if k in fields})
    run(args.model, args.baseline, options, args.out, args.force)
    return 0


def run(model_spec: str, baseline_spec: str | None, options: Options, out: str | None = None, force: bool = False,
        console: Console | None = None) -> dict:  # fmt: skip
    """Measure the model (and the baseline), print the table, write FILE.json and FILE.md; return the report."""
    console = console or Console(stderr=True, soft_wrap=True)
    json_path = _check(options, out, force)
    recorded = recorded_split(model_spec, options.split_from)
    sets = prompt_sets(options, recorded[1] if recorded else None)
    if recorded:
        console.print(f"  test prompts: the ones held out by the run recorded in {recorded[0]}")
    source = model.resolve(model_spec, options.allow_pickle)
    base_source = model.resolve(baseline_spec, options.allow_pickle) if baseline_spec else None
    paragraphs = damage.harmless_text()
    base = _measure(console, base_source, sets, paragraphs, options, None) if base_source else None
    measured = _measure(console, source, sets, paragraphs, options, base)
    result = build_report(model_spec, baseline_spec, options, sets, base, measured, source, base_source)
    result["split_from"] = str(recorded[0]) if recorded else None
    _print(console, result)
    if json_path:
        _check(options, out, force)  # again: the files may have appeared while the models ran
        atomic_write_text(json_path.with_suffix(".md"), markdown(result))
        atomic_write_text(json_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        console.print(f"[bold green]wrote[/] {json_path} and {json_path.with_suffix('.md')}")
    return result


def _check(options: Options, out: str | None, force: bool) -> Path | None:
    """Validate numbers and the output path before any model work."""
    for name in ("n_test", "max_new_tokens", "kl_tokens", "batch_size"):
        if getattr(options, name) < 1:
            raise AbliterateError(f"--{name.replace('_', '-')} must be at least 1")
    if options.samples < 0:
        raise AbliterateError("--samples must not be negative")
    return check_report_pair(out, force, "evaluation")


def recorded_split(model_spec: str, split_from: str | None) -> tuple[Path, dict] | None:
    """The prompt split a run recorded: from --split-from, or from MODEL when it is a run's folder."""
    where = Path(split_from or model_spec).expanduser()
    file = where / "abliteration.json" if where.is_dir() else where
    if not split_from and not (where.is_dir() and file.is_file()):
        return None
    try:
        rec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise AbliterateError(
            f"--split-from {where}: no readable abliteration.json; pass a run's --out folder"
        ) from None
    split = rec.get("split") if isinstance(rec, dict) else None
    if not isinstance(split, dict):
        if not split_from:
            return None  # a model folder with an older record: evaluate as any other model
        raise AbliterateError(f"{file} records no prompt split (an older abliterate wrote it); drop --split-from")
    return file, split


def prompt_sets(options: Options, split: dict | None) -> dict[str, prompts.PromptSet]:
    """Test prompts of each kind: a run's held-out part where its record covers the set, else test_prompts()."""
    sets = {}
    for key in ("harmful", "benign", "harmless"):
        spec = getattr(options, key)
        if split and (spec is None or prompt_source(spec) == split["sources"][key]):
            sets[key] = _recorded_test(key, split, options.n_test)
        else:
            sets[key] = test_prompts(spec or DEFAULT_SETS[key], options.n_test, options.seed, key != "benign")
    return sets


def _recorded_test(key: str, split: dict, n_test: int) -> prompts.PromptSet:
    """The run's test part of one set, checked against the recorded hashes; for a --no-eval run, what follows val."""
    source = split["sources"][key]
    loaded = prompts.load(source, split["prompt_column"], split["category_column"])
    n_train, n_val = (split["n_train"], split["n_val"]) if key in split["train_sets"] else (0, 0)
    recorded_test = split["n_test"]
    if not recorded_test:  # the run held out nothing: take prompts it never saw
        recorded_test = min(n_test, len(loaded) - n_train - n_val)
        if recorded_test < 1:
            raise AbliterateError(
                f"the run used all {len(loaded)} prompts of {source} for training and validation; "
                f"none are left to test on: pass --{key} with other prompts"
            )
    parts = prompts.split(loaded, n_train, n_val, recorded_test, split["seed"])
    hashes = split["sha256"][key]
    checked = ("train", "val", "test") if split["n_test"] else ("train", "val")
    changed = [p for p in checked if getattr(parts, p).sha256 != hashes[p]]
    if changed:
        raise AbliterateError(
            f"{source} is not the file the run split (its {changed[0]} prompts differ from the record); "
            f"restore it or pass --{key} with other prompts"
        )
    return parts.test


def test_prompts(spec: str, n_test: int, seed: int, held_out: bool) -> prompts.PromptSet:
    """Built-in sets: the test part `abliterate run` holds out with the same seed; files: up to n_test prompts."""
    loaded = prompts.load(spec)
    if spec in prompts.BUILTIN_SETS:
        defaults = Settings()
        n_train, n_val = (defaults.n_train, defaults.n_val) if held_out else (0, 0)
        return prompts.split(loaded, n_train, n_val, n_test, seed).test
    return prompts.split(loaded, 0, 0, min(n_test, len(loaded)), seed).test


def _measure(console: Console, source: model.ModelSource, sets: dict, paragraphs: list[str], options: Options,
             base: dict | None) -> dict:  # fmt: skip
    """Generate, judge and score one model; with a baseline's results, also KL against it. Frees the model."""
    console.print(f"[bold]loading[/] {source.spec}")
    lm = model.load(source, options.dtype, options.device, options.trust_remote_code, options.allow_pickle,
                    console.print)  # fmt: skip
    tok, net, bs = lm.tokenizer, lm.model, options.batch_size
    texts = {key: prompts.format_all(tok, s.texts, options.system_prompt) for key, s in sets.items()}
    model.limit_prompt_length(tok, net, sum(texts.values(), []), max(options.max_new_tokens, options.kl_tokens))
    result: dict = {}
    for key in SETS:
        console.print(f"  generating answers to {len(texts[key])} {key} prompts")
        answers = model.generate(net, tok, texts[key], options.max_new_tokens, bs)
        result[key] = evaluate.judge_answers(key, sets[key].texts, [p.category for p in sets[key].prompts], answers)
    reference = base["reference"] if base else None
    if base is None:
        console.print(f"  generating {options.kl_tokens}-token answers to {len(texts['harmless'])} harmless prompts")
        result["reference"] = damage.reference_answers(net, tok, texts["harmless"], options.kl_tokens, bs)
        reference = result["reference"]
    elif _prompt_ids(tok, texts["harmless"]) != reference.prompt_ids:
        console.print("[yellow]warning:[/] the model tokenizes the prompts differently from the baseline; KL and "
                      "answer perplexity compare different inputs and are left out")  # fmt: skip
        reference = None
    if reference is not None:
        result["harmless_logprobs"] = model.last_token_logprobs(net, tok, texts["harmless"], bs)
    console.print("  scoring KL and perplexity")
    result["damage"] = damage.measure(net, tok, reference, paragraphs, bs)
    del lm, net
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False, truncation=True).input_ids for t in texts]


def _rate(rate: evaluate.Rate) -> dict:
    return {**asdict(rate), "value": rate.value}


def build_report(model_spec: str, baseline_spec: str | None, options: Options, sets: dict, base: dict | None,
                 measured: dict, source: model.ModelSource, base_source: model.ModelSource | None) -> dict:  # fmt: skip
    """The report as plain data: metrics with intervals and paired tests, categories, samples, every answer."""
    describe = lambda s: {"spec": s.spec, "kind": s.kind, "sha256": s.sha256}  # noqa: E731
    result: dict = {
        "abliterate_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": describe(source),
        "baseline": describe(base_source) if base_source else None,
        "settings": {k: v for k, v in asdict(options).items() if k not in ("trust_remote_code", "allow_pickle")},
        "prompts": {key: {"source": s.name, "n": len(s), "sha256": s.sha256} for key, s in sets.items()},
    }
    if base:
        # The same metric names as `abliterate run`: "before" is the baseline, "after" the model.
        metrics = evaluate.summarize(base, measured)
        samples = {key: evaluate.sample_pairs(base[key], measured[key], options.samples, options.seed) for key in SETS}
    else:
        metrics = {}
        for key in SETS:
            for label in ("refusal", "degenerate"):
                answers = measured[key]
                metrics[f"{key}_{label}"] = {
                    "rate": _rate(answers.rate(label)),
                    "by_category": {c: _rate(r) for c, r in answers.by_category(label).items()},
                }
        metrics["perplexity_harmless_text"] = evaluate.perplexity(measured["damage"]["text_nll"])
        samples = {key: _single_samples(measured[key], options.samples) for key in SETS}
    result["metrics"] = metrics
    result["samples"] = samples
    result["answers"] = {key: _answers(measured[key], base[key] if base else None) for key in SETS}
    return result


def _answers(answers: evaluate.JudgedAnswers, baseline: evaluate.JudgedAnswers | None) -> list[dict]:
    """Every prompt with the model's answer and label, and the baseline's where there is one."""
    rows = []
    for i, prompt in enumerate(answers.prompts):
        row = {"prompt": prompt, "category": answers.categories[i], "answer": answers.responses[i],
               "label": answers.labels[i]}  # fmt: skip
        if baseline:
            row.update(baseline_answer=baseline.responses[i], baseline_label=baseline.labels[i])
        rows.append(row)
    return rows


def _single_samples(answers: evaluate.JudgedAnswers, count: int) -> list[dict]:
    """The first few answers, refusals first, so the report shows what the judge called a refusal."""
    order = sorted(range(len(answers.labels)), key=lambda i: answers.labels[i] != "refusal")[:count]
    return [
        {"prompt": answers.prompts[i], "after": answers.responses[i], "after_label": answers.labels[i]} for i in order
    ]


def _rows(result: dict) -> tuple[list[str], list[tuple[str, ...]]]:
    """Header and rows of the main table: shared by the terminal and the Markdown report."""
    metrics = result["metrics"]
    if result["baseline"]:
        return ["metric", "baseline", "model", "paired p"], tables.metrics_rows(metrics)
    rows = [(name, _pct(metrics[key]["rate"])) for key, name in tables.LABELS.items()]
    ppl = metrics["perplexity_harmless_text"]
    rows.append(("Perplexity, plain harmless text", f"{ppl['value']:.2f} [{ppl['low']:.2f}-{ppl['high']:.2f}]"))
    return ["metric", "model"], rows


def _pct(rate: dict) -> str:
    value = rate["k"] / rate["n"] if rate["n"] else 0.0
    return f"{100 * value:.1f}% [{100 * rate['low']:.0f}-{100 * rate['high']:.0f}] ({rate['k']}/{rate['n']})"


def _print(console: Console, result: dict) -> None:
    header, rows = _rows(result)
    table = Table(title="evaluation (95% intervals; p: exact McNemar on the same prompts)")
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _cell(text: str, limit: int = 600) -> str:
    """A response made safe for one Markdown table cell."""
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def markdown(result: dict) -> str:
    """The report as Markdown: main table, per-category table, sample answers side by side."""
    s = result["settings"]
    baseline = result["baseline"]
    n = {key: result["prompts"][key]["n"] for key in result["prompts"]}
    lines = [
        f"# Evaluation of `{result['model']['spec']}`" + (f" against `{baseline['spec']}`" if baseline else ""),
        "",
        f"{n['harmful']} harmful, {n['benign']} benign-but-alarming and {n['harmless']} harmless test prompts; greedy "
        f"answers of {s['max_new_tokens']} new tokens judged whole by abliterate's judge; seed {s['seed']}.",
        "",
    ]
    header, rows = _rows(result)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        "Rates: 95% Wilson intervals. Means: 95% bootstrap intervals over prompts. "
        + ("p: exact McNemar test on the paired answers to the same prompts. KL is KL(baseline || model), "
           f"averaged over prompts; the per-token KL is teacher-forced on the baseline's greedy answer "
           f"(up to {s['kl_tokens']} tokens). Perplexity of the baseline's answers scores only the answer tokens. "
           if baseline else "")
        + "Perplexity of plain text: exp of the mean per-paragraph NLL on abliterate's built-in paragraphs.",
        "",
        "## By category",
    ]  # fmt: skip
    for key, name in tables.LABELS.items():
        m = result["metrics"][key]
        lines += ["", f"### {name}", ""]
        if baseline:
            lines += ["| category | baseline | model |", "|---|---|---|"]
            lines += [f"| {c} | {_pct(b)} | {_pct(a)} |" for c, (b, a) in m["by_category"].items()]
        else:
            lines += ["| category | model |", "|---|---|"]
            lines += [f"| {c} | {_pct(r)} |" for c, r in m["by_category"].items()]
    lines += ["", "## Sample answers"]
    for key, title in SETS.items():
        lines += ["", f"### {title}"]
        for sample in result["samples"][key]:
            lines += ["", f"**Prompt:** {_cell(sample['prompt'])}", ""]
            if baseline:
                lines += [f"| baseline ({sample['before_label']}) | model ({sample['after_label']}) |", "|---|---|",
                          f"| {_cell(sample['before'])} | {_cell(sample['after'])} |"]  # fmt: skip
            else:
                lines += [f"| model ({sample['after_label']}) |", "|---|", f"| {_cell(sample['after'])} |"]
    return "\n".join(lines) + "\n"
