"""Collect running means of the residual stream at every layer, at the last prompt positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from abliterate import forward
from abliterate.architectures import Architecture, input_embeddings, layers
from abliterate.edit import add_hooks
from abliterate.errors import AbliterateError
from abliterate.model import encode


@dataclass
class ResidualMeans:
    """Float64 sums of residual activations, shape (positions, layers + 1, hidden); never per prompt.

    Index l < L is the input of layer l; index L is the output of the last layer (before the final
    norm). Position 0 is the last prompt token, 1 the one before it, and so on. `count` is the number
    of prompts; `position_counts` how many of them reach back to each position (a prompt shorter than
    the positions adds nothing where it has only padding); None means `count` at every position.
    `last_token`, only where asked for, holds each prompt's own activations at the last token,
    float32 (prompts, layers + 1, hidden): what several directions at once are found from.
    """

    sums: torch.Tensor
    count: int = 0
    position_counts: torch.Tensor | None = None
    last_token: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """The running mean so far."""
        if self.position_counts is None:
            return self.sums / max(self.count, 1)
        return self.sums / self.position_counts.clamp(min=1).to(self.sums.dtype)[:, None, None]


def _accumulate(means: ResidualMeans, real: list[torch.Tensor], index: int, positions: int, rows: list | None = None):
    """(pre-hook, post-hook) adding one layer's activations at the last positions to means.sums[:, index].

    Each layer runs once per batch, in batch order (in memory and streamed alike), so the k-th call
    is batch k and `real[k]` masks its pad positions out.
    """
    calls = [0]

    def take(hidden: torch.Tensor) -> None:
        mask = real[calls[0]]
        calls[0] += 1
        # Left padding puts the last prompt tokens at the end of every row; flip so 0 = last token.
        acts = hidden[:, -positions:, :].flip(1).detach()
        # where(), not a product: a pad row's activations may be NaN under a fully masked softmax
        kept = torch.where(mask.to(acts.device)[..., None], acts.double(), 0.0)
        means.sums[: mask.shape[1], index, :] += kept.sum(0).cpu()
        if rows is not None:  # position 0, the last token, is real in every row (left padding)
            rows.append(acts[:, 0, :].float().cpu())

    def pre_hook(module, args, kwargs):
        take(args[0] if args else kwargs["hidden_states"])

    def post_hook(module, args, output):
        take(output[0] if isinstance(output, tuple) else output)

    return pre_hook, post_hook


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer,
    arch: Architecture,
    texts: list[str],
    batch_size: int = 16,
    positions: int = 1,
    on_batch: Callable[[int], None] | None = None,
    keep_last_token: bool = False,
) -> ResidualMeans:
    """Run the prompts through the model (forward passes only) and return residual means.

    Padding never enters a mean: where a prompt is shorter than `positions`, its pad positions are
    left out and that position's mean is over the prompts long enough to reach it. With
    `keep_last_token` each prompt's last-token activations are kept too (float32, one row per prompt
    and layer: a few MB for a thousand prompts of a small model).
    """
    blocks = layers(model, arch)
    n_layers = len(blocks)
    hidden = input_embeddings(model).weight.shape[1]
    position_counts = torch.zeros(positions, dtype=torch.long)
    means = ResidualMeans(
        torch.zeros(positions, n_layers + 1, hidden, dtype=torch.float64), position_counts=position_counts
    )
    device = input_embeddings(model).weight.device
    # Similar lengths together waste less compute on padding; the means do not depend on order.
    ordered = sorted(texts, key=len)
    chunks = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    batches = [encode(tokenizer, chunk, device) for chunk in chunks]
    # Real tokens, newest first, to match the flipped activations; a batch shorter than `positions` has fewer.
    real = [b["attention_mask"][:, -positions:].flip(1).bool().cpu() for b in batches]
    rows: list[list[torch.Tensor]] | None = [[] for _ in range(n_layers + 1)] if keep_last_token else None
    row = lambda i: rows[i] if rows is not None else None  # noqa: E731
    pre_hooks = [(block, _accumulate(means, real, i, positions, row(i))[0]) for i, block in enumerate(blocks)]
    post_hooks = [(blocks[-1], _accumulate(means, real, n_layers, positions, row(n_layers))[1])]
    with add_hooks(pre_hooks, post_hooks):
        for _, chunk, mask in zip(forward.run(model, batches, logits_to_keep=1), chunks, real):
            position_counts[: mask.shape[1]] += mask.sum(0)
            means.count += len(chunk)
            if on_batch:
                on_batch(len(chunk))
    if texts and position_counts.min() == 0:
        longest = int((position_counts > 0).sum())
        raise AbliterateError(
            f"--positions {positions} reaches past the longest prompt ({longest} tokens); lower --positions"
        )
    if rows is not None and texts:
        means.last_token = torch.stack([torch.cat(per_layer) for per_layer in rows], dim=1)
    return means
