"""run(): the stages in order, with every artifact written to a temp folder renamed into place."""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from abliterate import capture, directions, files, model, prompts, resume
from abliterate.edit import check_removed, orthogonalize
from abliterate.errors import AbliterateError
from abliterate.evaluation import damage
from abliterate.evaluation import metrics as evaluate
from abliterate.export import hub
from abliterate.output import card, html, tables
from abliterate.output import record as run_record
from abliterate.prompts import PARTS
from abliterate.selection import Selection, find_refusal_tokens, select_direction
from abliterate.settings import Settings


@dataclass
class RunResult:
    """What a run produced: where it saved, what it chose, what it measured."""

    out: Path
    selection: Selection
    metrics: dict
    seconds: float


@contextmanager
def progress_bar(console: Console, description: str, total: int):
    """A progress bar with ETA; yields a function that advances it."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    started = time.time()
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, more: int = 0) -> None:
            """Advance by n steps; `more` announces steps the total did not foresee."""
            if more:
                bar.update(task, total=bar.tasks[task].total + more)
            bar.advance(task, n)

        yield advance
    console.print(f"  {description}: {time.time() - started:.0f} s")


def load_prompt_sets(settings: Settings) -> dict[str, prompts.Split]:
    """Harmful, harmless and benign prompt splits, checked for size before any model work."""
    s = settings
    n_test = 0 if s.no_eval else s.n_test
    load = lambda spec: prompts.load(spec, s.prompt_column, s.category_column)  # noqa: E731
    return {
        "harmful": prompts.split(load(s.harmful), s.n_train, s.n_val, n_test, s.seed),
        "harmless": prompts.split(load(s.harmless), s.n_train, s.n_val, n_test, s.seed),
        "benign": prompts.split(load(s.benign), 0, 0, n_test, s.seed),
    }


def check_settings(settings: Settings) -> Path:
    """Validate what can be validated before loading a model; return the output folder."""
    if not settings.out:
        raise AbliterateError("no output folder given; pass --out DIR")
    out = files.check_output(settings.out, settings.force)
    for name in ("n_train", "n_val", "batch_size", "max_new_tokens", "kl_tokens", "positions"):
        if getattr(settings, name) < 1:
            raise AbliterateError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.n_test < 1 and not settings.no_eval:
        raise AbliterateError("--n-test must be at least 1 (or pass --no-eval)")
    if settings.top_k < 1:
        raise AbliterateError("--top-k must be at least 1")
    if settings.max_kl <= 0:
        raise AbliterateError("--max-kl must be positive")
    if settings.push_to_hub:
        hub.check(settings.push_to_hub)
    if settings.load_in_4bit:
        model.check_4bit(settings.device)
    model.pick_device(settings.device)  # an unusable --device fails here, before any model is fetched
    model.save_dtype(settings.save_dtype, torch.float32)  # so does an unknown --save-dtype
    return out


def run(settings: Settings, console: Console | None = None) -> RunResult:
    """Collect, compute directions, select, orthogonalize, evaluate and save one abliteration."""
    console = console or Console(stderr=True, soft_wrap=True)
    started = time.time()
    torch.manual_seed(settings.seed)
    out = check_settings(settings)
    splits = load_prompt_sets(settings)
    source = model.resolve(settings.model, settings.allow_pickle)
    console.print(f"[bold]loading[/] {settings.model}")
    lm = _load_finite(console, source, settings, splits["harmless"].train.texts[:4], settings.load_in_4bit)
    tok, net, arch = lm.tokenizer, lm.model, lm.arch
    thinking_off = prompts.supports_thinking(tok) and not settings.thinking
    if thinking_off:
        console.print("  the chat template has a reasoning block; thinking is off (--thinking keeps it on)")
    texts = {
        key: {
            part: prompts.format_all(tok, getattr(split, part).texts, settings.system_prompt, settings.thinking)
            for part in PARTS
        }
        for key, split in splits.items()
    }
    too_long = model.limit_prompt_length(
        tok,
        net,
        [t for parts in texts.values() for ts in parts.values() for t in ts],
        max(settings.max_new_tokens, settings.kl_tokens),
    )
    if too_long:
        console.print(
            f"[yellow]warning:[/] {too_long} prompts are longer than the context allows "
            f"({tok.model_max_length} tokens with room for the answer); their beginnings are cut"
        )

    # Each stage's result is cached under a hash of what it depends on, so reruns resume.
    inputs = {
        "harmful_train": splits["harmful"].train.sha256,
        "harmless_train": splits["harmless"].train.sha256,
        "system_prompt": settings.system_prompt,
        "positions": settings.positions,
        "dtype": str(next(net.parameters()).dtype),
        "max_length": tok.model_max_length,
        **({"load_in_4bit": True} if settings.load_in_4bit else {}),  # keeps the keys of full-precision runs
        **({"thinking_off": True} if thinking_off else {}),  # the prompts differ only for templates with the switch
        **({"pad_free_means": True} if settings.positions > 1 else {}),  # older caches averaged pads in here
    }
    means_key = resume.stage_key(lm.source, "collect", inputs)
    cached = resume.load_means(means_key)
    if cached:
        harmful_means, harmless_means = cached
        console.print("  collect residual means: resumed from the cache")
    else:
        harmful_means, harmless_means = _collect(
            console, lm, settings, texts["harmful"]["train"], texts["harmless"]["train"]
        )
        resume.save_means(means_key, harmful_means, harmless_means)
    candidates = directions.difference_of_means(harmful_means, harmless_means, settings.project_harmless_mean)

    select_key = resume.stage_key(lm.source, "select", select_stage_inputs(inputs, splits, settings))
    selection = resume.load_selection(select_key)
    if selection:
        console.print("  candidate selection: resumed from the cache")
    else:
        selection = _select(console, lm, settings, candidates, texts)
        resume.save_selection(select_key, selection)
    tables.print_candidates(console, selection)
    chosen = selection.chosen
    direction = candidates.direction(chosen.position, chosen.layer)
    if settings.load_in_4bit:  # the 4-bit copy served collect and select; evaluate and edit the real weights
        del lm, net
        lm = _reload_full_precision(console, source, settings, splits["harmless"].train.texts[:4])
        tok, net, arch = lm.tokenizer, lm.model, lm.arch

    before: dict = {}
    if not settings.no_eval:
        before = _measure(console, lm, splits, texts, settings, "before", None)
    params = replace(chosen.params, norm_preserving=settings.norm_preserving)
    edited = orthogonalize(net, arch, direction, params)
    if params.scale == 1.0 and params.start_layer == 0:  # a writer the table misses must fail, not weaken the edit
        probe = [tok(t, add_special_tokens=False).input_ids[-64:] for t in texts["harmless"]["val"][:2]]
        check_removed(net, arch, probe, direction)
    after: dict = {}
    metrics: dict = {}
    if not settings.no_eval:
        after = _measure(console, lm, splits, texts, settings, "after", before["reference"])
        metrics = evaluate.summarize(before, after)
        tables.print_metrics(console, metrics)

    console.print(f"[bold]saving[/] to {out}")
    with files.staging(out, settings.force) as tmp:
        run_record.save_model(lm, tmp, settings.save_dtype, (direction, params), console.print)
        run_record.save_directions(tmp, candidates, harmful_means, harmless_means, direction)
        record = run_record.record(lm, settings, splits, selection, edited, metrics)
        files.write_json(tmp / "abliteration.json", record)
        if before:
            files.write_json(tmp / "evaluation.json", run_record.answers_record(before, after))
        (tmp / "README.md").write_text(card.model_card(record), encoding="utf-8")
        html.write_report(tmp)  # tables.html and report/*.png, from the files just written
    seconds = time.time() - started
    console.print(f"[bold green]done[/] in {seconds / 60:.1f} min: {out}")
    if settings.push_to_hub:
        console.print(f"[bold]uploaded[/] {hub.push(out, settings.push_to_hub)}")
    return RunResult(out, selection, metrics, seconds)


def _load_finite(
    console: Console, source: model.ModelSource, settings: Settings, probe: list[str], load_in_4bit: bool = False
) -> model.LoadedModel:
    """Load the model; if a half-precision forward pass overflows to inf/NaN, reload in float32."""
    load = lambda dtype: model.load(  # noqa: E731
        source, dtype, settings.device, settings.trust_remote_code, settings.allow_pickle, console.print, load_in_4bit
    )
    lm = load(settings.dtype)
    texts = prompts.format_all(lm.tokenizer, probe, settings.system_prompt, settings.thinking)
    if model.forward_is_finite(lm.model, lm.tokenizer, texts):
        return lm
    dtype = next(lm.model.parameters()).dtype
    if dtype in (torch.float32, torch.float64):
        raise AbliterateError(
            f"the model gives inf/NaN logits in {dtype}; its weights are broken, check the checkpoint"
        )
    console.print(f"[yellow]warning:[/] {dtype} overflows to inf/NaN on this model; computing in float32 instead")
    del lm
    lm = load("float32")
    if not model.forward_is_finite(lm.model, lm.tokenizer, texts):
        raise AbliterateError(
            "the model gives inf/NaN logits even in float32; its weights are broken, check the checkpoint"
        )
    return lm


def _reload_full_precision(
    console: Console, source: model.ModelSource, settings: Settings, probe: list[str]
) -> model.LoadedModel:
    """Free the 4-bit model (the caller has dropped its references) and load the source in settings.dtype."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    console.print(f"[bold]reloading[/] {settings.model} in full precision for evaluation and the edit")
    return _load_finite(console, source, settings, probe)


