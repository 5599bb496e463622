"""Running means: padding must not leak in, and batch size must not matter."""

from __future__ import annotations

import pytest
import torch

from abliterate.architectures import architecture_for
from abliterate.capture import collect
from abliterate.directions import difference_of_means
from abliterate.errors import AbliterateError
from abliterate.tiny import tiny_model, tiny_tokenizer

TEXTS = [
    "<|user|>hi<|end|><|assistant|>",
    "<|user|>a much longer prompt that needs lots of padding in a batch<|end|><|assistant|>",
    "<|user|>medium sized prompt here<|end|><|assistant|>",
    "<|user|>x<|end|><|assistant|>",
    "<|user|>another one of a different length, to mix things up<|end|><|assistant|>",
]


def test_batched_means_equal_one_at_a_time():
    model, tok = tiny_model("llama", dtype=torch.float64), tiny_tokenizer()
    tok.padding_side = "left"
    arch = architecture_for(model)
    one = collect(model, tok, arch, TEXTS, batch_size=1, positions=3)
    batched = collect(model, tok, arch, TEXTS, batch_size=5, positions=3)
    assert one.count == batched.count == len(TEXTS)
    assert one.sums.shape == (3, 4, 64)  # 3 layers: 3 inputs + the last output
    torch.testing.assert_close(batched.mean, one.mean, rtol=1e-9, atol=1e-10)
    # and the means are really means of the prompts, not constant: prompts differ at position 1
    assert one.mean[1].abs().sum() > 0


def test_means_depend_on_content_and_difference_is_unit():
    model, tok = tiny_model("qwen2", dtype=torch.float64), tiny_tokenizer()
    tok.padding_side = "left"
    arch = architecture_for(model)
    a = collect(model, tok, arch, TEXTS[:2], batch_size=2)
    b = collect(model, tok, arch, TEXTS[2:], batch_size=2)
    cands = difference_of_means(a, b)
    norms = cands.directions.norm(dim=-1)
    # Layer 0 input is the embedding of the shared last token: no difference there.
    assert cands.diffs[0, 0].abs().max() == 0
    torch.testing.assert_close(norms[0, 1:], torch.ones(3, dtype=torch.float64))
    projected = difference_of_means(a, b, project_harmless_mean=True)
    base = b.mean / b.mean.norm(dim=-1, keepdim=True)
    assert (projected.directions[0, 1:] * base[0, 1:]).sum(-1).abs().max() < 1e-10


def test_long_prompts_are_cut_from_the_left():
    from abliterate.model import encode, limit_prompt_length

    model, tok = tiny_model("llama", dtype=torch.float64, max_position_embeddings=64), tiny_tokenizer()
    tok.padding_side, tok.truncation_side = "left", "left"
    long_prompt = "<|user|>" + "word " * 100 + "<|end|><|assistant|>"
    limited, too_long = limit_prompt_length(tok, model, [long_prompt, TEXTS[0]], reserve=16)
    assert too_long == 1 and limited.model_max_length == 48
    assert tok.model_max_length != 48  # the loaded tokenizer, saved with the model, keeps its context
    batch = encode(limited, [long_prompt, TEXTS[0]], "cpu")
    assert batch["input_ids"].shape[1] == 48
    assert limited.decode(batch["input_ids"][0, -2:]) == "<|end|><|assistant|>"  # the answer still starts right
    model(**batch)  # and fits the model's positions


def test_positions_beyond_a_short_prompt_average_no_padding():
    # A 4-token prompt batched with a long one, 8 positions: each position's mean must be over the
    # prompts that reach it, computed here one prompt at a time (no padding at all).
    model, tok = tiny_model("llama", dtype=torch.float64), tiny_tokenizer()
    tok.padding_side = "left"
    arch = architecture_for(model)
    short, long = TEXTS[3], TEXTS[1]
    n_short = len(tok(short, add_special_tokens=False).input_ids)
    assert n_short == 4
    means = collect(model, tok, arch, [short, long], batch_size=2, positions=8)
    assert means.count == 2 and means.position_counts.tolist() == [2] * 4 + [1] * 4
    states = {}
    for text in (short, long):
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [l] = input of layer l
        states[text] = torch.stack(hidden[:-1], 0)[:, 0].flip(1)  # (layers, tokens newest first, hidden)
    for p in range(8):
        reach = [t for t in (short, long) if states[t].shape[1] > p]
        want = sum(states[t][:, p] for t in reach) / len(reach)
        torch.testing.assert_close(means.mean[p, :-1], want, rtol=1e-9, atol=1e-10)


def test_positions_beyond_every_prompt_is_a_clear_error():
    model, tok = tiny_model("llama", dtype=torch.float64), tiny_tokenizer()
    tok.padding_side = "left"
    with pytest.raises(AbliterateError, match="--positions 40 reaches past the longest prompt"):
        collect(model, tok, architecture_for(model), [TEXTS[0], TEXTS[3]], batch_size=2, positions=40)


def test_kept_last_token_activations_are_each_prompts_own_and_average_to_the_means():
    model, tok = tiny_model("qwen2", dtype=torch.float64), tiny_tokenizer()
    tok.padding_side = "left"
    arch = architecture_for(model)
    kept = collect(model, tok, arch, TEXTS, batch_size=2, positions=2, keep_last_token=True)
    assert kept.last_token is not None and kept.last_token.shape == (len(TEXTS), 4, 64)
    assert kept.last_token.dtype == torch.float32
    torch.testing.assert_close(kept.last_token.double().mean(0), kept.mean[0], rtol=1e-5, atol=1e-6)
    alone = collect(model, tok, arch, TEXTS[1:2], batch_size=1, keep_last_token=True).last_token
    assert any(torch.allclose(row, alone[0], atol=1e-5) for row in kept.last_token)  # padding changed nothing
    assert collect(model, tok, arch, TEXTS, batch_size=2).last_token is None  # only where asked for
    harmful = collect(model, tok, arch, TEXTS[:3], batch_size=2, keep_last_token=True)
    harmless = collect(model, tok, arch, TEXTS[3:], batch_size=2)
    spread = difference_of_means(harmful, harmless).spread
    assert spread is not None and spread.shape == (3, 4, 64)
    torch.testing.assert_close(spread.double().mean(0), (harmful.mean - harmless.mean)[0], rtol=1e-5, atol=1e-5)
