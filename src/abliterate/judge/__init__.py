"""The refusal judge: a degenerate-output screen, position-aware rules, then a learned classifier.

`judge` and `judge_many` run all layers; `rule_judge` runs the rules alone (no encoder needed).
"""

from __future__ import annotations

from collections.abc import Iterable

from abliterate.judge.learned import Classifier, features, shipped
from abliterate.judge.rules import LABELS, Label, Verdict, degeneracy, normalize, rule_judge, strip_reasoning

__all__ = [
    "Classifier",
    "LABELS",
    "Label",
    "Verdict",
    "degeneracy",
    "normalize",
    "rule_judge",
    "strip_reasoning",
    "judge",
    "judge_many",
]


def judge(prompt: str, response: str) -> Verdict:
    """Label one response to one prompt as refusal, compliance or degenerate."""
    return judge_many([(prompt, response)])[0]


def judge_many(pairs: Iterable[tuple[str, str]], classifier: Classifier | None = None) -> list[Verdict]:
    """Judge many (prompt, response) pairs in order: the rules screen and score, the classifier decides."""
    pairs = [(p, strip_reasoning(r)) for p, r in pairs]  # a reasoning block is not the answer
    verdicts = [rule_judge(p, r) for p, r in pairs]
    todo = [i for i, v in enumerate(verdicts) if v.label != "degenerate"]
    if not todo:
        return verdicts
    classifier = classifier or shipped()
    x = features([pairs[i][0] for i in todo], [pairs[i][1] for i in todo], [verdicts[i] for i in todo])
    labels, p_refusal = classifier.labels(x)
    for i, label, p in zip(todo, labels, p_refusal):
        reason = f"{verdicts[i].reason}; learned stage: {label} (P(refusal) {p:.2f})"
        verdicts[i] = Verdict(label, round(classifier.score(float(p)), 4), reason)
    return verdicts
