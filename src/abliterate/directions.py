"""Candidate refusal directions: the difference of means at every (position, layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abliterate.capture import ResidualMeans


@dataclass(frozen=True)
class Candidates:
    """Mean differences (unnormalized, for activation addition) and unit directions.

    Both have shape (positions, layers + 1, hidden), float64.
    """

    diffs: torch.Tensor
    directions: torch.Tensor

    def direction(self, position: int, layer: int) -> torch.Tensor:
        """Unit direction of one candidate."""
        return self.directions[position, layer]

    def between(self, position: int, layer: float) -> torch.Tensor:
        """Unit direction at a fractional layer index: the normalized blend of the two neighbouring layers'."""
        last = self.directions.shape[1] - 1
        if not 0 <= layer <= last:
            raise ValueError(f"layer index {layer} is outside 0..{last}")
        low = min(int(layer), last - 1) if last > 0 else 0
        share = layer - low
        blend = (1 - share) * self.directions[position, low] + share * self.directions[position, min(low + 1, last)]
        return blend / blend.norm().clamp_min(1e-12)

    def diff(self, position: int, layer: int) -> torch.Tensor:
        """Unnormalized mean difference of one candidate."""
        return self.diffs[position, layer]


def difference_of_means(
    harmful: ResidualMeans, harmless: ResidualMeans, project_harmless_mean: bool = False
) -> Candidates:
    """mean(harmful) - mean(harmless), optionally without its component along the harmless mean.

    Removing the harmless-mean component keeps the edit from shrinking what every prompt shares,
    which can lower KL at some cost in refusal removal.
    """
    diffs = harmful.mean - harmless.mean
    if project_harmless_mean:
        base = harmless.mean / harmless.mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        diffs = diffs - (diffs * base).sum(-1, keepdim=True) * base
    directions = diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return Candidates(diffs, directions)
