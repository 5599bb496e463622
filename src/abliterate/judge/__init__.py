"""The refusal judge: a degenerate-output screen, position-aware rules, then a learned classifier.

`judge` and `judge_many` run all layers; `rule_judge` runs the rules alone (no encoder needed).
"""

from __future__ import annotations

from collections.abc import Iterable

from .rules import Label, Verdict, degeneracy, normalize, rule_judge

__all__ = ["Label", "Verdict", "degeneracy", "normalize", "rule_judge", "judge", "judge_many"]


def judge(prompt: str, response: str) -> Verdict:
    """Label one response to one prompt as refusal, compliance or degenerate."""
    return judge_many([(prompt, response)])[0]


def judge_many(pairs: Iterable[tuple[str, str]]) -> list[Verdict]:
    """Judge many (prompt, response) pairs in order."""
    return [rule_judge(p, r) for p, r in pairs]
