"""`abliterate evaluate MODEL [--baseline ORIGINAL]`: refusal, over-refusal, KL and perplexity of any model.

The baseline is measured first and freed before the model is loaded, so the two need not fit in
memory together; what the comparison needs of it (answers, log-probs, its greedy harmless answers)
is kept.
"""

from __future__ import annotations

import datetime
import gc
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from abliterate import __version__, model, prompts
from abliterate.errors import AbliterateError
from abliterate.evaluation.answers import sample_pairs
from abliterate.evaluation.measure import Measurement, MeasureOptions, answer_rows, measure, summarize
from abliterate.evaluation.metrics import RATE_ROWS, Metrics
from abliterate.files import atomic_write_text, check_report_pair
from abliterate.generation import Endpoint, Served, served_model
from abliterate.output import tables
from abliterate.output.record import RECORD, load_record, prompt_source
from abliterate.settings import LoadOptions, Settings

SETS = {"harmful": "refusal on harmful prompts", "benign": "over-refusal on benign prompts with alarming words"}


RUN = Settings()  # `abliterate run`'s defaults: the same measurement unless told otherwise


@dataclass
class Options:
    """What to measure and how; defaults are `abliterate run`'s."""

    harmful: str | None = None  # None: the run's recorded set (see split_from), else the built-in one
    benign: str | None = None
    harmless: str | None = None
    n_test: int = RUN.n_test
    max_new_tokens: int = RUN.max_new_tokens
    kl_tokens: int = RUN.kl_tokens
    batch_size: int = RUN.batch_size
    seed: int = RUN.seed
    samples: int = 6
    system_prompt: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    split_from: str | None = None  # a run folder or abliteration.json; default: MODEL when it is a run folder
    generate_endpoint: Endpoint | None = None  # a server of the model: the judged answers come from it
    baseline_endpoint: Endpoint | None = None  # the same for the baseline

    def measure_options(self) -> MeasureOptions:
        """How much to generate and score."""
        return MeasureOptions(self.max_new_tokens, self.kl_tokens, self.batch_size)


DEFAULT_SETS = {"harmful": RUN.harmful, "benign": RUN.benign, "harmless": RUN.harmless}


def run(model_spec: str, baseline_spec: str | None, options: Options, out: str | None = None, force: bool = False,
        console: Console | None = None) -> dict:  # fmt: skip
    """Measure the model (and the baseline), print the table, write FILE.json and FILE.md; return the report."""
    console = console or Console(stderr=True, soft_wrap=True)
    json_path = _check(options, out, force)
    recorded = recorded_split(model_spec, options.split_from)
    sets = prompt_sets(options, recorded[1] if recorded else None)
    if recorded:
        console.print(f"  test prompts: the ones held out by the run recorded in {recorded[0]}")
    source = model.resolve(model_spec, options.load.allow_pickle)
    base_source = model.resolve(baseline_spec, options.load.allow_pickle) if baseline_spec else None
    options = _check_servers(options, model_spec, baseline_spec)  # before any model is loaded
    base = (_measure(console, base_source, sets, options, "baseline", reference=True, endpoint=options.baseline_endpoint)
            if base_source else None)  # fmt: skip
    measured = _measure(console, source, sets, options, "model", base, endpoint=options.generate_endpoint)
    metrics = summarize(base, measured)
    tables.print_metrics(console, metrics, "baseline", "model")
    result = build_report(model_spec, baseline_spec, options, sets, base, measured, metrics, source, base_source)
    result["split_from"] = str(recorded[0]) if recorded else None
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


def _check_servers(options: Options, model_spec: str, baseline_spec: str | None) -> Options:
    """Each server is reachable and serves its model; the options with the served model ids filled in."""
    if options.baseline_endpoint and not baseline_spec:
        raise AbliterateError("--baseline-endpoint serves the baseline's answers: pass --baseline ORIGINAL too")
    checked = lambda e, spec: replace(e, model=served_model(e, spec)) if e and spec else e  # noqa: E731
    return replace(options, generate_endpoint=checked(options.generate_endpoint, model_spec),
                   baseline_endpoint=checked(options.baseline_endpoint, baseline_spec))  # fmt: skip