def _collect(console: Console, lm: model.LoadedModel, settings: Settings, harmful: list[str], harmless: list[str]):
    """Residual means of the harmful and harmless training prompts."""
    tok, net, arch, bs = lm.tokenizer, lm.model, lm.arch, settings.batch_size
    with progress_bar(console, "collect residual means", len(harmful) + len(harmless)) as step:
        harmful_means = capture.collect(net, tok, arch, harmful, bs, settings.positions, step)
        harmless_means = capture.collect(net, tok, arch, harmless, bs, settings.positions, step)
    return harmful_means, harmless_means


def select_stage_inputs(inputs: dict, splits: dict[str, prompts.Split], settings: Settings) -> dict:
    """What the selection depends on, for its cache key: the collect inputs, validation prompts, settings, judge."""
    names = ("project_harmless_mean", "layer", "max_kl", "kl_margin", "skip_last_layers", "top_k", "induce")
    return {
        **inputs,
        "harmful_val": splits["harmful"].val.sha256,
        "harmless_val": splits["harmless"].val.sha256,
        **{k: getattr(settings, k) for k in names},
        "judge": resume.judge_fingerprint(),  # the refusal openings are learned from the judge's labels
    }


def _select(console: Console, lm: model.LoadedModel, settings: Settings, candidates, texts: dict) -> Selection:
    """Learn the refusal openings, then score candidates and search the edit strength."""
    tok, net, arch, bs = lm.tokenizer, lm.model, lm.arch, settings.batch_size
    console.print("[bold]learning[/] how this model opens its refusals")
    refusal_tokens = find_refusal_tokens(net, tok, texts["harmful"]["train"][:32], texts["harmless"]["train"][:16], bs)
    console.print(
        f"  refusal openings {list(refusal_tokens.tokens)} (precision {refusal_tokens.precision:.2f}, "
        f"{refusal_tokens.refusals_seen} refusals in {refusal_tokens.answers_seen} answers)"
    )
    n_layers = candidates.directions.shape[1] - 1
    scans = (
        1
        if settings.layer is not None
        else settings.positions * max(1, int(n_layers * (1 - settings.skip_last_layers)))
    )
    per_candidate = 6  # one addition check and up to five strengths (the ladder)
    with progress_bar(console, "score candidate directions", scans + settings.top_k * per_candidate) as step:
        return select_direction(
            net, tok, arch, candidates, texts["harmful"]["val"], texts["harmless"]["val"], refusal_tokens, bs,
            max_kl=settings.max_kl, kl_margin=settings.kl_margin, skip_last_layers=settings.skip_last_layers,
            layer=settings.layer, top_k=settings.top_k, induce=settings.induce, on_step=lambda _: step(),
            on_more=lambda n: step(0, more=n),
        )  # fmt: skip


