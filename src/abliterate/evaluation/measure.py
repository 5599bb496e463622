"""Measure a model on held-out prompts (judged answers, next-token log-probs, teacher-forced damage); compare two.

`abliterate run` measures the original and the edited model with it; `abliterate evaluate` measures
any model (and a baseline). The first model measured with `reference=True` is the original: its
greedy harmless answers become the reference every later model is scored on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rich.console import Console

from abliterate import model
from abliterate.evaluation import damage
from abliterate.evaluation.answers import JudgedAnswers, judge_answers
from abliterate.evaluation.metrics import Metrics, PerplexityChange, RateChange
from abliterate.evaluation.stats import Mean, bootstrap_mean, mcnemar
from abliterate.generation import Generator, InProcess
from abliterate.progress import progress_bar
from abliterate.prompts import PromptSet

JUDGED = ("harmful", "benign")  # the sets whose answers are generated and judged; "harmless" feeds KL


@dataclass(frozen=True)
class MeasureOptions:
    """How much to generate and score; `Settings` and `evaluate`'s options both hold these."""

    max_new_tokens: int
    kl_tokens: int
    batch_size: int


@dataclass(frozen=True)
class Measurement:
    """What one model did on the test prompts."""

    answers: dict[str, JudgedAnswers]  # JUDGED keys
    harmless_logprobs: torch.Tensor | None  # next-token log-probs on the harmless prompts; None when not comparable
    reference: damage.Reference | None  # the original's greedy harmless answers, made here or the baseline's
    damage: damage.Damage


def measure(
    lm: model.LoadedModel,
    sets: dict[str, PromptSet],
    texts: dict[str, list[str]],
    options: MeasureOptions,
    console: Console,
    when: str,
    baseline: Measurement | None = None,
    reference: bool = True,
    generator: Generator | None = None,
) -> Measurement:
    """Generate and judge answers to the harmful and benign prompts; score KL and perplexity on harmless ones.

    `texts` are the chat-formatted `sets`. Against a baseline, its reference answers are scored; alone,
    this model's own greedy answers become the reference (skipped with reference=False: a model measured
    on its own needs only the paragraphs' perplexity). The judged answers come from `generator` (default:
    the model in memory); the reference answers, token ids scored teacher-forced, always from the model here.
    """
    tok, net, bs = lm.tokenizer, lm.model, options.batch_size
    generator = generator or InProcess(net, tok, bs)
    answers = {}
    for key in JUDGED:
        with progress_bar(console, f"generate {when}: {key} ({len(texts[key])})", len(texts[key])) as step:
            responses = generator.answers(sets[key].texts, texts[key], options.max_new_tokens, step)
        answers[key] = judge_answers(key, sets[key].texts, [p.category for p in sets[key].prompts], responses)
    harmless = texts["harmless"]
    ref = baseline.reference if baseline else None
    if baseline is None and reference:
        with progress_bar(console, f"generate {when}: harmless ({len(harmless)}, for KL)", len(harmless)) as step:
            ref = damage.reference_answers(net, tok, harmless, options.kl_tokens, bs, step)
    elif ref is not None and _prompt_ids(tok, harmless) != ref.prompt_ids:
        console.print("[yellow]warning:[/] the model tokenizes the prompts differently from the baseline; KL and "
                      "answer perplexity compare different inputs and are left out")  # fmt: skip
        ref = None
    logprobs = model.last_token_logprobs(net, tok, harmless, bs) if ref is not None else None
    with progress_bar(console, f"score {when}: KL and perplexity", 1):
        scores = damage.measure(net, tok, ref, damage.harmless_text(), bs)
    return Measurement(answers, logprobs, ref, scores)


def answer_rows(before: Measurement | None, after: Measurement) -> dict[str, list[dict]]:
    """Every judged prompt with its answers and labels, per set: the answers file, for auditing the judge."""
    return {key: after.answers[key].rows(before.answers[key] if before else None) for key in JUDGED}


def _prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False, truncation=True).input_ids for t in texts]


def rate_change(before: JudgedAnswers | None, after: JudgedAnswers, label: str) -> RateChange:
    """Rates of a label before and after, with McNemar's test on the paired answers."""
    cats_after = after.by_category(label)
    if before is None:
        return RateChange(None, after.rate(label), None, {c: (None, r) for c, r in cats_after.items()})
    cats_before = before.by_category(label)
    p = mcnemar(before.flags(label), after.flags(label))
    return RateChange(
        before.rate(label), after.rate(label), p, {c: (cats_before[c], cats_after[c]) for c in cats_before}
    )


def perplexity(nll: list[float]) -> Mean:
    """exp of the mean per-text negative log-likelihood; the bootstrap interval of the mean, exponentiated."""
    m = bootstrap_mean(nll)
    return Mean(math.exp(m.value), math.exp(m.low), math.exp(m.high), m.n)


def summarize(before: Measurement | None, after: Measurement) -> Metrics:
    """Rates with paired tests; first-token KL, per-token KL and perplexity where both sides measured them."""
    rates = {}
    for key in JUDGED:
        for label in ("refusal", "degenerate"):
            rates[f"{key}_{label}"] = rate_change(before.answers[key] if before else None, after.answers[key], label)
    kl: dict[str, Mean] = {}
    ppl: dict[str, PerplexityChange] = {}
    tokens = None
    if before is not None and before.harmless_logprobs is not None and after.harmless_logprobs is not None:
        kl["kl_first_token_harmless"] = bootstrap_mean(
            model.kl_divergence(before.harmless_logprobs, after.harmless_logprobs).tolist()
        )
    if before is not None and after.damage.answer_kl is not None:
        kl["kl_answer_harmless"] = bootstrap_mean(after.damage.answer_kl)
        tokens = after.damage.answer_tokens
    pairs = (("text_nll", "perplexity_harmless_text"), ("answer_nll", "perplexity_original_answers"))
    for attr, key in pairs:
        mine = getattr(after.damage, attr)
        if before is None:
            if attr == "text_nll":  # alone, a model's perplexity of its own answers says nothing
                ppl[key] = PerplexityChange(None, perplexity(mine), None)
            continue
        theirs = getattr(before.damage, attr)
        if mine is not None and theirs is not None:
            change = bootstrap_mean([a - b for a, b in zip(mine, theirs)])  # paired over the same texts
            ppl[key] = PerplexityChange(perplexity(theirs), perplexity(mine), change)
    return Metrics(rates, kl, tokens, ppl)
