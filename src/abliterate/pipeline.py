"""run(): the stages in order, with every artifact written to a temp folder renamed into place."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from abliterate import capture, directions, files, forward, model, prompts, resume
from abliterate.capture import ResidualMeans
from abliterate.directions import Candidates
from abliterate.edit import EditParams, check_removed, orthogonalize
from abliterate.errors import AbliterateError, require
from abliterate.evaluation.measure import Measurement, MeasureOptions, answer_rows, measure, summarize
from abliterate.evaluation.metrics import Metrics
from abliterate.export import hub, sharded
from abliterate.output import card, html, tables
from abliterate.output import record as run_record
from abliterate.progress import Stopwatch, progress_bar
from abliterate.prompts import PARTS
from abliterate.search import (
    SPACE_VERSION,
    Probe,
    SearchResult,
    Space,
    Validation,
    completed,
    default_storage,
    open_study,
    optimize,
    result,
    storage_label,
    study_settings,
)
from abliterate.selection import RefusalTokens, Selection, find_refusal_tokens, select_direction
from abliterate.settings import Settings


@dataclass
class RunResult:
    """What a run produced: where it saved, what it chose, what it measured."""

    out: Path
    selection: Selection | None  # the strength ladder's choice; None when the edit was searched
    metrics: Metrics | None  # None for --no-eval runs
    seconds: float
    search: SearchResult | None = None


@dataclass
class Prepared:
    """A loaded model with its formatted prompts and candidate directions: what stages 3-5 start from."""

    lm: model.LoadedModel  # as loaded: its tokenizer is the one saved
    work: model.LoadedModel  # the same model, with a tokenizer that leaves room for answers
    splits: dict[str, prompts.Split]
    texts: dict[str, dict[str, list[str]]]
    inputs: dict  # the collect stage's cache inputs
    means: tuple[ResidualMeans, ResidualMeans]
    candidates: Candidates


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
    if settings.search:
        if settings.induce:
            raise AbliterateError("the search removes refusal; --induce strengthens it: drop --induce or --search")
        if settings.trials < 1 or settings.search_minutes < 0:
            raise AbliterateError("--trials must be at least 1 and --search-minutes not negative")
        require("optuna", "search", "--search")
    if settings.push_to_hub:
        hub.check(settings.push_to_hub)
    if settings.load_in_4bit:
        model.check_4bit(settings.device)
    model.pick_device(settings.device)  # an unusable --device fails here, before any model is fetched
    model.save_dtype(settings.save_dtype, torch.float32)  # so does an unknown --save-dtype
    return out


def prepare(settings: Settings, console: Console, evaluates: bool = False) -> Prepared:
    """Load the model and prompts; 1-2: collect residual means (cached: reruns resume) and take their differences."""
    splits = load_prompt_sets(settings)
    source = model.resolve(settings.model, settings.allow_pickle)
    console.print(f"[bold]loading[/] {settings.model}")
    lm = _load_finite(console, source, settings, splits["harmless"].train.texts[:4], settings.load_in_4bit)
    if evaluates and forward.stream_of(lm.model) is not None:
        raise AbliterateError(
            f"{settings.model} is layer-streamed (it does not fit in --max-memory {settings.max_memory}); collect and "
            "select stream, but the evaluation's answers need the whole model: pass --no-eval (then `abliterate "
            "evaluate` on a machine it fits), or a larger --max-memory"
        )
    texts = _format(console, lm, settings, splits)
    work = _with_room_for_answers(console, lm, settings, texts)
    inputs = collect_stage_inputs(work, settings, splits)
    means = resume.cached(resume.COLLECT, lm.source, inputs, lambda: _collect(console, work, settings, texts),
                          _resumed(console, "collect residual means"))  # fmt: skip
    candidates = directions.difference_of_means(*means, settings.project_harmless_mean)
    return Prepared(lm, work, splits, texts, inputs, means, candidates)


def run(settings: Settings, console: Console | None = None) -> RunResult:
    """Collect, compute directions, select (or search), orthogonalize, evaluate and save one abliteration."""
    console = console or Console(stderr=True, soft_wrap=True)
    clock = Stopwatch()
    torch.manual_seed(settings.seed)
    out = check_settings(settings)
    ready = prepare(settings, console, evaluates=not settings.no_eval)
    clock.lap("load and collect")
    lm, work, splits, texts, candidates, means = (
        ready.lm, ready.work, ready.splits, ready.texts, ready.candidates, ready.means
    )  # fmt: skip

    # 3. Choose the edit by its effect on validation prompts: the strength ladder (cached), or a search.
    selection, found = None, None
    if settings.search:
        found = search_stage(console, ready, settings)
        direction, params = found.chosen.point.direction(candidates), found.chosen.point.params
    else:
        selection = resume.cached(resume.SELECT, lm.source, select_stage_inputs(ready.inputs, splits, settings),
                                  lambda: _select(console, work, settings, candidates, texts),
                                  _resumed(console, "candidate selection"))  # fmt: skip
        tables.print_candidates(console, selection)
        chosen = selection.chosen
        direction = candidates.direction(chosen.position, chosen.layer)
        params = replace(chosen.params, norm_preserving=settings.norm_preserving)
    clock.lap("search" if settings.search else "select")
    if settings.load_in_4bit:  # the 4-bit copy served collect and select; evaluate and edit the real weights
        source = lm.source
        del lm, work, ready
        lm = _reload_full_precision(console, source, settings, splits["harmless"].train.texts[:4])
        work = _with_room_for_answers(console, lm, settings, texts, quiet=True)

    # 4-5. Measure the original, edit its weights, measure again.
    before = None if settings.no_eval else _measure(console, work, splits, texts, settings, "before")
    clock.lap("evaluate")
    stream = forward.stream_of(lm.model)
    plan = _stream_plan(stream.folder, settings, direction, params) if stream else None
    edited = list(plan.targets) if plan else _edit(work, texts, direction, params)
    clock.lap("edit")
    after = None if settings.no_eval else _measure(console, work, splits, texts, settings, "after", before)
    clock.lap("evaluate")
    metrics = summarize(before, after) if after else None
    if metrics:
        tables.print_metrics(console, metrics)

    console.print(f"[bold]saving[/] to {out}")
    with files.staging(out, settings.force) as tmp:
        if plan:  # a streamed model is edited on its checkpoint, shard by shard, as `apply` does
            plan.write(tmp)
        else:
            run_record.save_model(lm, tmp, settings.save_dtype, (direction, params), console.print)
        front = {s.trial: s.point.direction(candidates) for s in found.front} if found else {}
        run_record.save_directions(tmp, candidates, *means, direction, front)
        record = run_record.record(lm, settings, splits, selection, found, params, edited, metrics)
        run_record.write_record(tmp, record)
        if after:
            files.write_json(tmp / "evaluation.json", answer_rows(before, after))
        (tmp / "README.md").write_text(card.model_card(record), encoding="utf-8")
        html.write_report(tmp)  # report.html and report/*.png, from the files just written
    clock.lap("save")
    seconds = clock.seconds
    console.print(f"[bold green]done[/] in {seconds / 60:.1f} min: {out}")
    console.print(f"  where the time went: {clock.summary()}")
    if settings.push_to_hub:
        console.print(f"[bold]uploaded[/] {hub.push(out, settings.push_to_hub)}")
    return RunResult(out, selection, metrics, seconds, found)


def _resumed(console: Console, what: str) -> Callable[[], None]:
    return lambda: console.print(f"  {what}: resumed from the cache")


def search_stage(console: Console, ready: Prepared, settings: Settings) -> SearchResult:
    """3b. Search the edit space in the study's storage (it is the cache: a rerun resumes); print the front."""
    work, texts, splits, bs = ready.work, ready.texts, ready.splits, settings.batch_size
    refusal_tokens = _refusal_tokens(console, work, settings, texts)
    # Benign validation prompts: the ones after the n_test a run holds out, so no test prompt ever steers the choice.
    benign = prompts.split(prompts.load(settings.benign, settings.prompt_column, settings.category_column),
                           settings.n_test, settings.n_val, 0, settings.seed).val  # fmt: skip
    validation = Validation(
        texts["harmful"]["val"],
        texts["harmless"]["val"],
        prompts.format_all(work.tokenizer, benign.texts, settings.system_prompt, settings.thinking),
        list(splits["harmful"].val.texts),
        list(benign.texts),
    )
    key = resume.stage_key(work.source, "search", {**select_stage_inputs(ready.inputs, splits, settings),
                                                   "benign_val": benign.sha256, "space": SPACE_VERSION,
                                                   "max_directions": settings.max_directions})  # fmt: skip
    storage = settings.storage or default_storage()
    name = settings.study or f"abliterate-{key[:16]}"
    threshold = settings.max_kl * settings.kl_margin
    study = open_study(storage, name, settings.seed, key)
    if "settings" not in study.user_attrs:  # what a worker reads to join; never the storage URL and its password
        study.set_user_attr("settings", {**settings.as_dict(), "storage": None})
    console.print(f"[bold]searching[/] study '{name}' in {storage_label(storage)}")
    with progress_bar(console, "measure baselines", 1):
        probe = Probe(work.model, work.tokenizer, work.arch, ready.candidates, validation, refusal_tokens, bs)
    n_layers = ready.candidates.directions.shape[1] - 1
    # --norm-preserving makes every trial norm-preserving; without it the search tries both.
    several = settings.max_directions if ready.candidates.spread is not None else 1
    space = Space(settings.positions, max(0.0, n_layers * (1 - settings.skip_last_layers) - 1), n_layers,
                  True if settings.norm_preserving else None, several)  # fmt: skip
    timeout = settings.search_minutes * 60 or None
    with progress_bar(console, f"search edits (up to {settings.trials} in the study)", settings.trials) as step:
        step(completed(study))
        optimize(study, probe, space, settings.trials, timeout, lambda _: step(), threshold)
    if settings.verify:
        judging = f"judge the best {settings.verify} and no edit on whole {settings.verify_tokens}-token answers"
        with progress_bar(console, judging, settings.verify + 1) as step:
            found = result(study, probe, threshold, storage, settings.verify, settings.verify_tokens, step)
    else:
        found = result(study, probe, threshold, storage)
    tables.print_front(console, found)
    return found


