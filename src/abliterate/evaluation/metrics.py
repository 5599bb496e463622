"""Before/after numbers as one typed object that prints itself the same way everywhere: terminal, card, HTML, Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field

from abliterate.evaluation.stats import Mean, Rate

# key in the metrics file -> the row's name; answers are judged per set for each label
RATE_ROWS = {
    "harmful_refusal": "Refusal, harmful test prompts",
    "harmful_degenerate": "Degenerate, harmful test prompts",
    "benign_refusal": "Over-refusal, benign alarming prompts",
    "benign_degenerate": "Degenerate, benign alarming prompts",
}
KL_ROWS = {
    "kl_first_token_harmless": "First-token KL, harmless test prompts",
    "kl_answer_harmless": "Per-token KL on the original's harmless answers",
}
PERPLEXITY_ROWS = {
    "perplexity_harmless_text": "Perplexity, plain harmless text",
    "perplexity_original_answers": "Perplexity of the original's harmless answers",
}


@dataclass(frozen=True)
class RateChange:
    """One label's rate on one prompt set, before (None for a model measured alone) and after."""

    before: Rate | None
    after: Rate
    p_value: float | None  # exact McNemar on the paired answers
    by_category: dict[str, tuple[Rate | None, Rate]] = field(default_factory=dict)

    def category_rows(self) -> list[tuple[str, ...]]:
        """(category, n, before, after) rows, or (category, n, value) for one model alone."""
        return [
            (c, str(a.n), b.cell(), a.cell()) if b is not None else (c, str(a.n), a.cell())
            for c, (b, a) in self.by_category.items()
        ]

    def as_dict(self) -> dict:
        """JSON form."""
        return {
            "before": self.before.as_dict() if self.before else None,
            "after": self.after.as_dict(),
            "p_value": self.p_value,
            "by_category": {c: [b.as_dict() if b else None, a.as_dict()] for c, (b, a) in self.by_category.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> RateChange:
        """Read the JSON form back."""
        rate = lambda d: Rate.from_dict(d) if d else None  # noqa: E731
        cats = {c: (rate(b), Rate.from_dict(a)) for c, (b, a) in data.get("by_category", {}).items()}
        return cls(rate(data.get("before")), Rate.from_dict(data["after"]), data.get("p_value"), cats)


@dataclass(frozen=True)
class PerplexityChange:
    """Perplexity before and after on the same texts, with the paired change in mean NLL."""

    before: Mean | None
    after: Mean
    nll_change: Mean | None

    def as_dict(self) -> dict:
        """JSON form."""
        return {
            "before": self.before.as_dict() if self.before else None,
            "after": self.after.as_dict(),
            "nll_change": self.nll_change.as_dict() if self.nll_change else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PerplexityChange:
        """Read the JSON form back."""
        mean = lambda d: Mean.from_dict(d) if d else None  # noqa: E731
        return cls(mean(data.get("before")), Mean.from_dict(data["after"]), mean(data.get("nll_change")))


@dataclass(frozen=True)
class Metrics:
    """Everything a before/after comparison (or one model alone) measured."""

    rates: dict[str, RateChange]
    kl: dict[str, Mean] = field(default_factory=dict)  # KL_ROWS keys
    kl_answer_tokens: int | None = None
    perplexity: dict[str, PerplexityChange] = field(default_factory=dict)  # PERPLEXITY_ROWS keys

    @property
    def paired(self) -> bool:
        """Whether there is a before column."""
        return any(r.before is not None for r in self.rates.values())

    def rows(self) -> list[tuple[str, ...]]:
        """(metric, before, after, paired p) rows, or (metric, value) for one model: every table prints these."""
        rows: list[tuple[str, ...]] = []
        for key, name in RATE_ROWS.items():
            if r := self.rates.get(key):
                p = "" if r.p_value is None else f"{r.p_value:.3g}"
                if self.paired:
                    assert r.before is not None  # a paired comparison measured every rate before too
                    rows.append((name, r.before.cell(), r.after.cell(), p))
                else:
                    rows.append((name, r.after.cell()))
        for key, name in KL_ROWS.items():
            if m := self.kl.get(key):
                rows.append((name, "0", m.cell(), ""))
        for key, name in PERPLEXITY_ROWS.items():
            if change := self.perplexity.get(key):
                after = change.after.cell(2)
                rows.append(
                    (name, change.before.cell(2), after, "") if change.before and self.paired else (name, after)
                )
        return rows

    def header(self, before: str = "before", after: str = "after") -> tuple[str, ...]:
        """Column names matching rows()."""
        return ("metric", before, after, "paired p") if self.paired else ("metric", after)

    def as_dict(self) -> dict:
        """JSON form, under the keys of the metrics file."""
        data: dict = {key: r.as_dict() for key, r in self.rates.items()}
        for key, m in self.kl.items():
            data[key] = m.as_dict() | ({"tokens": self.kl_answer_tokens} if key == "kl_answer_harmless" else {})
        data.update({key: p.as_dict() for key, p in self.perplexity.items()})
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> Metrics | None:
        """Read the JSON form back; None for a run without evaluation."""
        if not data:
            return None
        return cls(
            {k: RateChange.from_dict(data[k]) for k in RATE_ROWS if k in data},
            {k: Mean.from_dict(data[k]) for k in KL_ROWS if k in data},
            (data.get("kl_answer_harmless") or {}).get("tokens"),
            {k: PerplexityChange.from_dict(data[k]) for k in PERPLEXITY_ROWS if k in data},
        )
