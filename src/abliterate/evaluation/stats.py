"""Intervals and paired tests: Wilson rates, bootstrap means, exact McNemar."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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

    def cell(self) -> str:
        """The one way a rate is printed: terminal, model card, Markdown and HTML alike."""
        return f"{100 * self.value:.1f}% [{100 * self.low:.0f}-{100 * self.high:.0f}] ({self.k}/{self.n})"

    def __str__(self) -> str:
        return self.cell()

    def as_dict(self) -> dict:
        """JSON form (value included for readers of the file)."""
        return {"k": self.k, "n": self.n, "low": self.low, "high": self.high, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict) -> Rate:
        """Read the JSON form back."""
        return cls(int(data["k"]), int(data["n"]), float(data["low"]), float(data["high"]))


@dataclass(frozen=True)
class Mean:
    """A mean with a 95% bootstrap interval."""

    value: float
    low: float
    high: float
    n: int

    def cell(self, digits: int = 4) -> str:
        """The one way a mean is printed."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"

    def __str__(self) -> str:
        return self.cell()

    def as_dict(self) -> dict:
        """JSON form."""
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict) -> Mean:
        """Read the JSON form back."""
        return cls(float(data["value"]), float(data["low"]), float(data["high"]), int(data["n"]))


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
