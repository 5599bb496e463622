"""The central claim on a model that refuses: the edit removes refusal and keeps the model close.

SmolLM2 (the other real-model test) barely refuses, so it cannot show that refusal drops. The built-in
Qwen2.5-Coder-0.5B-Instruct refuses about a third of the built-in harmful prompts. Measured on 2 CPU
cores: judged refusals 11 -> 2 of 32 held-out prompts (McNemar p 0.004), refusal log-odds -1.44 ->
-4.37 (lower on all 32), first-token KL 0.25; 110 s with the model cached, about a minute more to
fetch it from PyPI and convert it on a cold cache.
"""

from __future__ import annotations

import pytest
import torch

from abliterate import capture, directions, model, prompts
from abliterate.edit import EditParams, orthogonalize
from abliterate.evaluation.answers import judge_answers
from abliterate.evaluation.stats import mcnemar
from abliterate.selection import refusal_log_odds

pytestmark = pytest.mark.slow

N_TRAIN, N_VAL, N_TEST, N_KL = 32, 16, 32, 24
MAX_NEW_TOKENS, BATCH = 16, 8
# Of layers 4-18 (the last 20% are never chosen), ablating layer 18's direction lowered refusal
# log-odds on the 16 validation prompts most (-1.5 -> -4.5); sparing the first third of the layers
# (the strength ladder's second step) halves the first-token KL for almost the same effect.
LAYER, PARAMS = 18, EditParams(1.0, 8)
# Measured: KL 0.25 nats with this edit, 0.58 removing it from every layer. A wrong edit (a writer
# edited along the wrong axis, a lost component) sends the model's answers to nonsense: several nats.
KL_BOUND = 0.5


def _answers(lm: model.LoadedModel, texts: list[str]) -> tuple[list[str], list[int | None]]:
    pairs = model.generate_ids(lm.model, lm.tokenizer, texts, MAX_NEW_TOKENS, BATCH)
    return [model.answer_text(lm.tokenizer, a) for _, a in pairs], [a[0] if a else None for _, a in pairs]


@pytest.fixture(scope="module")
def measured():
    """Held-out numbers before and after editing the real weights along the harmful-minus-harmless direction."""
    torch.manual_seed(0)
    lm = model.load("qwen2.5-coder-0.5b-instruct", progress=lambda _: None)
    tok, net = lm.tokenizer, lm.model
    harmful = prompts.split(prompts.builtin("harmful"), N_TRAIN, N_VAL, N_TEST)
    harmless = prompts.split(prompts.builtin("harmless"), N_TRAIN, N_VAL, N_KL)
    fmt = lambda ps: prompts.format_all(tok, ps.texts)  # noqa: E731
    means = [capture.collect(net, tok, lm.arch, fmt(s.train), BATCH) for s in (harmful, harmless)]
    direction = directions.difference_of_means(*means).direction(0, LAYER)

    def state() -> dict:
        answers, first = _answers(lm, fmt(harmful.test))
        judged = judge_answers("harmful", list(harmful.test.texts), ["-"] * N_TEST, answers)
        return {
            "judged": judged,
            "first": first,
            "harmful_lp": model.last_token_logprobs(net, tok, fmt(harmful.test), BATCH),
            "harmless_lp": model.last_token_logprobs(net, tok, fmt(harmless.test), BATCH),
        }

    before = state()
    orthogonalize(net, lm.arch, direction, PARAMS)  # the weight edit that is saved, not a hook
    after = state()
    # Refusal openings as select.find_refusal_tokens learns them: the first ids the model emitted when it refused.
    ids = tuple(sorted({t for t, r in zip(before["first"], before["judged"].flags("refusal")) if r and t is not None}))
    return before, after, ids


def test_judged_refusal_drops_significantly(measured):
    before, after, _ = measured
    was, now = before["judged"].flags("refusal"), after["judged"].flags("refusal")
    assert sum(was) >= 6, before["judged"].responses  # the model does refuse these prompts
    assert sum(now) <= sum(was) // 2, after["judged"].responses  # measured 11 -> 2
    assert mcnemar(was, now) < 0.05


def test_refusal_log_odds_drop_on_held_out_prompts(measured):
    before, after, ids = measured
    assert ids, "no refusal opened with a token the model emitted"
    was, now = refusal_log_odds(before["harmful_lp"], ids), refusal_log_odds(after["harmful_lp"], ids)
    assert (now < was).sum().item() >= N_TEST - 2, (was, now)  # nearly every held-out prompt, not just on average
    assert (was - now).mean().item() > 2.0, (was.mean(), now.mean())  # nats; measured -1.44 -> -4.37


def test_first_token_kl_on_harmless_prompts_is_bounded(measured):
    before, after, _ = measured
    kl = model.kl_divergence(before["harmless_lp"], after["harmless_lp"])
    assert 1e-4 < kl.mean().item() < KL_BOUND, kl  # edited, and still close to the original