def recorded_split(model_spec: str, split_from: str | None) -> tuple[Path, dict] | None:
    """The prompt split a run recorded: from --split-from, or from MODEL when it is a run's folder."""
    where = Path(split_from or model_spec).expanduser()
    file = where / RECORD if where.is_dir() else where
    if not split_from and not (where.is_dir() and file.is_file()):
        return None
    try:
        split = load_record(where).split
    except AbliterateError:
        if not split_from:
            return None  # a model folder whose record we cannot read: evaluate it as any other model
        raise AbliterateError(f"--split-from {where}: no readable {RECORD}; pass a run's --out folder") from None
    if split is None:
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


def _measure(console: Console, source: model.ModelSource, sets: dict[str, prompts.PromptSet], options: Options,
             when: str, base: Measurement | None = None, reference: bool = False,
             endpoint: Endpoint | None = None) -> Measurement:  # fmt: skip
    """Load, measure and free one model; the baseline (reference=True) also makes the reference answers for KL.

    With an endpoint (its served model id already checked), the judged answers come from that server.
    """
    console.print(f"[bold]loading[/] {source.spec}")
    lm = model.load(source, options.load, console.print)
    texts = {key: prompts.format_all(lm.tokenizer, s.texts, options.system_prompt) for key, s in sets.items()}
    reserve = max(options.max_new_tokens, options.kl_tokens)
    tokenizer, _ = model.limit_prompt_length(lm.tokenizer, lm.model, sum(texts.values(), []), reserve)
    served = None
    if endpoint:
        assert endpoint.model is not None  # _check_servers named the served model
        console.print(f"  answers from the server at {endpoint.base} ({endpoint.model})")
        served = Served(endpoint, endpoint.model, tokenizer, options.system_prompt)
    result = measure(replace(lm, tokenizer=tokenizer), sets, texts, options.measure_options(), console, when, base,
                     reference, served)  # fmt: skip
    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def build_report(model_spec: str, baseline_spec: str | None, options: Options, sets: dict,
                 base: Measurement | None, measured: Measurement, metrics: Metrics,
                 source: model.ModelSource, base_source: model.ModelSource | None) -> dict:  # fmt: skip
    """The report as plain data: metrics with intervals and paired tests, categories, samples, every answer."""
    describe = lambda s: {"spec": s.spec, "kind": s.kind, "sha256": s.sha256}  # noqa: E731
    samples = {
        key: sample_pairs(base.answers[key] if base else None, measured.answers[key], options.samples, options.seed)
        for key in SETS
    }
    return {
        "abliterate_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": describe(source),
        "baseline": describe(base_source) if base_source else None,
        # settings record each endpoint's URL and served model id: which server wrote the answers
        "settings": {k: v for k, v in asdict(options).items() if k != "load"}
        | {"dtype": options.load.dtype, "device": options.load.device},
        "prompts": {key: {"source": s.name, "n": len(s), "sha256": s.sha256} for key, s in sets.items()},
        # The same metric names as `abliterate run`: "before" is the baseline, "after" the model.
        "metrics": metrics.as_dict(),
        "samples": samples,
        "answers": answer_rows(base, measured),
    }


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
        f"answers of {s['max_new_tokens']} new tokens judged whole by abliterate's judge; seed {s['seed']}."
        + "".join(f" The {who}'s answers came from the server at {e['url']} (model `{e['model']}`)."
                  for who, e in (("model", s.get("generate_endpoint")), ("baseline", s.get("baseline_endpoint"))) if e),
        "",
    ]  # fmt: skip
    metrics = Metrics.from_dict(result["metrics"])
    assert metrics is not None  # a report always measured the model
    lines += tables.markdown(metrics.header("baseline", "model"), metrics.rows())
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
    for key, name in RATE_ROWS.items():
        header = ("category", "n", "baseline", "model") if baseline else ("category", "n", "model")
        lines += ["", f"### {name}", "", *tables.markdown(header, metrics.rates[key].category_rows())]
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
