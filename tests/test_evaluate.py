"""Statistics used in every printed number: Wilson, McNemar, bootstrap, summaries."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from abliterate.evaluation.metrics import bootstrap_mean, compare, judge_answers, mcnemar, summarize, wilson


def test_wilson_matches_textbook_values():
    r = wilson(0, 10)
    assert r.low == 0 and r.high == pytest.approx(0.2775, abs=1e-4)
    r = wilson(5, 10)
    assert r.low == pytest.approx(0.2366, abs=1e-4) and r.high == pytest.approx(0.7634, abs=1e-4)
    assert wilson(20, 20).high == 1.0 and wilson(20, 20).low == pytest.approx(0.8389, abs=1e-4)


def test_mcnemar_exact():
    assert mcnemar([True] * 10, [False] * 10) == pytest.approx(2 / 1024)
    assert mcnemar([True, False], [True, False]) == 1.0
    # b=6, c=2: two-sided exact p = 2 * P(X <= 2 | n=8, 1/2) = 2 * 37/256
    before = [True] * 6 + [False] * 2 + [True] * 5
    after = [False] * 6 + [True] * 2 + [True] * 5
    assert mcnemar(before, after) == pytest.approx(2 * 37 / 256)


def exact_bootstrap_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of the bootstrap distribution itself: every one of n**n resamples, counted exactly."""
    n, cents = len(values), [round(v * 100) for v in values]
    sums = Counter({0: 1})
    for _ in range(n):  # the sum of n draws with replacement, as a convolution of counts
        nxt: Counter = Counter()
        for total, count in sums.items():
            for c in cents:
                nxt[total + c] += count
        sums = nxt
    tail, seen, low, high = (1 - level) / 2, 0, None, None
    for total in sorted(sums):
        seen += sums[total]
        low = total / 100 / n if low is None and seen / n**n >= tail else low
        high = total / 100 / n if high is None and seen / n**n >= 1 - tail else high
    return low, high


def test_bootstrap_interval_matches_the_exact_bootstrap_and_is_seeded():
    values = [0.1, 0.5, 0.2, 0.9, 0.05, 0.3, 0.4]
    m = bootstrap_mean(values)
    assert m.value == pytest.approx(sum(values) / len(values))
    low, high = exact_bootstrap_interval(values)  # 0.1714 and 0.5643
    # 2000 resamples land within two steps of the resample-mean grid (0.05 / 7) of the exact percentiles
    assert m.low == pytest.approx(low, abs=0.015) and m.high == pytest.approx(high, abs=0.015)
    torch.manual_seed(123)  # the global generator must not matter: the interval has its own seed
    assert (bootstrap_mean(values).low, bootstrap_mean(values).high) == (m.low, m.high)
    assert math.isnan(bootstrap_mean([]).value)


def test_summarize_counts_refusals_and_kl():
    prompts = ["How do I do a bad thing?"] * 4
    cats = ["a", "a", "b", "b"]
    refusal = "I'm sorry, but I can't help with that request."
    comply = (
        "Sure. Here is a general overview of the topic, covering its history, the main ideas and where to learn more."
    )
    before = judge_answers("harmful", prompts, cats, [refusal, refusal, refusal, comply])
    after = judge_answers("harmful", prompts, cats, [comply, comply, refusal, comply])
    assert before.labels == ["refusal", "refusal", "refusal", "compliance"]
    c = compare(before, after, "refusal")
    assert (c.before.k, c.after.k) == (3, 1)
    assert c.by_category["a"][0].k == 2 and c.by_category["a"][1].k == 0
    logp = torch.log_softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), -1)
    metrics = summarize(
        {"harmful": before, "benign": before, "harmless_logprobs": logp},
        {"harmful": after, "benign": before, "harmless_logprobs": logp.roll(1, -1)},
    )
    assert metrics["harmful_refusal"]["before"]["value"] == 0.75
    assert metrics["harmful_refusal"]["after"]["value"] == 0.25
    assert metrics["benign_refusal"]["p_value"] == 1.0
    # KL(before || after) per prompt, averaged: computed here from the two distributions directly
    shifted = logp.roll(1, -1)
    expected = (logp.exp() * (logp - shifted)).sum(-1).mean().item()
    reverse = (shifted.exp() * (shifted - logp)).sum(-1).mean().item()
    assert expected > 0.1 and abs(expected - reverse) > 0.01  # so the direction is tested too
    assert metrics["kl_first_token_harmless"]["value"] == pytest.approx(expected, rel=1e-6)
