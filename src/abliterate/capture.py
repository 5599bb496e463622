"""Collect running means of the residual stream at every layer, at the last prompt positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import Architecture, layers
from .edit import add_hooks
from .model import encode


@dataclass
class ResidualMeans:
    """Float64 sums of residual activations, shape (positions, layers + 1, hidden); never per prompt.

    Index l < L is the input of layer l; index L is the output of the last layer (before the final
    norm). Position 0 is the last prompt token, 1 the one before it, and so on.
    """

    sums: torch.Tensor
    count: int = 0

    @property
    def mean(self) -> torch.Tensor:
        """The running mean so far."""
        return self.sums / max(self.count, 1)


def _grab(store: list, index: int, positions: int):
    def take(hidden: torch.Tensor) -> None:
        # Left padding puts the last prompt tokens at the end of every row; flip so 0 = last token.
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
    """Run the prompts through the model (forward passes only) and return residual means."""
    blocks = layers(model, arch)
    n_layers = len(blocks)
    hidden = model.get_input_embeddings().weight.shape[1]
    means = ResidualMeans(torch.zeros(positions, n_layers + 1, hidden, dtype=torch.float64))
    store: list = [None] * (n_layers + 1)
    pre_hooks, post_hooks = [], []
    for i, block in enumerate(blocks):
        pre_hooks.append((block, _grab(store, i, positions)[0]))
    post_hooks.append((blocks[-1], _grab(store, n_layers, positions)[1]))
    device = model.get_input_embeddings().weight.device
    # Similar lengths together waste less compute on padding; the means do not depend on order.
    ordered = sorted(texts, key=len)
    with add_hooks(pre_hooks, post_hooks):
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            inputs = encode(tokenizer, chunk, device)
            model(**inputs, use_cache=False, logits_to_keep=1)
            for i, acts in enumerate(store):
                means.sums[:, i, :] += acts.double().sum(0).cpu()
            means.count += len(chunk)
            if on_batch:
                on_batch(len(chunk))
    return means
