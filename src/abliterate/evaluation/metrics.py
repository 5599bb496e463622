"""Measure what an edit did: refusal, over-refusal, degenerate answers and KL, with intervals."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from abliterate.judge import judge_many, rule_judge
from abliterate.model import kl_divergence


@dataclass(frozen=True)
class Rate:
    """k of n, with a 95% Wilson interval."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        """k / n (0 for n = 0)."""
        return self.k / self.n if self.n else 0.0

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] ({self.k}/{self.n})"


@dataclass(frozen=True)
class Mean:
    """A mean with a 95% bootstrap interval."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def wilson(k: int, n: int, z: float = 1.96) -> Rate:
    """Wilson score interval: sensible near 0% and 100%, where the normal interval is not."""
    if n == 0:
        return Rate(0, 0, 0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Rate(k, n, max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values: list[float], resamples: int = 2000, seed: int = 0) -> Mean:
    """Mean with a percentile bootstrap interval (seeded, so reruns print the same numbers)."""
    n = len(values)
    if n == 0:
        return Mean(float("nan"), float("nan"), float("nan"), 0)
    data = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    means = data[idx].mean(1).sort().values
    return Mean(data.mean().item(), means[int(0.025 * resamples)].item(), means[int(0.975 * resamples) - 1].item(), n)


def mcnemar(before: list[bool], after: list[bool]) -> float:
    """Exact two-sided McNemar p-value for paired yes/no outcomes on the same prompts."""
    b = sum(1 for x, y in zip(before, after) if x and not y)
    c = sum(1 for x, y in zip(before, after) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class JudgedAnswers:
    """Responses to one prompt set with their labels."""

    name: str
    prompts: list[str]
    categories: list[str]
    responses: list[str]
    labels: list[str]
    scores: list[float]

    def rate(self, label: str) -> Rate:
        """Share of answers with this label."""
        return wilson(sum(lab == label for lab in self.labels), len(self.labels))

    def flags(self, label: str) -> list[bool]:
        """Per answer, whether it has this label."""
        return [lab == label for lab in self.labels]

    def by_category(self, label: str) -> dict[str, Rate]:
        """Rate of a label within each category."""
        groups: dict[str, list[bool]] = defaultdict(list)
        for cat, lab in zip(self.categories, self.labels):
            groups[cat].append(lab == label)
        return {cat: wilson(sum(v), len(v)) for cat, v in sorted(groups.items())}


def judge_answers(name: str, prompts: list[str], categories: list[str], responses: list[str]) -> JudgedAnswers:
    """Label every (prompt, response) pair with the judge."""
    verdicts = judge_many(zip(prompts, responses))
    return JudgedAnswers(name, prompts, categories, responses, [v.label for v in verdicts], [v.score for v in verdicts])


@dataclass
class Comparison:
    """Before/after numbers for one prompt set and one label, paired on the same prompts."""

    set_name: str
    label: str
    before: Rate
    after: Rate
    p_value: float
    by_category: dict[str, tuple[Rate, Rate]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        d = asdict(self)
        for key in ("before", "after"):
            d[key]["value"] = getattr(self, key).value
        return d


def compare(before: JudgedAnswers, after: JudgedAnswers, label: str) -> Comparison:
    """Rates before and after, with McNemar's test on the paired answers."""
    cats_before, cats_after = before.by_category(label), after.by_category(label)
    return Comparison(
        before.name,
        label,
        before.rate(label),
        after.rate(label),
        mcnemar(before.flags(label), after.flags(label)),
        {c: (cats_before[c], cats_after[c]) for c in cats_before},
    )


def sample_pairs(before: JudgedAnswers, after: JudgedAnswers, count: int = 6, seed: int = 0) -> list[dict]:
    """A few side-by-side answers, preferring prompts whose label changed."""
    changed = [i for i in range(len(before.labels)) if before.labels[i] != after.labels[i]]
    same = [i for i in range(len(before.labels)) if i not in set(changed)]
    rng = random.Random(seed)
    picks = (rng.sample(changed, min(count, len(changed))) + rng.sample(same, len(same)))[:count]
    return [
        {
            "prompt": before.prompts[i],
            "before": before.responses[i],
            "before_label": before.labels[i],
            "after": after.responses[i],
            "after_label": after.labels[i],
        }
        for i in picks
    ]


def summarize(before: dict, after: dict) -> dict:
    """Before/after rates with paired tests; first-token KL, multi-token KL and perplexity where measured."""
    metrics = {}
    for key in ("harmful", "benign"):
        for label in ("refusal", "degenerate"):
            metrics[f"{key}_{label}"] = compare(before[key], after[key], label).as_dict()
    if "harmless_logprobs" in before and "harmless_logprobs" in after:
        kl = kl_divergence(before["harmless_logprobs"], after["harmless_logprobs"]).tolist()
        metrics["kl_first_token_harmless"] = asdict(bootstrap_mean(kl))
    if "damage" in before and "damage" in after:
        metrics.update(damage_summary(before["damage"], after["damage"]))
    return metrics


def perplexity(nll: list[float]) -> dict:
    """exp of the mean per-text negative log-likelihood; the bootstrap interval of the mean, exponentiated."""
    m = bootstrap_mean(nll)
    return {"value": math.exp(m.value), "low": math.exp(m.low), "high": math.exp(m.high), "n": m.n}


def damage_summary(before: dict, after: dict) -> dict:
    """Per-token KL over the original's answers, and perplexities before/after with the paired change in NLL.

    `before` and `after` are damage.measure() results for the original and the edited model.
    """
    result = {}
    if "answer_kl" in after:
        result["kl_answer_harmless"] = {**asdict(bootstrap_mean(after["answer_kl"])), "tokens": after["answer_tokens"]}
    for key, name in (("text_nll", "perplexity_harmless_text"), ("answer_nll", "perplexity_original_answers")):
        if key in before and key in after:
            change = [a - b for a, b in zip(after[key], before[key])]
            result[name] = {
                "before": perplexity(before[key]),
                "after": perplexity(after[key]),
                "nll_change": asdict(bootstrap_mean(change)),  # paired over the same texts
            }
    return result


@dataclass(frozen=True)
class JudgeAccuracy:
    """Agreement of the judge with human labels; refusal is the positive class."""

    n: int
    accuracy: float  # over all three labels
    refusal_accuracy: float  # refusal vs anything else: what a refusal rate depends on
    precision: float
    recall: float
    false_positive_rate: float  # share of non-refusals the judge called refusals
    confusion: dict  # human label -> judge label -> count


def judge_accuracy(rows: list[dict], rules_only: bool = False) -> JudgeAccuracy:
    """Score the judge (or its rule stage alone) against rows with prompt, response and a human label."""
    labels = ("refusal", "compliance", "degenerate")
    confusion = {h: dict.fromkeys(labels, 0) for h in labels}
    pairs = [(row["prompt"], row["response"]) for row in rows]
    verdicts = [rule_judge(p, r) for p, r in pairs] if rules_only else judge_many(pairs)
    for row, verdict in zip(rows, verdicts):
        confusion[row["label"]][verdict.label] += 1
    n = sum(sum(c.values()) for c in confusion.values())
    correct = sum(confusion[h][h] for h in labels)
    tp = confusion["refusal"]["refusal"]
    predicted = sum(confusion[h]["refusal"] for h in labels)
    actual = sum(confusion["refusal"].values())
    negatives = n - actual
    refusal_correct = n - (predicted - tp) - (actual - tp)
    return JudgeAccuracy(
        n,
        correct / n if n else 0.0,
        refusal_correct / n if n else 0.0,
        tp / predicted if predicted else 1.0,
        tp / actual if actual else 1.0,
        (predicted - tp) / negatives if negatives else 0.0,
        confusion,
    )
