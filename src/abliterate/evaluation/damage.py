"""What an edit costs on harmless inputs: multi-token KL and perplexity, teacher-forced.

Every number here scores a fixed token sequence, so two models are compared on the same inputs:
the original model's greedy answers to harmless prompts (never the edited model's own answers,
which would reward a model that repeats itself) and a set of plain paragraphs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from abliterate import forward
from abliterate.architectures import input_embeddings
from abliterate.errors import AbliterateError
from abliterate.model import context_length, generate_ids, kl_divergence
from abliterate.prompts import DATA, read_jsonl

LOGITS_BUDGET = 2**28  # bytes of float32 logits one forward pass may produce; bounds memory on big vocabularies


@dataclass
class Reference:
    """The original model's greedy answers (token ids) and its log-probs along them."""

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    logprobs: list[torch.Tensor]  # per prompt (answer length, vocab), float32 on CPU


def harmless_text() -> list[str]:
    """The built-in plain paragraphs (written for abliterate) whose perplexity is measured."""
    return [str(r["text"]) for r in read_jsonl(DATA / "harmless_text.jsonl", ("text",))]


def reference_answers(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    n_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Reference:
    """Greedy answers of up to n_tokens (stopping at EOS) and the model's log-probs over them."""
    pairs = generate_ids(model, tokenizer, texts, n_tokens, batch_size, on_batch)
    prompt_ids, answer_ids = [p for p, _ in pairs], [a for _, a in pairs]
    logprobs: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for i, lp in teacher_forced(model, prompt_ids, answer_ids, batch_size):
        logprobs[i] = lp.cpu()
    return Reference(prompt_ids, answer_ids, logprobs)


@dataclass(frozen=True)
class Damage:
    """Teacher-forced scores of one model: per paragraph NLL; per reference answer KL and NLL, if scored."""

    text_nll: list[float]
    answer_kl: list[float] | None = None  # per prompt, mean per-token KL(reference || model)
    answer_nll: list[float] | None = None
    answer_tokens: int | None = None  # answer tokens scored, over all prompts


def measure(model: nn.Module, tokenizer, reference: Reference | None, paragraphs: list[str], batch_size: int) -> Damage:
    """Per prompt: mean per-token KL(reference || model) and answer NLL; per paragraph: NLL.

    Without a reference only the paragraphs are scored.
    """
    text = text_nll(model, tokenizer, paragraphs, batch_size)
    if reference is None:
        return Damage(text)
    per_token, nll = score_answers(model, reference, batch_size)
    tokens = sum(len(a) for a in reference.answer_ids)
    return Damage(text, [sum(k) / len(k) for k in per_token], nll, tokens)


def answer_kl(model: nn.Module, reference: Reference, batch_size: int) -> list[list[float]]:
    """Per prompt, per answer token: KL(reference || model), with the model fed the reference's answer."""
    return score_answers(model, reference, batch_size)[0]


@torch.no_grad()
def score_answers(model: nn.Module, reference: Reference, batch_size: int) -> tuple[list[list[float]], list[float]]:
    """Per prompt: per-token KL(reference || model) and the model's mean NLL of the answer, in one pass."""
    kl: list[list[float]] = [[] for _ in reference.answer_ids]
    nll = [0.0] * len(reference.answer_ids)
    for i, lp in teacher_forced(model, reference.prompt_ids, reference.answer_ids, batch_size):
        ref = reference.logprobs[i]
        if ref.shape[-1] != lp.shape[-1]:
            raise AbliterateError(
                f"the models have different vocabularies ({ref.shape[-1]} vs {lp.shape[-1]} tokens); "
                "KL needs the original of the same model as --baseline"
            )
        kl[i] = kl_divergence(ref.to(lp.device), lp).tolist()
        nll[i] = _mean_nll(lp, reference.answer_ids[i])
    return kl, nll


@torch.no_grad()
def answer_nll(
    model: nn.Module, prompt_ids: list[list[int]], answer_ids: list[list[int]], batch_size: int
) -> list[float]:
    """Per prompt, mean negative log-likelihood of the answer tokens given the prompt; prompt tokens are not scored."""
    result = [0.0] * len(answer_ids)
    for i, lp in teacher_forced(model, prompt_ids, answer_ids, batch_size):
        result[i] = _mean_nll(lp, answer_ids[i])
    return result


def _mean_nll(logprobs: torch.Tensor, tokens: list[int]) -> float:
    return -logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None]).mean().item()


def text_nll(model: nn.Module, tokenizer, paragraphs: list[str], batch_size: int) -> list[float]:
    """Per paragraph, mean negative log-likelihood of every token after the first (after BOS where there is one)."""
    limit = context_length(model) or 2048
    ids = [tokenizer(p, add_special_tokens=True).input_ids[:limit] for p in paragraphs]
    if any(len(x) < 2 for x in ids):
        raise AbliterateError("a perplexity text has fewer than two tokens; give longer texts")
    return answer_nll(model, [x[:1] for x in ids], [x[1:] for x in ids], batch_size)


def teacher_forced(
    model: nn.Module, prefixes: list[list[int]], continuations: list[list[int]], batch_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, float32 log-probs of shape (len(continuation), vocab)) at the positions that predict each
    continuation token, for prefix + continuation fed whole; batched with left padding, in any order."""
    device = input_embeddings(model).weight.device
    vocab = input_embeddings(model).num_embeddings
    groups = list(_batches(prefixes, continuations, batch_size, vocab))
    keeps = [max(len(continuations[i]) for i in index) + 1 for index in groups]
    inputs = []
    for index, keep in zip(groups, keeps):
        seqs = [prefixes[i] + continuations[i] for i in index]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # padding shifts nothing
        # Only the answer positions need the vocabulary projection.
        inputs.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                       "position_ids": position_ids.to(device), "logits_to_keep": keep})  # fmt: skip
    for out, index, keep in zip(forward.run(model, inputs), groups, keeps):
        logits = out.logits
        for row, i in enumerate(index):
            n = len(continuations[i])
            # logits[:, t] is position width - keep + t; the last n tokens are predicted from the n before them
            yield i, torch.log_softmax(logits[row, keep - n - 1 : keep - 1].float(), dim=-1)


def _batches(prefixes: list[list[int]], continuations: list[list[int]], batch_size: int, vocab: int):
    """Index groups of similar length, at most batch_size rows and about LOGITS_BUDGET bytes of logits each."""
    for i, (p, c) in enumerate(zip(prefixes, continuations)):
        if not p or not c:
            raise ValueError(f"item {i} needs a non-empty prefix and continuation to score")
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(continuations[i]))
    group: list[int] = []
    longest = 0
    for i in order:
        longest_with = max(longest, len(continuations[i]) + 1)
        if group and (len(group) >= batch_size or (len(group) + 1) * longest_with * vocab * 4 > LOGITS_BUDGET):
            yield group
            group, longest_with = [], len(continuations[i]) + 1
        group.append(i)
        longest = longest_with
    if group:
        yield group