def _measure(
    console: Console, lm: model.LoadedModel, splits: dict, texts: dict, settings: Settings, when: str,
    reference: damage.Reference | None,
) -> dict:  # fmt: skip
    """Judged answers to held-out harmful and benign prompts; harmless next-token log-probs; KL and perplexity.

    Without a reference this is the original model: its greedy harmless answers become the reference
    that the edited model is later scored on.
    """
    tok, net, bs = lm.tokenizer, lm.model, settings.batch_size
    result = {}
    for key in ("harmful", "benign"):
        test, formatted = splits[key].test, texts[key]["test"]
        with progress_bar(console, f"generate {when}: {key} ({len(formatted)})", len(formatted)) as step:
            answers = model.generate(net, tok, formatted, settings.max_new_tokens, bs, step)
        result[key] = evaluate.judge_answers(key, test.texts, [p.category for p in test.prompts], answers)
    result["harmless_logprobs"] = model.last_token_logprobs(net, tok, texts["harmless"]["test"], bs)
    if reference is None:
        harmless = texts["harmless"]["test"]
        with progress_bar(console, f"generate {when}: harmless ({len(harmless)}, for KL)", len(harmless)) as step:
            reference = damage.reference_answers(net, tok, harmless, settings.kl_tokens, bs, step)
    result["reference"] = reference
    with progress_bar(console, f"score {when}: KL and perplexity", 1):
        result["damage"] = damage.measure(net, tok, reference, damage.harmless_text(), bs)
    return result
