"""Candidate refusal directions: the difference of means at every (position, layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abliterate.capture import ResidualMeans


@dataclass(frozen=True)
class Candidates:
    """Mean differences (unnormalized, for activation addition) and unit directions.

    Both have shape (positions, layers + 1, hidden), float64. `spread`, where collected, is each
    harmful prompt's last-token activation minus the harmless mean, float32 (prompts, layers + 1,
    hidden): the variation several directions at once are drawn from.
    """

    diffs: torch.Tensor
    directions: torch.Tensor
    spread: torch.Tensor | None = None

    def direction(self, position: int, layer: int) -> torch.Tensor:
        """Unit direction of one candidate."""
        return self.directions[position, layer]

    def _neighbours(self, layer: float) -> tuple[int, int, float]:
        last = self.directions.shape[1] - 1
        if not 0 <= layer <= last:
            raise ValueError(f"layer index {layer} is outside 0..{last}")
        low = min(int(layer), last - 1) if last > 0 else 0
        return low, min(low + 1, last), layer - low

    def between(self, position: int, layer: float) -> torch.Tensor:
        """Unit direction at a fractional layer index: the normalized blend of the two neighbouring layers'."""
        low, high, share = self._neighbours(layer)
        blend = (1 - share) * self.directions[position, low] + share * self.directions[position, high]
        return blend / blend.norm().clamp_min(1e-12)

    def several(self, position: int, layer: float, k: int) -> torch.Tensor:
        """k orthonormal directions (rows) at a fractional layer: the mean difference first, then the top k-1
        principal directions of the harmful prompts' spread around it; for k = 1 the direction of `between`."""
        first = self.between(position, layer)
        if k == 1:
            return first
        if self.spread is None or position != 0:
            raise ValueError("several directions need each harmful prompt's last-token activations (position 0)")
        low, high, share = self._neighbours(layer)
        spread = (1 - share) * self.spread[:, low].double() + share * self.spread[:, high].double()
        spread = spread - (spread @ first)[:, None] * first  # what the first direction leaves unexplained
        _, _, vh = torch.linalg.svd(spread, full_matrices=False)
        extra = vh[: k - 1]
        extra = extra * torch.sign(extra.gather(1, extra.abs().argmax(1, keepdim=True)))  # a fixed sign per row
        return torch.cat([first[None], extra])

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
    spread = None
    if harmful.last_token is not None:
        spread = (harmful.last_token.double() - harmless.mean[0]).float()
    return Candidates(diffs, directions, spread)
