"""Layer-streamed forward passes equal the in-memory ones, with never more than one decoder layer in memory."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DATA, FAST, run_cli
from safetensors.torch import load_file

from abliterate import capture, directions, forward, model, prompts
from abliterate.architectures import layers
from abliterate.edit import EditParams, Profile, ablation
from abliterate.errors import AbliterateError
from abliterate.evaluation import damage
from abliterate.selection import RefusalTokens, select_direction
from abliterate.settings import LoadOptions
from abliterate.tiny import save_tiny_checkpoint

CPU = LoadOptions(dtype="float32", device="cpu")
STREAMED = LoadOptions(dtype="float32", device="cpu", max_memory="1KB")
# Families whose layers differ in what they take: sliding-window masks (gemma3_text), fused experts loaded
# from per-expert checkpoint tensors (mixtral), gpt2's own module names.
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gemma3_text": {"sliding_window": 4},
    "mixtral": {},
    "phi3": {},
    "gpt2": {},
}


def _texts(tokenizer, name: str, n: int = 6) -> list[str]:
    lines = (DATA / f"tiny_{name}.txt").read_text().splitlines()[:n]
    return prompts.format_all(tokenizer, lines)


def _pair(folder):
    """The same checkpoint loaded whole and layer-streamed."""
    whole = model.load(str(folder), CPU, lambda _: None, streamable=True)
    streamed = model.load(str(folder), STREAMED, lambda _: None, streamable=True)
    assert forward.stream_of(whole.model) is None and forward.stream_of(streamed.model) is not None
    return whole, streamed


def _materialized(net, arch) -> int:
    return sum(any(p.ndim > 1 and not p.is_meta for p in layer.parameters()) for layer in layers(net, arch))


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_in_memory(tmp_path, monkeypatch, family):
    monkeypatch.setattr(forward, "HEAD_CHUNK", 4096)  # the head is read in chunks of 16 rows (of 320)
    folder = save_tiny_checkpoint(tmp_path / family, family, refuses=False, **FAMILIES[family])
    whole, streamed = _pair(folder)
    tok = whole.tokenizer
    texts = _texts(tok, "harmful", 4) + _texts(tok, "harmless", 4)
    # Neither the token embedding nor the head is ever whole in memory: rows are read as calls need them.
    for matrix in (streamed.model.get_input_embeddings(), streamed.model.get_output_embeddings()):
        assert matrix.weight.untyped_storage().nbytes() <= 8

    # Every layer, while it runs, is the only one whose matrices are in memory.
    peak = []
    for layer in layers(streamed.model, streamed.arch):
        layer.register_forward_pre_hook(lambda *_: peak.append(_materialized(streamed.model, streamed.arch)))

    # Residual means (collect): the capture hooks fire in the streamed sweep as in memory.
    a = capture.collect(whole.model, tok, whole.arch, texts, batch_size=4, positions=2)
    b = capture.collect(streamed.model, tok, streamed.arch, texts, batch_size=4, positions=2)
    assert torch.allclose(a.sums, b.sums, rtol=1e-5, atol=1e-5) and a.count == b.count

    # Last-token log-probs with a partial, profiled ablation hooked in (a search trial's measurement).
    direction = torch.randn(a.sums.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = EditParams(attention=Profile(0.8, 1.0, 1.5, 0.2), mlp=Profile(1.1, 0.5, 2.0), embeddings=True)
    with ablation(whole.model, whole.arch, direction, params):
        lp_whole = model.last_token_logprobs(whole.model, tok, texts, batch_size=4)
    loads = forward.stream_of(streamed.model).loads
    with ablation(streamed.model, streamed.arch, direction, params):
        lp_streamed = model.last_token_logprobs(streamed.model, tok, texts, batch_size=4)
    assert torch.allclose(lp_whole, lp_streamed, atol=1e-4)
    # Two batches went through the layers together: each layer was loaded once.
    assert forward.stream_of(streamed.model).loads - loads == len(layers(streamed.model, streamed.arch))

    # Greedy answers (a plain call per step, KV cache included) and teacher-forced KL / NLL on them.
    reference = damage.reference_answers(whole.model, tok, texts[:5], 6, batch_size=2)
    assert model.generate_ids(streamed.model, tok, texts[:5], 6, 2) == [
        (p, a) for p, a in zip(reference.prompt_ids, reference.answer_ids)
    ]
    with ablation(whole.model, whole.arch, direction):
        kl_whole, nll_whole = damage.score_answers(whole.model, reference, batch_size=2)
    with ablation(streamed.model, streamed.arch, direction):
        kl_streamed, nll_streamed = damage.score_answers(streamed.model, reference, batch_size=2)
    assert max(kl_whole[0]) > 1e-4  # the edit changes something the comparison could miss
    for x, y in zip(kl_whole, kl_streamed):
        assert x == pytest.approx(y, rel=1e-3, abs=1e-6)
    assert nll_whole == pytest.approx(nll_streamed, rel=1e-4)
    assert peak and max(peak) == 1
    assert _materialized(streamed.model, streamed.arch) == 0  # and nothing stays loaded after


def test_layers_returning_tuples_stream_too(tmp_path):
    # Bamba's decoder layers return (hidden, attention weights): the relays must hand on the same shape.
    small = dict(mamba_chunk_size=16, mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16)  # its defaults take seconds
    folder = save_tiny_checkpoint(tmp_path / "bamba", "bamba", refuses=False, **small)
    whole, streamed = _pair(folder)
    texts = _texts(whole.tokenizer, "harmful", 3) + _texts(whole.tokenizer, "harmless", 3)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = []
    for lm in (whole, streamed):
        with ablation(lm.model, lm.arch, direction, EditParams(0.7, 1)):
            out.append(model.last_token_logprobs(lm.model, lm.tokenizer, texts, batch_size=2))
    assert forward.stream_of(streamed.model).outputs == 2
    assert torch.allclose(out[0], out[1], atol=1e-4)


def test_hidden_state_budget_splits_the_sweeps(tiny_checkpoint, monkeypatch):
    whole, streamed = _pair(tiny_checkpoint)
    texts = _texts(whole.tokenizer, "harmful", 6)
    expected = model.last_token_logprobs(whole.model, whole.tokenizer, texts, batch_size=2)
    model.last_token_logprobs(streamed.model, streamed.tokenizer, texts[:1], batch_size=2)  # learns the layer output
    stream = forward.stream_of(streamed.model)
    n_layers = len(layers(streamed.model, streamed.arch))
    for budget, sweeps in ((2**30, 1), (1, 3)):  # all three batches in one sweep, or one sweep each
        monkeypatch.setattr(forward, "HIDDEN_BUDGET", budget)
        before = stream.loads
        got = model.last_token_logprobs(streamed.model, streamed.tokenizer, texts, batch_size=2)
        assert stream.loads - before == sweeps * n_layers
        assert torch.allclose(expected, got, atol=1e-5)


def test_streamed_selection_makes_the_same_choice(tmp_path, tiny_checkpoint):
    whole, streamed = _pair(tiny_checkpoint)
    tok = whole.tokenizer
    harmful, harmless = _texts(tok, "harmful", 12), _texts(tok, "harmless", 12)
    refusal = RefusalTokens(tuple(tok.convert_tokens_to_ids(["I"])), ("I",), 0, 0, 1.0)
    chosen = []
    for lm in (whole, streamed):
        means = [capture.collect(lm.model, tok, lm.arch, t[:8], batch_size=4) for t in (harmful, harmless)]
        candidates = directions.difference_of_means(*means)
        chosen.append(select_direction(lm.model, tok, lm.arch, candidates, harmful[8:], harmless[8:], refusal, 2))
    a, b = chosen
    assert (a.chosen.position, a.chosen.layer, a.chosen.params) == (b.chosen.position, b.chosen.layer, b.chosen.params)
    assert [s.refusal_ablated for s in a.scores] == pytest.approx([s.refusal_ablated for s in b.scores], abs=1e-4)
    assert a.chosen.kl == pytest.approx(b.chosen.kl, rel=1e-3, abs=1e-7)


def test_streamed_run_saves_what_the_in_memory_run_saves(tmp_path, tiny_checkpoint):
    outs = {}
    for name, flags in (("whole", []), ("streamed", ["--max-memory", "1KB"])):
        outs[name] = tmp_path / name
        r = run_cli("run", str(tiny_checkpoint), "--out", str(outs[name]), *FAST, "--no-eval", *flags,
                    env={"ABLITERATE_CACHE": str(tmp_path / f"cache-{name}")})  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert "layer-streamed" in r.stderr
    records = [json.loads((outs[n] / "abliteration.json").read_text()) for n in ("whole", "streamed")]
    assert records[0]["selection"]["layer"] == records[1]["selection"]["layer"]
    assert records[0]["edit"] == records[1]["edit"]
    saved = [load_file(str(outs[n] / "model.safetensors")) for n in ("whole", "streamed")]
    assert saved[0].keys() == saved[1].keys()
    for key, tensor in saved[0].items():
        assert torch.allclose(tensor, saved[1][key], atol=1e-6), key
    # Evaluation generates with the whole model, so a streamed run without --no-eval stops before any work.
    r = run_cli("run", str(tiny_checkpoint), "--out", str(tmp_path / "eval"), *FAST, "--max-memory", "1KB",
                env={"ABLITERATE_CACHE": str(tmp_path / "cache-eval")})  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--no-eval" in r.stderr.strip().splitlines()[-1] and not (tmp_path / "eval").exists()


def test_memory_limits_choose_the_path(tmp_path, tiny_checkpoint):
    assert forward.parse_size("6GB") == 6 * 10**9 and forward.parse_size("512MiB") == 512 * 2**20
    assert forward.parse_size("1.5g") == 1.5e9
    with pytest.raises(AbliterateError, match="not a size"):
        forward.parse_size("lots")
    size = forward.checkpoint_bytes(tiny_checkpoint, torch.float32)
    params = sum(t.numel() for t in load_file(str(tiny_checkpoint / "model.safetensors")).values())
    assert size == 4 * params
    assert forward.should_stream(tiny_checkpoint, str(size - 1), torch.float32, "cpu")
    assert not forward.should_stream(tiny_checkpoint, str(size), torch.float32, "cpu")
    assert not forward.should_stream(tiny_checkpoint, "auto", torch.float32, "cpu")  # a tiny model fits
    # Without `streamable` (chat, apply, evaluate) the model is always loaded whole.
    assert forward.stream_of(model.load(str(tiny_checkpoint), STREAMED, lambda _: None).model) is None
