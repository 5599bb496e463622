"""--load-in-4bit: refused with one clear line where it cannot work; on CUDA the edit lands on full-precision weights."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import FAST, run_cli
from safetensors.torch import load_file

from abliterate import cli
from abliterate import model as M
from abliterate.errors import AbliterateError
from abliterate.settings import LoadOptions

has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None


def test_cli_refuses_4bit_on_cpu_before_loading(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ABLITERATE_CACHE", str(cache))
    out = tmp_path / "run"
    code = cli.main(["run", str(tiny_checkpoint), "--out", str(out), *FAST, "--device", "cpu", "--load-in-4bit"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "--load-in-4bit needs a CUDA GPU" in err and "'cpu'" in err, err
    assert not out.exists() and not cache.exists()  # refused before any model, cache or output work
    assert not list(tmp_path.glob(".*"))  # no staging folder left beside --out


def test_env_setting_is_refused_the_same_way(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("ABLITERATE_LOAD_IN_4BIT", "1")
    code = cli.main(["run", str(tiny_checkpoint), "--out", str(tmp_path / "run"), *FAST, "--device", "cpu"])
    assert code == 2 and "--load-in-4bit needs a CUDA GPU" in capsys.readouterr().err


def test_load_checks_before_resolving_the_model():
    # A missing model would be a different error: the 4-bit check comes first.
    with pytest.raises(AbliterateError, match="needs a CUDA GPU .* 'mps'"):
        M.load("/no/such/model", LoadOptions(device="mps"), load_in_4bit=True)


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(AbliterateError, match=r"needs bitsandbytes; install it with pip install 'abliterate\[quant\]'"):
        M.check_4bit("cuda")
    with pytest.raises(AbliterateError, match="needs a CUDA GPU"):
        M.check_4bit("cpu")  # the device is checked first: the fix there is not to install anything


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not has_bitsandbytes, reason="needs bitsandbytes (pip install 'abliterate[quant]')")
def test_4bit_run_edits_full_precision_weights(tmp_path, tiny_checkpoint):
    from helpers import check_run_folder

    out = tmp_path / "run"
    args = ["run", str(tiny_checkpoint), "--out", str(out), *FAST, "--device", "cuda", "--dtype", "float32"]
    r = run_cli(*args, "--load-in-4bit", env={"ABLITERATE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reloading" in r.stderr and "full precision" in r.stderr
    # The saved model equals the float32 original under the recorded edit, and holds no component along it.
    record, _ = check_run_folder(out, tiny_checkpoint)
    assert record["settings"]["load_in_4bit"] is True
    saved = load_file(str(out / "model.safetensors"))
    source = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in source.items()}
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_4bit_load_asks_transformers_for_bitsandbytes_nf4_on_the_device(tiny_checkpoint, monkeypatch):
    """Without a GPU here, check what load() asks of transformers; the GPU test below runs it for real."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def fake_from_pretrained(where, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(M, "check_4bit", lambda device: None)
    monkeypatch.setattr(M, "pick_device", lambda device: device)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(AbliterateError, match="stop here"):
        M.load(str(tiny_checkpoint), LoadOptions(device="cuda"), load_in_4bit=True)
    quant = seen["quantization_config"]
    assert quant.load_in_4bit and not quant.load_in_8bit and quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["device_map"] == {"": "cuda"}
