"""Collect running means of the residual stream at every layer, at the last prompt positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

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
    """

    sums: torch.Tensor
    count: int = 0
    position_counts: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """The running mean so far."""
        if self.position_counts is None:
            return self.sums / max(self.count, 1)
        return self.sums / self.position_counts.clamp(min=1).to(self.sums.dtype)[:, None, None]


def _grab(store: list, index: int, positions: int):
    def take(hidden: torch.Tensor) -> None:
        # Left padding puts the last prompt tokens at the end of every row; flip so 0 = last token.
        # A batch shorter than `positions` gives fewer columns; collect() counts them.
        store[index] = hidden[:, -positions:, :].flip(1).detach()

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
) -> ResidualMeans:
    """Run the prompts through the model (forward passes only) and return residual means.

    Padding never enters a mean: where a prompt is shorter than `positions`, its pad positions are
    left out and that position's mean is over the prompts long enough to reach it.
    """
    blocks = layers(model, arch)
    n_layers = len(blocks)
    hidden = input_embeddings(model).weight.shape[1]
    position_counts = torch.zeros(positions, dtype=torch.long)
    means = ResidualMeans(
        torch.zeros(positions, n_layers + 1, hidden, dtype=torch.float64), position_counts=position_counts
    )
    store: list = [None] * (n_layers + 1)
    pre_hooks, post_hooks = [], []
    for i, block in enumerate(blocks):
        pre_hooks.append((block, _grab(store, i, positions)[0]))
    post_hooks.append((blocks[-1], _grab(store, n_layers, positions)[1]))
    device = input_embeddings(model).weight.device
    # Similar lengths together waste less compute on padding; the means do not depend on order.
    ordered = sorted(texts, key=len)
    with add_hooks(pre_hooks, post_hooks):
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            inputs = encode(tokenizer, chunk, device)
            model(**inputs, use_cache=False, logits_to_keep=1)
            # Real tokens, newest first, to match the flipped activations; pad columns are masked out.
            real = inputs["attention_mask"][:, -positions:].flip(1).bool()
            seen = real.shape[1]
            for i, acts in enumerate(store):
                # where(), not a product: a pad row's activations may be NaN under a fully masked softmax
                kept = torch.where(real.to(acts.device)[..., None], acts.double(), 0.0)
                means.sums[:seen, i, :] += kept.sum(0).cpu()
            position_counts[:seen] += real.sum(0).cpu()
            means.count += len(chunk)
            if on_batch:
                on_batch(len(chunk))
    if texts and position_counts.min() == 0:
        longest = int((position_counts > 0).sum())
        raise AbliterateError(
            f"--positions {positions} reaches past the longest prompt ({longest} tokens); lower --positions"
        )
    return means