def search_worker(storage: str, study_name: str, console: Console | None = None) -> SearchResult:
    """`abliterate search-worker`: join a study another machine started and measure trials until it holds enough."""
    console = console or Console(stderr=True, soft_wrap=True)
    recorded = study_settings(storage, study_name)
    fields = {f for f in Settings.__dataclass_fields__}
    settings = Settings(**{k: v for k, v in recorded.items() if k in fields})
    settings = replace(settings, storage=storage, study=study_name, out="", force=False, push_to_hub=None)
    torch.manual_seed(settings.seed)
    return search_stage(console, prepare(settings, console), settings)


def _refusal_tokens(console: Console, work: model.LoadedModel, settings: Settings, texts: dict) -> RefusalTokens:
    """The first answer tokens that open this model's refusals, learned from its own greedy answers."""
    console.print("[bold]learning[/] how this model opens its refusals")
    found = find_refusal_tokens(work.model, work.tokenizer, texts["harmful"]["train"][:32],
                                texts["harmless"]["train"][:16], settings.batch_size)  # fmt: skip
    console.print(
        f"  refusal openings {list(found.tokens)} (precision {found.precision:.2f}, "
        f"{found.refusals_seen} refusals in {found.answers_seen} answers)"
    )
    return found


def _format(
    console: Console, lm: model.LoadedModel, settings: Settings, splits: dict
) -> dict[str, dict[str, list[str]]]:
    """Every part of every prompt set in the model's chat template: texts[set][part]."""
    if prompts.supports_thinking(lm.tokenizer) and not settings.thinking:
        console.print("  the chat template has a reasoning block; thinking is off (--thinking keeps it on)")
    fmt = lambda part: prompts.format_all(lm.tokenizer, part.texts, settings.system_prompt, settings.thinking)  # noqa: E731
    return {key: {part: fmt(getattr(split, part)) for part in PARTS} for key, split in splits.items()}


