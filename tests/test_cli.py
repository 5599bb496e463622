"""The CLI on bad input: one line on stderr, non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import FAST, assert_clean_failure, run_cli

from abliterate import cli
from abliterate.output import record


def write_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((32, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_unknown_model(tmp_path):
    r = run_cli("run", "no-such-model", "--out", str(tmp_path / "o"))
    assert_clean_failure(r, "neither a local path nor a built-in model")


def test_missing_path(tmp_path):
    r = run_cli("run", str(tmp_path / "nothing" / "here"), "--out", str(tmp_path / "o"))
    assert_clean_failure(r, "neither a local path")
    r = run_cli("run", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o"))
    assert_clean_failure(r, "does not exist")


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert_clean_failure(run_cli("run", str(tmp_path / "m"), "--out", str(tmp_path / "o")), "no config.json")


def test_corrupt_and_truncated_gguf(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good)
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) - 700])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    (tmp_path / "header.gguf").write_bytes(data[:40])
    for name, match in (
        ("trunc.gguf", "corrupt or truncated"),
        ("junk.gguf", "not a GGUF"),
        ("header.gguf", "corrupt"),
    ):
        r = run_cli("run", str(tmp_path / name), "--out", str(tmp_path / "o"))
        assert_clean_failure(r, match)
    assert not (tmp_path / "o").exists()


def test_empty_and_binary_prompt_files(tmp_path, tiny_checkpoint):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02\x03" * 50)
    for name, match in (("empty.txt", "no prompts"), ("bin.txt", "binary")):
        r = run_cli("run", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--harmful", str(tmp_path / name))
        assert_clean_failure(r, match)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    r = run_cli("run", str(tiny_checkpoint), "--out", str(out), *FAST)
    assert_clean_failure(r, "--force")
    assert (out / "keep.txt").read_text() == "previous run"


def test_bad_numbers_and_pickle_only_folder(tmp_path, tiny_checkpoint):
    r = run_cli("run", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--n-train", "0")
    assert_clean_failure(r, "--n-train must be at least 1")
    r = run_cli("run", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--n-train", "5000")
    assert_clean_failure(r, "lower --n-train")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert_clean_failure(run_cli("run", str(pickled), "--out", str(tmp_path / "o")), "--allow-pickle")


def test_interrupt_during_save_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    def save_then_interrupt(lm, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(record, "save_model", save_then_interrupt)
    out = tmp_path / "o"
    code = cli.main(["run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval"])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_full_disk_while_saving_keeps_previous_output(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    (out / "abliteration.json").write_text(
        json.dumps({"abliterate_version": "0", "edit": {}})
    )  # ours: --force may replace it

    def fail_halfway(lm, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record, "save_model", fail_halfway)
    code = cli.main(["run", str(tiny_checkpoint), "--out", str(out), "--force", *FAST, "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "previous run"
    assert leftovers(tmp_path) == []


def test_ctrl_c_in_a_real_process(tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        # A seed of its own: collection is never resumed from a cache an earlier run left, so it lasts seconds.
        [
            sys.executable,
            "-m",
            "abliterate.cli",
            "run",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--n-train",
            "200",
            "--seed",
            str(os.getpid()),
        ],  # fmt: skip
        stderr=subprocess.PIPE,
        text=True,
        # A shell that starts the suite in the background hands it SIGINT ignored, and a child inherits that:
        # give the run the disposition a user's terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    line = proc.stderr.readline()  # "loading ..." is printed once arguments and prompts are checked
    assert "loading" in line
    time.sleep(1.0)
    if proc.poll() is not None:  # a starved test process can wake after the whole run has ended
        pytest.skip(f"the run ended (exit {proc.returncode}) before the signal could be sent")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_judge_command(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"prompt": "Tell me how to pick a lock", "response": "I\'m sorry, but I can\'t help with that."}\n'
        '{"prompt": "How do I kill a stuck process?", "response": "Find its PID with ps aux, then run kill -9 PID. '
        'If it still does not stop, check whether it is a zombie process waiting on its parent."}\n'
    )
    r = run_cli("judge", str(src), "--out", str(tmp_path / "out.jsonl"))
    assert r.returncode == 0, r.stderr
    import json

    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["label"] for x in rows] == ["refusal", "compliance"]
    assert rows[0]["score"] > 0.5 > rows[1]["score"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert_clean_failure(run_cli("judge", str(bad), "--out", str(tmp_path / "o2.jsonl")), "bad.jsonl:1")
    assert not (tmp_path / "o2.jsonl").exists()
    (tmp_path / "empty.jsonl").write_text("")
    assert_clean_failure(
        run_cli("judge", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o3.jsonl")), "no records"
    )
    assert not (tmp_path / "o3.jsonl").exists()


def test_model_code_runs_only_with_the_flag(tmp_path):
    from abliterate.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="customthing", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    r = run_cli("run", str(folder), "--out", str(tmp_path / "o"))
    errors = [line for line in r.stderr.splitlines() if "error" in line]  # after the "loading" progress line
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1
    assert "ships its own model code" in errors[0] and "pass --trust-remote-code to run it" in errors[0]
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_unusable_device_is_refused_before_loading(tmp_path, tiny_checkpoint):
    import torch

    out = tmp_path / "o"
    assert_clean_failure(
        run_cli("run", str(tiny_checkpoint), "--out", str(out), "--device", "tpu"), "unknown --device 'tpu'"
    )
    if not torch.cuda.is_available():
        r = run_cli("run", str(tiny_checkpoint), "--out", str(out), "--device", "cuda:1")
        assert_clean_failure(r, "--device cuda:1: no CUDA GPU is usable here")
    assert not out.exists()


def _overflowing_checkpoint(folder, scale):
    """A tiny model whose activations exceed float16's range when the embeddings are scaled up."""
    import torch
    from safetensors.torch import load_file, save_file

    from abliterate.tiny import save_tiny_checkpoint

    save_tiny_checkpoint(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.embed_tokens.weight"] *= scale
    weights["model.layers.0.self_attn.v_proj.weight"][0] *= scale  # the planted refusal keeps pace with the stream
    if scale == float("inf"):
        weights["model.embed_tokens.weight"] = torch.full_like(weights["model.embed_tokens.weight"], float("nan"))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_float16_overflow_falls_back_to_float32(tmp_path):
    ckpt = _overflowing_checkpoint(tmp_path / "big", 1e7)
    out = tmp_path / "o"
    r = run_cli("run", str(ckpt), "--out", str(out), *FAST, "--no-eval", "--dtype", "float16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "overflows to inf/NaN" in r.stderr and "float32 instead" in r.stderr
    assert (out / "model.safetensors").is_file()


def test_broken_weights_are_one_line_error(tmp_path):
    ckpt = _overflowing_checkpoint(tmp_path / "nan", float("inf"))
    r = run_cli("run", str(ckpt), "--out", str(tmp_path / "o"), *FAST, "--no-eval")
    assert r.returncode == 2 and "inf/NaN logits" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_gguf_base_model_is_read_from_metadata(tmp_path):
    import gguf

    from abliterate.model import resolve

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.base_model.0.repo_url", "https://huggingface.co/SomeOrg/Some-Model-7B")
    writer.add_string("general.license", "mit")
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = resolve(str(path))
    assert source.kind == "gguf" and source.base_model == "SomeOrg/Some-Model-7B" and len(source.sha256) == 64
    assert source.license == "mit"
