"""Command line: abliterate run | apply | chat | models | judge | judge-train | judge-accuracy."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from abliterate import __version__, settings
from abliterate.apply import apply as apply_edit
from abliterate.errors import AbliterateError
from abliterate.settings import LoadOptions


def _cmd_run(args: argparse.Namespace) -> int:
    from abliterate import pipeline

    cfg = settings.resolve(vars(args))
    pipeline.run(cfg)
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:

    apply_edit(
        args.source,
        args.edit,
        args.out,
        args.force,
        args.dtype,  # apply's --dtype is the save dtype; the model is read in its own
        LoadOptions(device=args.device, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle),
        push_to_hub=args.push_to_hub,
        in_memory=args.in_memory,
        trial=args.trial,
    )
    return 0


def _cmd_search_worker(args: argparse.Namespace) -> int:
    from abliterate import pipeline

    pipeline.search_worker(args.storage, args.study)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from abliterate import chat

    options = chat.ChatOptions(args.system, args.max_new_tokens, args.temperature)
    specs = [args.model] + ([args.compare] if args.compare else [])
    return chat.run(specs, options, _load_options(args), args.seed)


def _cmd_export_adapter(args: argparse.Namespace) -> int:
    from abliterate.export.adapter import export_adapter

    export_adapter(args.run, args.base, args.out, args.force, _load_options(args))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from abliterate import offline

    table = Table(title=f"built-in models (cache: {offline.cache_dir()})")
    for col in ("name", "original", "GGUF size", "status"):
        table.add_column(col)
    for m in offline.BUILTIN_MODELS.values():
        table.add_row(m.name, m.hub_id, f"{m.size_mb} MB", offline.status(m))
    Console().print(table)
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from abliterate.files import atomic_write_text, check_output
    from abliterate.judge import Classifier, judge_many, rule_judge
    from abliterate.prompts import read_jsonl

    out = check_output(args.out, args.force, "labels")
    items = read_jsonl(Path(args.file), ("prompt", "response"))
    if not items:
        raise AbliterateError(f"{args.file} has no records; give one JSON object with prompt and response per line")
    pairs = [(str(item["prompt"]), str(item["response"] or "")) for item in items]
    if args.llm_endpoint:
        from abliterate.judge.llm import llm_judge_many

        verdicts = llm_judge_many(pairs, args.llm_endpoint, args.llm_model)
    elif args.rules_only:
        verdicts = [rule_judge(p, r) for p, r in pairs]
    else:
        verdicts = judge_many(pairs, Classifier.load(Path(args.classifier)) if args.classifier else None)
    if args.explain:
        from abliterate.judge import explanation

        for number, v in enumerate(verdicts, 1):
            print(f"#{number} {explanation(v)}")
    extra = lambda v: {"stage": v.stage, "reason": v.reason} if args.explain else {}  # noqa: E731
    lines = [
        json.dumps({**item, "label": v.label, "score": round(v.score, 4), **extra(v)}, ensure_ascii=False)
        for item, v in zip(items, verdicts)
    ]
    check_output(out, args.force, "labels")  # again: an LLM judge takes long enough for the file to appear
    atomic_write_text(out, "\n".join(lines) + "\n")
    return 0


def _labelled_rows(file: str | None, split: str | None) -> tuple:
    """Rows of a labelled .jsonl (default: the built-in set), checked, optionally one split only."""
    from pathlib import Path

    from abliterate.judge.rules import LABELS
    from abliterate.prompts import DATA, read_jsonl

    path = Path(file) if file else DATA / "judge_labelled.jsonl"
    rows = read_jsonl(path, ("prompt", "response", "label"))
    for number, row in enumerate(rows, 1):
        if row["label"] not in LABELS:
            raise AbliterateError(
                f"{path}: record {number} has label {row['label']!r}; use refusal, compliance or degenerate"
            )
    rows = [r for r in rows if split is None or r.get("split") == split]
    if not rows:
        raise AbliterateError(f"{path} has no labelled rows{f' in split {split}' if split else ''}")
    return path, rows


def _cmd_judge_train(args: argparse.Namespace) -> int:
    from abliterate.files import check_output
    from abliterate.judge import learned, rule_judge

    out = check_output(args.out, args.force, "classifier")
    path, rows = _labelled_rows(args.file, args.split)
    verdicts = [rule_judge(r["prompt"], r["response"]) for r in rows]
    classifier = learned.train(rows, verdicts, args.max_fpr)
    classifier.save(check_output(out, args.force, "classifier"))
    meta = classifier.meta
    print(
        f"trained on {meta['n_train']} rows of {path.name}: C={meta['C']}, threshold {classifier.threshold:.3f}, "
        f"cross-validated accuracy {meta['cv_accuracy']:.3f}; wrote {args.out}"
    )
    return 0


def _cmd_judge_accuracy(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from abliterate.judge.accuracy import judge_accuracy

    path, rows = _labelled_rows(args.file, args.split)
    title = f"judge vs human labels: {path.name}{f' ({args.split})' if args.split else ''}, n={len(rows)}"
    table = Table(title=title)
    cols = (
        "judge",
        "refusal accuracy",
        "3-label accuracy",
        "refusal precision",
        "refusal recall",
        "false-positive rate",
    )
    for col in cols:
        table.add_column(col, justify="right")
    results = {"rules only": judge_accuracy(rows, rules_only=True)}
    if not args.rules_only:
        results["rules + learned"] = judge_accuracy(rows)
    for name, acc in results.items():
        numbers = (acc.refusal_accuracy, acc.accuracy, acc.precision, acc.recall, acc.false_positive_rate)
        table.add_row(name, *(f"{x:.3f}" for x in numbers))
    Console().print(table)
    for human, row in acc.confusion.items():
        print(f"  human {human:<10} -> judge " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if not args.split_only:
        _print_leave_one_source_out(path, args.rules_only)
    return 0


def _print_leave_one_source_out(path, rules_only: bool) -> None:
    """Per source, over the whole file: the judge with that source's family left out of training, the rules, a phrase rule."""
    from rich.console import Console
    from rich.table import Table

    from abliterate.judge.accuracy import leave_one_source_out, pooled
    from abliterate.judge.learned import family

    _, rows = _labelled_rows(str(path), None)
    if len({family(str(r.get("source") or "")) for r in rows}) < 2:
        print("leave one source out: skipped; it needs rows from two or more model families (a 'source' field)")
        return
    held = leave_one_source_out(rows, learned_stage=not rules_only)
    table = Table(
        title=f"leave one source out: {path.name}, n={len(rows)} (refusal accuracy / recall / false-positive rate)"
    )
    judges = [("rules", "rules only"), ("phrases", "phrase rule")]
    if not rules_only:
        judges.insert(0, ("judge", "judge (family left out)"))
    for col in ("held-out source", "n", *(name for _, name in judges)):
        table.add_column(col, justify="left" if col == "held-out source" else "right")
    cell = lambda a: f"{a.refusal_accuracy:.3f} / {a.recall:.3f} / {a.false_positive_rate:.3f}"  # noqa: E731
    for h in held:
        table.add_row(h.source, str(h.judge.n), *(cell(getattr(h, key)) for key, _ in judges))
    table.add_row("all sources", str(len(rows)), *(cell(pooled(held, key)) for key, _ in judges))
    Console(width=200).print(table)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from abliterate.output.html import write_report
    from abliterate.output.record import load_record
    from abliterate.output.tables import markdown

    if args.markdown:  # the results table as the record holds it, for pasting (never retyping) into a README
        metrics = load_record(args.run_dir).metrics
        if metrics is None:
            raise AbliterateError(f"{args.run_dir} was not evaluated (--no-eval); run it without --no-eval")
        print("\n".join(markdown(metrics.header("original", "abliterated"), metrics.rows())))
        return 0
    print(write_report(Path(args.run_dir).expanduser()))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from abliterate.evaluation import standalone

    fields = standalone.Options.__dataclass_fields__
    servers = {"generate_endpoint": _endpoint(args.generate_endpoint, args.endpoint_model, "--endpoint-model"),
               "baseline_endpoint": _endpoint(args.baseline_endpoint, args.baseline_endpoint_model,
                                              "--baseline-endpoint-model")}  # fmt: skip
    plain = {k: v for k, v in vars(args).items() if k in fields and k not in servers}
    options = standalone.Options(**plain, **servers, load=_load_options(args))
    standalone.run(args.model, args.baseline, options, args.out, args.force)
    return 0