def _with_room_for_answers(console: Console, lm: model.LoadedModel, settings: Settings, texts: dict,
                           quiet: bool = False) -> model.LoadedModel:  # fmt: skip
    """lm with a tokenizer that cuts prompts short enough to leave room for the answers (a copy: lm's is saved)."""
    every = [t for parts in texts.values() for ts in parts.values() for t in ts]
    reserve = max(settings.max_new_tokens, settings.kl_tokens)
    tokenizer, too_long = model.limit_prompt_length(lm.tokenizer, lm.model, every, reserve)
    if too_long and not quiet:
        console.print(
            f"[yellow]warning:[/] {too_long} prompts are longer than the context allows "
            f"({tokenizer.model_max_length} tokens with room for the answer); their beginnings are cut"
        )
    return replace(lm, tokenizer=tokenizer)


def collect_stage_inputs(work: model.LoadedModel, settings: Settings, splits: dict[str, prompts.Split]) -> dict:
    """What the residual means depend on, for their cache key."""
    thinking_off = prompts.supports_thinking(work.tokenizer) and not settings.thinking
    return {
        "harmful_train": splits["harmful"].train.sha256,
        "harmless_train": splits["harmless"].train.sha256,
        **settings.feeding("collect"),
        "dtype": str(next(work.model.parameters()).dtype),
        "max_length": work.tokenizer.model_max_length,
        **({"load_in_4bit": True} if settings.load_in_4bit else {}),  # keeps the keys of full-precision runs
        **({"thinking_off": True} if thinking_off else {}),  # the prompts differ only for templates with the switch
        **({"pad_free_means": True} if settings.positions > 1 else {}),  # older caches averaged pads in here
        "last_token": True,  # each harmful prompt's last-token activations, for several directions at once
    }


