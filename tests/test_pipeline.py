"""A whole run on a tiny saved model: every artifact exists, reloads and holds the edit."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import VOCAB
from safetensors.torch import load_file
from test_cli import FAST, run_cli
from test_edit import residual_streams
from test_stream import all_tensors

from abliterate.architectures import architecture_for
from abliterate.edit import EditParams, ablation
from abliterate.tiny import recorded_edit

WRITER = re.compile(r"model\.layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$")


def check_saved_weights(out, original_folder, record, direction):
    """Every saved tensor against a float64 recomputation, written out here, of the recorded edit of the original.

    For a pre-norm llama-style model at scale s from layer `start`: each writer's output (o_proj and
    down_proj rows, their biases) loses s times its component along r, so r.W' = (1 - s) r.W; the
    embedding rows likewise when start is 0; every other tensor, writers before `start` included, is
    unchanged, and a head that was tied to the embedding keeps the original embedding.
    """
    assert not record["edit"].get("norm_preserving"), "a norm-preserving edit has its own checks"
    r = direction.double() / direction.double().norm()
    s, start = record["edit"]["scale"], record["edit"]["start_layer"]
    original, saved = all_tensors(original_folder), all_tensors(out)
    if "lm_head.weight" in saved and "lm_head.weight" not in original:  # tied in the original: saved untied
        original["lm_head.weight"] = original["model.embed_tokens.weight"]
    assert saved.keys() == original.keys()
    edited = set()
    for name, w in original.items():
        w64, writer = w.double(), WRITER.match(name)
        if name == "model.embed_tokens.weight" and start == 0:
            expected = w64 - s * torch.outer(w64 @ r, r)
        elif writer and int(writer[1]) >= start and name.endswith("weight"):
            expected = w64 - s * torch.outer(r, r @ w64)
        elif writer and int(writer[1]) >= start:
            expected = w64 - s * (r @ w64) * r
        else:
            assert torch.equal(saved[name], w), f"{name} is not edited yet changed"
            continue
        edited.add(name)
        got = saved[name].double()
        tol = 4 * torch.finfo(saved[name].dtype).eps * w64.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
        assert not torch.equal(saved[name], w), f"{name} should be edited"
        # the component the edit leaves along r: exactly (1 - s) times the original's
        axis = -1 if name.startswith("model.embed_tokens") else 0
        left, before = (got.movedim(axis, -1) @ r), (w64.movedim(axis, -1) @ r)
        torch.testing.assert_close(left, (1 - s) * before, rtol=0, atol=tol * r.numel() ** 0.5)
    assert edited == set(record["edit"]["edited_tensors"]), "the record lists other tensors than were edited"
    assert any(int(WRITER.match(n)[1]) == start for n in edited if WRITER.match(n))  # start_layer is edited


def check_run_folder(out, original_folder, direction_tolerance=1e-4):
    """Shared checks for a finished run folder; returns (record, reloaded model).

    The saved model must reproduce the original model under ablation hooks with the recorded
    direction and edit parameters, and its weights an independent recomputation of the edit at the
    chosen strength (check_saved_weights); a full ablation must also leave no component along the
    direction in any layer's input.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "abliteration.json", "directions.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    record = json.loads((out / "abliteration.json").read_text())
    for key in ("model", "prompts", "settings", "selection", "edit", "metrics", "versions", "refusal_tokens", "seed",
                "split"):  # fmt: skip
        assert key in record, key
    for key in ("harmful", "harmless", "benign"):  # what `abliterate evaluate` rebuilds the held-out prompts from
        assert record["split"]["sha256"][key] == {
            p: record["prompts"][key][p]["sha256"] for p in ("train", "val", "test")
        }
    assert len(record["prompts"]["harmful"]["train"]["sha256"]) == 64
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "\ntags:\n" in card
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    direction = load_file(str(out / "directions.safetensors"))["direction"].double()
    assert abs(direction.norm().item() - 1) < 1e-5
    params = EditParams(record["edit"]["scale"], record["edit"]["start_layer"])
    ids = torch.randint(3, min(VOCAB, reloaded.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(original_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        edited_logits = reloaded(input_ids=ids).logits
        original_logits = original(input_ids=ids).logits
        with ablation(original, architecture_for(original), direction, params):
            hooked_logits = original(input_ids=ids).logits
    assert (edited_logits - original_logits).abs().max() > 1e-3  # the saved model really is edited
    torch.testing.assert_close(edited_logits, hooked_logits, rtol=1e-3, atol=1e-3)
    check_saved_weights(out, original_folder, record, direction)
    if params == EditParams():
        with torch.no_grad():
            streams = residual_streams(reloaded, architecture_for(reloaded), ids)
        for h in streams:
            rel = (h.double() @ direction).abs() / h.double().norm(dim=-1)
            assert rel.max() < direction_tolerance
    return record, reloaded


def test_tiny_run_end_to_end(tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, env={"ABLITERATE_CACHE": str(tmp_path / "c1")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "before / after" in r.stderr and "candidate directions" in r.stderr
    record, _ = check_run_folder(out, tiny_checkpoint)
    assert record["model"]["kind"] == "folder"
    assert record["settings"]["n_train"] == 8
    metrics = record["metrics"]
    assert metrics["harmful_refusal"]["before"]["n"] == 4
    assert metrics["kl_first_token_harmless"]["n"] == 4
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert len(evaluation["harmful"]) == 4 and {"before", "after", "before_label"} <= set(evaluation["harmful"][0])
    # The same seed, with an empty cache, chooses the same direction and writes bit-identical weights.
    again = tmp_path / "again"
    r = run_cli(
        "run",
        str(tiny_checkpoint),
        "--out",
        str(again),
        *FAST,
        "--no-eval",
        env={"ABLITERATE_CACHE": str(tmp_path / "c2")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stderr
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # A rerun with the same cache resumes the collect and select stages and gives the same weights.
    third = tmp_path / "third"
    r = run_cli(
        "run",
        str(tiny_checkpoint),
        "--out",
        str(third),
        *FAST,
        "--no-eval",
        env={"ABLITERATE_CACHE": str(tmp_path / "c2")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "collect residual means: resumed" in r.stderr and "selection: resumed" in r.stderr
    assert (third / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((third / "abliteration.json").read_text())["selection"] == record["selection"]


def test_apply_reproduces_a_run_bit_for_bit(tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval", "--layer", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    applied = tmp_path / "applied"
    r = run_cli("apply", str(tiny_checkpoint), "--edit", str(out / "abliteration.json"), "--out", str(applied))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (applied / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert "re-applied" in (applied / "README.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = run_cli("apply", str(tiny_checkpoint), "--edit", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "not a usable abliteration record" in r.stderr and not (tmp_path / "x").exists()


def test_norm_preserving_run_saves_lengths_and_reapplies(tmp_path, tiny_checkpoint):
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval", "--layer", "1", "--norm-preserving")
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "abliteration.json").read_text())
    assert record["edit"]["norm_preserving"] is True and record["settings"]["norm_preserving"] is True
    card = (out / "README.md").read_text()
    assert "norm-preserving: every vector" in card and "--layer 1 --seed 0 --norm-preserving" in card
    saved, source = load_file(str(out / "model.safetensors")), load_file(str(tiny_checkpoint / "model.safetensors"))
    direction = load_file(str(out / "directions.safetensors"))["direction"].double()
    for name in record["edit"]["edited_tensors"]:
        axis = 1 if "embed" in name else 0  # llama: embedding rows, Linear columns
        new, old = saved[name].double(), source[name].double()
        torch.testing.assert_close(new.norm(dim=axis), old.norm(dim=axis), rtol=1e-6, atol=1e-7)  # float32 storage
        if record["edit"]["scale"] == 1.0 and "layernorm" not in name:
            u = direction / direction.norm()
            assert torch.tensordot(new, u, dims=([axis], [0])).abs().max() < 1e-4
    assert not torch.equal(saved[record["edit"]["edited_tensors"][-1]], source[record["edit"]["edited_tensors"][-1]])
    # apply (streamed, shard by shard) re-applies it bit for bit; an adapter cannot express it.
    r = run_cli(
        "apply", str(tiny_checkpoint), "--edit", str(out / "abliteration.json"), "--out", str(tmp_path / "again")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    r = run_cli("export-adapter", str(out), "--base", str(tiny_checkpoint), "--out", str(tmp_path / "lora"))
    assert r.returncode == 2 and "norm-preserving" in r.stderr and not (tmp_path / "lora").exists()


def test_induce_strengthens_the_direction(tmp_path, tiny_checkpoint):
    out = tmp_path / "induced"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval", "--induce", "--max-kl", "100")
    assert r.returncode == 0, r.stderr[-3000:]
    record, _ = check_run_folder(out, tiny_checkpoint)  # the saved model equals the original under induction hooks
    assert record["edit"]["kind"] == "induce" and record["edit"]["scale"] < 0
    assert record["settings"]["induce"] is True
    card = (out / "README.md").read_text()
    assert "refusal-induced" in card and "amplified in" in card
    assert "refuse more of everything" in card and "removes a safeguard" not in card
    assert " --induce" in card and "--norm-preserving" not in card


def test_in_memory_apply_saves_in_the_checkpoints_own_dtype(tmp_path, tiny_checkpoint):
    from conftest import save_tiny_checkpoint

    bf16 = save_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    run = tmp_path / "run"
    r = run_cli("run", str(tiny_checkpoint), "--out", str(run), *FAST, "--no-eval", "--layer", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "applied"
    r = run_cli(
        "apply", str(bf16), "--edit", str(run / "abliteration.json"), "--out", str(out), "--in-memory",
        "--dtype", "float32",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # --dtype float32 asks for float32 compute and output; the default keeps the source's bfloat16.
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    out2 = tmp_path / "applied2"
    r = run_cli("apply", str(bf16), "--edit", str(run / "abliteration.json"), "--out", str(out2), "--in-memory")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {t.dtype for t in load_file(str(out2 / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out2 / "config.json").read_text())["dtype"] == "bfloat16"


def test_saved_weight_check_holds_a_partial_edit_and_catches_a_wrong_one(tmp_path, tiny_checkpoint):
    # A partial edit from layer 1 (the case the full-strength residual check never saw): the check passes
    # on what apply saved, and fails once the record claims another strength or start layer.
    edit = recorded_edit(tmp_path / "edit", 64, scale=0.6, start_layer=1)
    out = tmp_path / "applied"
    r = run_cli("apply", str(tiny_checkpoint), "--edit", str(edit), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "abliteration.json").read_text())
    direction = load_file(str(out / "directions.safetensors"))["direction"]
    check_saved_weights(out, tiny_checkpoint, record, direction)
    for wrong in ({"scale": 1.0}, {"start_layer": 0}, {"start_layer": 2}):
        with pytest.raises(AssertionError):
            check_saved_weights(out, tiny_checkpoint, {**record, "edit": {**record["edit"], **wrong}}, direction)
