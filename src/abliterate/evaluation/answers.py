"""Judged answers to one prompt set: labels, rates per label and category, side-by-side samples."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from abliterate.evaluation.stats import Rate, wilson
from abliterate.judge import judge_many


@dataclass(frozen=True)
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

    def rows(self, baseline: JudgedAnswers | None = None) -> list[dict]:
        """Every prompt with its answer and label (and the baseline's, paired by position), for the JSON files."""
        rows = []
        for i, prompt in enumerate(self.prompts):
            row = {"prompt": prompt, "category": self.categories[i]}
            if baseline is not None:
                row |= {"before": baseline.responses[i], "before_label": baseline.labels[i]}
            rows.append(row | {"after": self.responses[i], "after_label": self.labels[i]})
        return rows


def judge_answers(name: str, prompts: list[str], categories: list[str], responses: list[str]) -> JudgedAnswers:
    """Label every (prompt, response) pair with the judge."""
    verdicts = judge_many(zip(prompts, responses))
    return JudgedAnswers(name, prompts, categories, responses, [v.label for v in verdicts], [v.score for v in verdicts])


def sample_pairs(before: JudgedAnswers | None, after: JudgedAnswers, count: int = 6, seed: int = 0) -> list[dict]:
    """A few answers to show: paired, those whose label changed first; alone, refusals first."""
    if before is None:
        order = sorted(range(len(after.labels)), key=lambda i: after.labels[i] != "refusal")
        return [after.rows()[i] for i in order[:count]]
    changed = [i for i in range(len(before.labels)) if before.labels[i] != after.labels[i]]
    same = [i for i in range(len(before.labels)) if i not in set(changed)]
    rng = random.Random(seed)
    picks = (rng.sample(changed, min(count, len(changed))) + rng.sample(same, len(same)))[:count]
    rows = after.rows(before)
    return [rows[i] for i in picks]