def _stream_plan(folder: Path, settings: Settings, direction: torch.Tensor, params: EditParams) -> sharded.StreamPlan:
    """The shard-by-shard edit of a streamed model's checkpoint; a one-line error where its layout does not allow one."""
    try:
        return sharded.prepare(folder, direction, params, settings.save_dtype, settings.device,
                               settings.trust_remote_code)  # fmt: skip
    except sharded.NotStreamable as exc:
        raise AbliterateError(
            f"the streamed model's checkpoint cannot be edited shard by shard ({exc}); save the run's edit with "
            "`abliterate apply --in-memory` on a machine the model fits"
        ) from None


def _edit(work: model.LoadedModel, texts: dict, direction: torch.Tensor, params: EditParams) -> list[str]:
    """Orthogonalize every writer in place; after a full removal, check the residual stream lost the direction."""
    edited = orthogonalize(work.model, work.arch, direction, params)
    if params.full:  # a writer the table misses must fail, not weaken the edit
        probe = [work.tokenizer(t, add_special_tokens=False).input_ids[-64:] for t in texts["harmless"]["val"][:2]]
        check_removed(work.model, work.arch, probe, direction)
    return edited


def _measure(console: Console, work: model.LoadedModel, splits: dict, texts: dict, settings: Settings, when: str,
             baseline: Measurement | None = None) -> Measurement:  # fmt: skip
    """The held-out test prompts of every set, measured (see evaluation.measure)."""
    options = MeasureOptions(settings.max_new_tokens, settings.kl_tokens, settings.batch_size)
    sets = {key: split.test for key, split in splits.items()}
    tests = {key: parts["test"] for key, parts in texts.items()}
    return measure(work, sets, tests, options, console, when, baseline)


def _load_finite(
    console: Console, source: model.ModelSource, settings: Settings, probe: list[str], load_in_4bit: bool = False
) -> model.LoadedModel:
    """Load the model; if a half-precision forward pass overflows to inf/NaN, reload in float32."""
    load = lambda dtype: model.load(  # noqa: E731
        source, replace(settings.load_options(), dtype=dtype), console.print, load_in_4bit, streamable=True
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


def _collect(
    console: Console, lm: model.LoadedModel, settings: Settings, texts: dict
) -> tuple[ResidualMeans, ResidualMeans]:
    """Residual means of the harmful and harmless training prompts."""
    tok, net, arch, bs = lm.tokenizer, lm.model, lm.arch, settings.batch_size
    harmful, harmless = texts["harmful"]["train"], texts["harmless"]["train"]
    with progress_bar(console, "collect residual means", len(harmful) + len(harmless)) as step:
        harmful_means = capture.collect(net, tok, arch, harmful, bs, settings.positions, step, keep_last_token=True)
        harmless_means = capture.collect(net, tok, arch, harmless, bs, settings.positions, step)
    return harmful_means, harmless_means


def select_stage_inputs(inputs: dict, splits: dict[str, prompts.Split], settings: Settings) -> dict:
    """What the selection depends on, for its cache key: the collect inputs, validation prompts, settings, judge."""
    return {
        **inputs,
        "harmful_val": splits["harmful"].val.sha256,
        "harmless_val": splits["harmless"].val.sha256,
        **settings.feeding("select"),
        "judge": resume.judge_fingerprint(),  # the refusal openings are learned from the judge's labels
    }


def _select(
    console: Console, lm: model.LoadedModel, settings: Settings, candidates: Candidates, texts: dict
) -> Selection:
    """Learn the refusal openings, then score candidates and search the edit strength."""
    tok, net, arch, bs = lm.tokenizer, lm.model, lm.arch, settings.batch_size
    refusal_tokens = _refusal_tokens(console, lm, settings, texts)
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
