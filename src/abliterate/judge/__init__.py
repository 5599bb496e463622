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
    "explanation",
]


def judge(prompt: str, response: str) -> Verdict:
    """Label one response to one prompt as refusal, compliance or degenerate."""
    return judge_many([(prompt, response)])[0]


def judge_many(pairs: Iterable[tuple[str, str]], classifier: Classifier | None = None) -> list[Verdict]:
    """Judge many (prompt, response) pairs in order: the rules decide refusal, the classifier degenerate output.

    Refusal against the rest is the rules' call: refitted without a model family, the learned stage
    lowered accuracy on that family's refusals (docs/judge.md, leave one source out), so it only
    separates degenerate from compliant answers among those the rules call compliance.
    """
    pairs = [(p, strip_reasoning(r)) for p, r in pairs]  # a reasoning block is not the answer
    verdicts = [rule_judge(p, r) for p, r in pairs]
    todo = [i for i, v in enumerate(verdicts) if v.label == "compliance"]
    if not todo:
        return verdicts
    classifier = classifier or shipped()
    x = features([pairs[i][0] for i in todo], [pairs[i][1] for i in todo], [verdicts[i] for i in todo])
    for row, i, broken in zip(x, todo, classifier.degenerate(x)):
        rules = verdicts[i]
        label: Label = "degenerate" if broken else "compliance"
        reason = f"{rules.reason}; learned stage: {label}"
        evidence = (f"rules: {rules.label} (score {rules.score:.3f})", *rules.evidence, *classifier.explain(row))
        verdicts[i] = Verdict(label, rules.score, reason, "learned stage", evidence)
    return verdicts


def explanation(verdict: Verdict) -> str:
    """Which stage decided a verdict and why, one weighed cue per line (for a user who disagrees)."""
    head = f"{verdict.label} (score {verdict.score:.3f}), decided by the {verdict.stage}: {verdict.reason}"
    return "\n".join([head, *(f"    {line}" for line in verdict.evidence)])
