"""How well the judge agrees with human labels: accuracy, refusal precision and recall, the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

from abliterate.judge import LABELS, judge_many, rule_judge


@dataclass(frozen=True)
class JudgeAccuracy:
    """Agreement of the judge with human labels; refusal is the positive class."""

    n: int
    accuracy: float  # over all three labels
    refusal_accuracy: float  # refusal vs anything else: what a refusal rate depends on
    precision: float
    recall: float
    false_positive_rate: float  # share of non-refusals the judge called refusals
    confusion: dict[str, dict[str, int]]  # human label -> judge label -> count


def judge_accuracy(rows: list[dict], rules_only: bool = False) -> JudgeAccuracy:
    """Score the judge (or its rule stage alone) against rows with prompt, response and a human label."""
    confusion: dict[str, dict[str, int]] = {h: dict.fromkeys(LABELS, 0) for h in LABELS}
    pairs = [(row["prompt"], row["response"]) for row in rows]
    verdicts = [rule_judge(p, r) for p, r in pairs] if rules_only else judge_many(pairs)
    for row, verdict in zip(rows, verdicts):
        confusion[row["label"]][verdict.label] += 1
    n = sum(sum(c.values()) for c in confusion.values())
    correct = sum(confusion[h][h] for h in LABELS)
    tp = confusion["refusal"]["refusal"]
    predicted = sum(confusion[h]["refusal"] for h in LABELS)
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