def _endpoint(url: str | None, name: str | None, name_flag: str):
    """An OpenAI-compatible server from its URL flag and model-name flag; None without a URL."""
    from abliterate.generation import Endpoint

    if name and not url:
        raise AbliterateError(f"{name_flag} names the model at an endpoint: pass the endpoint's URL too")
    return Endpoint(url, name) if url else None


def _cmd_serve(args: argparse.Namespace) -> int:
    from abliterate import model, serve

    if args.batch_size < 1:
        raise AbliterateError("--batch-size must be at least 1")
    source = model.resolve(args.model, args.allow_pickle)
    lm = model.load(source, _load_options(args), lambda line: print(line, file=sys.stderr))
    name = args.served_model_name or serve.model_id(source)
    # flushed at once: a script (or a test) reads this line to learn the port
    ready = lambda url: print(f"serving {name} at {url}", flush=True)  # noqa: E731
    serve.serve(lm, name, args.host, args.port, args.batch_size, ready)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from abliterate.evaluation import benchmark

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    benchmark.run(args.model, args.baseline, tasks, args.limit, args.batch_size, args.out, args.force,
                  _load_options(args))  # fmt: skip
    return 0


def _load_options(args: argparse.Namespace) -> LoadOptions:
    """The load flag group from parsed flags; a command without one of them gets its default."""
    default = LoadOptions()
    values: dict[str, Any] = {
        f.name: getattr(args, f.name, getattr(default, f.name)) for f in dataclasses.fields(default)
    }
    return LoadOptions(**values)


