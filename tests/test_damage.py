"""Multi-token KL and perplexity: exact against hand computation, blind to padding, answer tokens only."""

from __future__ import annotations

import copy

import pytest
import torch

from abliterate.architectures import architecture_for
from abliterate.edit import orthogonalize, unit
from abliterate.evaluation import damage
from abliterate.model import generate_ids
from abliterate.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["<|user|>hi<|end|><|assistant|>", "<|user|>tell me a much longer story please<|end|><|assistant|>"]


@pytest.fixture(scope="module")
def pair():
    """A tiny model, an orthogonalized copy and a tokenizer."""
    original = tiny_model("llama")
    edited = copy.deepcopy(original)
    r = unit(torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    orthogonalize(edited, architecture_for(edited), r)
    tok = tiny_tokenizer()
    tok.padding_side = "left"  # as model.load sets it
    return original, edited, tok


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-probs of every next token for one unpadded sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def test_kl_zero_for_same_model_and_matches_hand_computation(pair):
    original, edited, tok = pair
    ref = damage.reference_answers(original, tok, PROMPTS, 6, batch_size=2)
    assert [len(a) for a in ref.answer_ids] == [6, 6]  # random tiny model never says EOS in 6 tokens
    same = damage.answer_kl(original, ref, batch_size=2)
    assert max(max(k) for k in same) < 1e-9
    got = damage.measure(edited, tok, ref, ["A short plain paragraph about bread."], batch_size=2).answer_kl
    for i, (p, a) in enumerate(zip(ref.prompt_ids, ref.answer_ids)):
        seq = p + a
        lp, lq = full_logprobs(original, seq), full_logprobs(edited, seq)
        rows = slice(len(p) - 1, len(seq) - 1)  # the positions that predict the answer tokens
        kl = (lp[rows].exp() * (lp[rows] - lq[rows])).sum(-1)
        assert got[i] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-7)  # log-probs are kept in float32
        assert got[i] > 1e-4


def test_padding_and_batching_change_nothing(pair):
    original, edited, tok = pair
    ref = damage.reference_answers(original, tok, PROMPTS, 5, batch_size=2)
    alone = damage.reference_answers(original, tok, PROMPTS, 5, batch_size=1)
    assert ref.answer_ids == alone.answer_ids and ref.prompt_ids == alone.prompt_ids
    assert len(ref.prompt_ids[0]) < len(ref.prompt_ids[1])  # so batch 2 really pads the first prompt
    batched = damage.answer_kl(edited, ref, batch_size=2)
    single = damage.answer_kl(edited, ref, batch_size=1)
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, rel=1e-6, abs=1e-12)


def test_answer_nll_scores_only_answer_tokens(pair):
    original, edited, tok = pair
    ref = damage.reference_answers(original, tok, PROMPTS, 4, batch_size=2)
    nll = damage.answer_nll(edited, ref.prompt_ids, ref.answer_ids, batch_size=2)
    assert damage.score_answers(edited, ref, batch_size=2)[1] == pytest.approx(nll, rel=1e-9)
    for i, (p, a) in enumerate(zip(ref.prompt_ids, ref.answer_ids)):
        seq = p + a
        lq = full_logprobs(edited, seq)
        token_lp = lq[:-1].gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        answer_only = -token_lp[len(p) - 1 :].mean().item()
        everything = -token_lp.mean().item()
        assert nll[i] == pytest.approx(answer_only, rel=1e-6)
        assert abs(answer_only - everything) > 1e-3  # prompt tokens would change the number
    # The original model's NLL on its own greedy answers equals -mean log p read off the reference.
    own = damage.answer_nll(original, ref.prompt_ids, ref.answer_ids, batch_size=1)
    for i, a in enumerate(ref.answer_ids):
        expect = -ref.logprobs[i].gather(-1, torch.tensor(a)[:, None]).mean().item()
        assert own[i] == pytest.approx(expect, rel=1e-6)


def test_answers_stop_at_eos(pair):
    original, _, tok = pair
    free = generate_ids(original, tok, PROMPTS[:1], 8, 1)[0][1]
    stop = next(t for k, t in enumerate(free) if k >= 2 and t not in free[:k])
    model = copy.deepcopy(original)
    model.generation_config.eos_token_id = stop
    ref = damage.reference_answers(model, tok, PROMPTS, 8, batch_size=2)
    cut = free.index(stop) + 1
    assert ref.answer_ids[0] == free[:cut]  # ends with the EOS token, nothing after it
    assert ref.logprobs[0].shape == (cut, original.config.vocab_size)


def test_text_nll_matches_perplexity_by_hand(pair):
    _, edited, tok = pair
    texts = damage.harmless_text()
    assert len(texts) >= 60 and len(set(texts)) == len(texts)
    nll = damage.text_nll(edited, tok, texts[:3], batch_size=2)
    for text, value in zip(texts[:3], nll):
        ids = tok(text).input_ids
        lq = full_logprobs(edited, ids)
        expect = -lq[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
        assert value == pytest.approx(expect, rel=1e-6)


def test_small_logits_budget_splits_batches(pair, monkeypatch):
    original, edited, tok = pair
    ref = damage.reference_answers(original, tok, PROMPTS, 4, batch_size=2)
    whole = damage.answer_kl(edited, ref, batch_size=2)
    monkeypatch.setattr(damage, "LOGITS_BUDGET", 1)  # forces one row per forward pass
    groups = list(damage._batches(ref.prompt_ids, ref.answer_ids, 2, 320))
    assert groups == [[0], [1]]
    split = damage.answer_kl(edited, ref, batch_size=2)
    assert sum(split, []) == pytest.approx(sum(whole, []), rel=1e-6)
