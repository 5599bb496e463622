"""Statistics used in every printed number: Wilson, McNemar, bootstrap, summaries."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from abliterate.evaluation.answers import judge_answers
from abliterate.evaluation.damage import Damage
from abliterate.evaluation.measure import Measurement, rate_change, summarize
from abliterate.evaluation.metrics import Metrics
from abliterate.evaluation.stats import bootstrap_mean, mcnemar, wilson


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
    c = rate_change(before, after, "refusal")
    assert (c.before.k, c.after.k) == (3, 1)
    assert c.by_category["a"][0].k == 2 and c.by_category["a"][1].k == 0
    logp = torch.log_softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), -1)
    shifted = logp.roll(1, -1)
    text = Damage([2.0, 2.2, 1.8])
    metrics = summarize(
        Measurement({"harmful": before, "benign": before}, logp, None, text),
        Measurement({"harmful": after, "benign": before}, shifted, None, Damage([2.5, 2.4, 2.3])),
    )
    data = metrics.as_dict()  # the keys of the metrics file
    assert data["harmful_refusal"]["before"]["value"] == 0.75
    assert data["harmful_refusal"]["after"]["value"] == 0.25
    assert data["benign_refusal"]["p_value"] == 1.0
    # KL(before || after) per prompt, averaged: computed here from the two distributions directly
    expected = (logp.exp() * (logp - shifted)).sum(-1).mean().item()
    reverse = (shifted.exp() * (shifted - logp)).sum(-1).mean().item()
    assert expected > 0.1 and abs(expected - reverse) > 0.01  # so the direction is tested too
    assert data["kl_first_token_harmless"]["value"] == pytest.approx(expected, rel=1e-6)
    ppl = metrics.perplexity["perplexity_harmless_text"]
    assert ppl.before.value == pytest.approx(math.exp(2.0)) and ppl.after.value == pytest.approx(math.exp(2.4))
    assert ppl.nll_change.value == pytest.approx(0.4)  # paired: the mean of the per-text differences
    assert "perplexity_original_answers" not in data  # neither side scored reference answers
    # JSON and back gives the same object, and every table prints the same rows from it
    assert Metrics.from_dict(json.loads(json.dumps(data))) == metrics
    rows = metrics.rows()
    assert metrics.header() == ("metric", "before", "after", "paired p") and all(len(r) == 4 for r in rows)
    assert rows[0] == ("Refusal, harmful test prompts", "75.0% [30-95] (3/4)", "25.0% [5-70] (1/4)", "0.5")


def test_a_model_alone_has_no_before_column_and_no_answer_perplexity():
    prompts, cats = ["Tell me about bread."] * 2, ["x", "y"]
    answers = judge_answers("benign", prompts, cats, ["I'm sorry, but I can't help with that.", "Bread is baked."])
    alone = summarize(None, Measurement({"harmful": answers, "benign": answers}, None, None, Damage([1.0, 3.0])))
    assert not alone.paired and alone.header("baseline", "model") == ("metric", "model")
    assert [r[0] for r in alone.rows()][-1] == "Perplexity, plain harmless text" and all(
        len(r) == 2 for r in alone.rows()
    )
    assert alone.rates["benign_refusal"].after.k == 1 and alone.rates["benign_refusal"].p_value is None
    assert alone.rates["benign_refusal"].category_rows() == [
        ("x", "1", "100.0% [21-100] (1/1)"),
        ("y", "1", "0.0% [0-79] (0/1)"),
    ]
    assert alone.kl == {} and set(alone.perplexity) == {"perplexity_harmless_text"}
    assert Metrics.from_dict(alone.as_dict()) == alone