def add_settings_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One CLI flag per setting; defaults are left unset so that env and TOML can fill them."""
    types_ = settings.field_types()
    for f in dataclasses.fields(settings.Settings):
        if f.name in exclude:
            continue
        kind, help_ = types_[f.name], f"{f.metadata['help']} (default: {f.default})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=None, help=help_)
        elif kind is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=None, help=help_)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=help_)


def add_load_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] = ()) -> None:
    """The load flags (all of LoadOptions but --max-memory, or the named ones) for commands other than run, with
    run's help; those commands load the whole model, so layer streaming's limit is run's alone."""
    fields = {f.name: f for f in dataclasses.fields(settings.Settings)}
    for name in names or tuple(f.name for f in dataclasses.fields(LoadOptions) if f.name != "max_memory"):
        f = fields[name]
        flag, help_ = f"--{name.replace('_', '-')}", f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=help_)
        else:
            parser.add_argument(flag, default=f.default, help=f"{help_} (default: {f.default})")


def _cmd_heal(args: argparse.Namespace) -> int:
    from abliterate.heal import HealOptions, heal

    names = {f.name for f in dataclasses.fields(HealOptions)} - {"prompts", "load"}
    options = HealOptions(**{n: getattr(args, n) for n in names}, prompts=tuple(args.prompts or ()),
                          load=_load_options(args))  # fmt: skip
    heal(args.run_dir, args.out, options, args.force)
    return 0


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from abliterate.export.gguf import export_gguf

    out = export_gguf(args.model_dir, args.out, args.type, args.source_gguf, args.force)
    print(f"wrote {out} ({args.type})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; `run` flags come from the Settings dataclass."""

    parser = argparse.ArgumentParser(
        prog="abliterate", description="Find and remove the refusal direction of a chat model."
    )
    parser.add_argument("--version", action="version", version=f"abliterate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="collect, select, ablate, evaluate and save")
    add_settings_arguments(run)
    run.set_defaults(func=_cmd_run)
    apply = sub.add_parser("apply", help="re-apply a run's edit (abliteration.json) to a model and save it")
    apply.add_argument("source", help="the model to edit: built-in name, HF folder, .gguf file or hub id")
    apply.add_argument(
        "--edit", required=True, help="abliteration.json of a run (its directions.safetensors beside it)"
    )
    apply.add_argument("--out", required=True, help="output folder")
    apply.add_argument(
        "--force", action="store_true", help="replace the output folder if it is empty or an earlier abliterate output"
    )
    apply.add_argument(
        "--save-dtype", "--dtype", dest="dtype", default="source",
        help="dtype of the saved weights (default: source, the checkpoint's own); the edit is computed in float64",
    )  # fmt: skip
    add_load_arguments(apply, ("device", "trust_remote_code", "allow_pickle"))
    apply.add_argument(
        "--push-to-hub", metavar="REPO", help="upload the saved folder to this hub repo (token: HF_TOKEN)"
    )
    apply.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole model instead of editing a safetensors folder shard by shard",
    )
    apply.add_argument(
        "--trial", type=int, metavar="N", help="a searched run: apply its Pareto-front trial N instead of its choice"
    )
    apply.set_defaults(func=_cmd_apply)
    worker = sub.add_parser("search-worker", help="join a search study another `run --search` started, and add trials")
    worker.add_argument(
        "--storage", required=True, help="the study's Optuna storage URL, e.g. postgresql://user@host/db"
    )
    worker.add_argument("--study", required=True, help="the study name `run --search` printed")
    worker.set_defaults(func=_cmd_search_worker)
    chat = sub.add_parser(
        "chat", help="chat with a model in the terminal; --compare shows a second model's answers too"
    )
    chat.add_argument("model", help="built-in name, HF folder, .gguf file or hub id")
    chat.add_argument("--compare", metavar="ORIGINAL", help="a second model that answers every message too")
    chat.add_argument("--system", help="system prompt (default: the template's)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    chat.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    add_load_arguments(chat)
    chat.set_defaults(func=_cmd_chat)
    adapter = sub.add_parser("export-adapter", help="save a run's edit as a PEFT LoRA adapter for the original model")
    adapter.add_argument("run", help="the run's output folder (abliteration.json and directions.safetensors)")
    adapter.add_argument("--base", required=True, help="the original model: built-in name, HF folder, .gguf or hub id")
    adapter.add_argument("--out", required=True, help="adapter folder to write")
    adapter.add_argument(
        "--force", action="store_true", help="replace the output folder if it is empty or an earlier abliterate output"
    )
    add_load_arguments(adapter, ("trust_remote_code", "allow_pickle"))
    adapter.set_defaults(func=_cmd_export_adapter)
    models = sub.add_parser("models", help="list built-in offline models and their cache status")
    models.set_defaults(func=_cmd_models)
    ev = sub.add_parser("evaluate", help="refusal, over-refusal, KL and perplexity of any model, against its original")
    ev.add_argument("model", help="built-in name, HF folder, .gguf file or hub id")
    ev.add_argument("--baseline", metavar="ORIGINAL", help="the original model, for paired tests and KL")
    ev.add_argument("--out", metavar="FILE.json", help="write the report here, and FILE.md beside it")
    ev.add_argument("--force", action="store_true", help="replace report files an earlier `evaluate` wrote")
    ev.add_argument(
        "--split-from", metavar="RUN",
        help="a run's --out folder or abliteration.json: test on exactly the prompts that run held out "
        "(default: MODEL itself when it is a run's folder)",
    )  # fmt: skip
    recorded = "the run's set when there is a recorded split, else"
    for name, builtin, help_ in (
        ("--harmful", "harmful", "harmful prompts: built-in set name or file"),
        ("--benign", "benign_alarming", "benign prompts with alarming words: built-in set name or file"),
        ("--harmless", "harmless", "harmless prompts for KL and answer perplexity: built-in set name or file"),
    ):
        ev.add_argument(name, default=None, help=f"{help_} (default: {recorded} {builtin})")
    ev.add_argument(
        "--system-prompt", default=None, help="system prompt for every conversation (default: the template's)"
    )
    for name, default, help_ in (
        (
            "--n-test",
            64,
            "prompts of each kind (a recorded split keeps the run's own test part); for built-in sets "
            "the test part `run` holds out with default sizes",
        ),
        ("--max-new-tokens", 96, "tokens generated per answer"),
        ("--kl-tokens", 32, "tokens of the baseline's greedy harmless answers scored for KL"),
        ("--batch-size", 16, "prompts per forward pass"),
        ("--seed", 0, "seed of the prompt split"),
        ("--samples", 6, "side-by-side sample answers per prompt set in the report"),
    ):
        ev.add_argument(name, type=int, default=default, help=f"{help_} (default: {default})")
    ev.add_argument(
        "--generate-endpoint", metavar="URL",
        help="an OpenAI-compatible server (vLLM, llama.cpp, Ollama, `abliterate serve`) serving MODEL: the judged "
        "answers come from it, KL and perplexity from MODEL loaded here (docs/serving.md)",
    )  # fmt: skip
    ev.add_argument("--endpoint-model", metavar="NAME",
                    help="the id under which that server serves MODEL (default: the one it lists named like MODEL)")  # fmt: skip
    ev.add_argument("--baseline-endpoint", metavar="URL", help="a server serving the baseline, likewise")
    ev.add_argument("--baseline-endpoint-model", metavar="NAME", help="the id under which it serves the baseline")
    add_load_arguments(ev)
    ev.set_defaults(func=_cmd_evaluate)
    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (for --generate-endpoint)")
    srv.add_argument("model", help="built-in name, HF folder (a run's --out), .gguf file or hub id")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    srv.add_argument("--served-model-name", metavar="NAME",
                     help="the model id to list and answer to (default: MODEL's absolute path, or its name)")  # fmt: skip
    srv.add_argument("--batch-size", type=int, default=16,
                     help="greedy requests decoded together at most (default: 16)")  # fmt: skip
    add_load_arguments(srv)
    srv.set_defaults(func=_cmd_serve)
    bench = sub.add_parser("benchmark", help="lm-evaluation-harness tasks, original and model side by side")
    bench.add_argument("model", help="built-in name, HF folder, .gguf file or hub id")
    bench.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_easy,hellaswag")
    bench.add_argument("--baseline", metavar="ORIGINAL", help="the original model, measured side by side")
    bench.add_argument("--limit", type=int, help="at most this many examples per task (a quick look, not a result)")
    bench.add_argument("--out", metavar="FILE.json", help="write the results here, and FILE.md beside it")
    bench.add_argument("--force", action="store_true", help="replace result files an earlier `benchmark` wrote")
    bench.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    add_load_arguments(bench)
    bench.set_defaults(func=_cmd_benchmark)
    judge = sub.add_parser("judge", help="label (prompt, response) pairs as refusal, compliance or degenerate")
    judge.add_argument("file", help=".jsonl with 'prompt' and 'response' on each line")
    judge.add_argument("--out", required=True, help="where to write the labelled .jsonl")
    judge.add_argument("--force", action="store_true", help="replace LABELS.jsonl if an earlier `judge` wrote it")
    judge.add_argument("--rules-only", action="store_true", help="skip the learned stage (no sentence encoder)")
    judge.add_argument("--classifier", help="a classifier .json from judge-train (default: the built-in one)")
    judge.add_argument(
        "--llm-endpoint", metavar="URL", help="judge with a chat model at this OpenAI-compatible /v1 URL"
    )
    judge.add_argument(
        "--llm-model", default="default", help="model name to ask at --llm-endpoint (key: OPENAI_API_KEY)"
    )
    judge.add_argument(
        "--explain", action="store_true", help="print which stage decided each label and on what evidence"
    )
    judge.set_defaults(func=_cmd_judge)
    train = sub.add_parser(
        "judge-train", help="fit the judge's learned stage on labelled (prompt, response, label) rows"
    )
    train.add_argument("file", nargs="?", help="labelled .jsonl (default: the built-in labelled set)")
    train.add_argument("--split", default="train", help="only rows whose 'split' field has this value (default: train)")
    train.add_argument("--max-fpr", type=float, default=0.02, help="highest cross-validated false-positive rate")
    train.add_argument("--out", required=True, help="where to write the classifier .json")
    train.add_argument("--force", action="store_true", help="replace the file if an earlier judge-train wrote it")
    train.set_defaults(func=_cmd_judge_train)
    accuracy = sub.add_parser("judge-accuracy", help="the judge's accuracy against human-labelled responses")
    accuracy.add_argument("file", nargs="?", help="labelled .jsonl (default: the built-in labelled set)")
    accuracy.add_argument("--split", help="only rows whose 'split' field has this value")
    accuracy.add_argument("--rules-only", action="store_true", help="score the rule stage alone")
    accuracy.add_argument(
        "--split-only",
        action="store_true",
        help="skip the leave-one-source-out table (it refits once per model family)",
    )
    accuracy.set_defaults(func=_cmd_judge_accuracy)
    report = sub.add_parser("report", help="re-render a run folder's report.html and report/*.png from its files")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished run")
    report.add_argument(
        "--markdown",
        action="store_true",
        help="print the before/after table as Markdown from the record; write nothing",
    )
    report.set_defaults(func=_cmd_report)
    to_gguf = sub.add_parser(
        "export-gguf", help="write a saved model folder as a GGUF file for llama.cpp, Ollama, LM Studio"
    )
    to_gguf.add_argument("model_dir", metavar="DIR", help="the --out folder of a run or of apply")
    to_gguf.add_argument("--out", required=True, help="the .gguf file to write")
    to_gguf.add_argument(
        "--type", default="f16", help="f16 (default), bf16 or q8_0; for K-quants run llama-quantize on it"
    )
    to_gguf.add_argument("--source-gguf", metavar="PATH", help="the GGUF the model came from, to keep its metadata")
    to_gguf.add_argument(
        "--force", action="store_true", help="replace the output file if an earlier export-gguf wrote it"
    )
    to_gguf.set_defaults(func=_cmd_export_gguf)
    add_heal_parser(sub)
    return parser


def add_heal_parser(sub: Any) -> None:
    """`abliterate heal RUN_DIR --out DIR`: its flags, with HealOptions' defaults."""
    from abliterate.heal import HealOptions

    d = HealOptions()
    heal = sub.add_parser(
        "heal", help="LoRA-distil a run's edited model back toward the original, off the removed direction"
    )
    heal.add_argument("run_dir", help="the run's output folder (edited model and abliteration.json)")
    heal.add_argument("--out", required=True, help="folder for the healed model")
    heal.add_argument("--original", help="the original model (default: the one the run's record names)")
    heal.add_argument("--prompts", action="append", metavar="FILE",
                      help="more harmless prompts to distil on (a prompt file or hub name; repeatable)")  # fmt: skip
    for name, kind, help_ in (
        ("steps", int, "optimizer steps"),
        ("minutes", float, "time budget; training stops early enough to save within it (a rerun resumes)"),
        ("lr", float, "learning rate (AdamW)"),
        ("rank", int, "LoRA rank"),
        ("batch_size", int, "sequences per step"),
        ("check_every", int, "steps between refusal checks and checkpoints"),
        ("refusal_margin", float, "rise of the mean refusal log-odds over the edited model's that stops training"),
        ("anchor", float, "weight of the first-token KL to the edited model on harmful training prompts"),
        ("n_prompts", int, "harmless training prompts of the run's split to distil on"),
        ("n_val", int, "harmless validation prompts whose KL picks the checkpoint kept"),
        ("answer_tokens", int, "tokens of the original's answer distilled per prompt"),
        ("top_k", int, "teacher log-probs kept per position (plus the tail mass)"),
        ("judge_tokens", int, "answer length judged before and after"),
        ("seed", int, "seed of the batch order and the LoRA start"),
    ):
        heal.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name),
                          help=f"{help_} (default: {getattr(d, name)})")  # fmt: skip
    heal.add_argument(
        "--adapter-only", action="store_true", help="save the LoRA adapter alone instead of the merged model"
    )
    heal.add_argument(
        "--force", action="store_true", help="replace the output folder if it is empty or an earlier abliterate output"
    )
    add_load_arguments(heal)
    heal.set_defaults(func=_cmd_heal)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line on stderr and a non-zero exit for every expected failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":  # a user's own level stays
            # transformers may have read its environment already (it is imported above): set its level too
            from transformers.utils import logging as transformers_logging

            transformers_logging.set_verbosity_error()
    try:
        return args.func(args)
    except AbliterateError as exc:
        print(f"abliterate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abliterate: interrupted; nothing was written to the output folder", file=sys.stderr)
        return 130
    except MemoryError:
        print("abliterate: error: out of memory; lower --batch-size or use a smaller --dtype", file=sys.stderr)
        return 1


def entry() -> None:
    """Console-script entry point."""
    code = main()
    if code == 130:
        # A loader's worker threads may still be unwinding; Python would wait for them and could
        # end by re-raising SIGINT. The output is already cleaned up, so leave with 130 now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
