"""`abliterate benchmark`: a one-line install hint without lm-eval; the side-by-side table with a fake lm-eval."""

from __future__ import annotations

import json
import sys
import types

import pytest

from abliterate import cli
from abliterate.evaluation import benchmark
from abliterate.tiny import save_tiny_checkpoint


def test_missing_lm_eval_is_one_line(monkeypatch, capsys, tiny_checkpoint, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    out = tmp_path / "b.json"
    assert cli.main(["benchmark", str(tiny_checkpoint), "--tasks", "arc_easy", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["abliterate: error: lm-evaluation-harness is not installed; pip install 'abliterate[benchmark]'"]
    assert not out.exists()


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """An lm_eval stand-in whose scores depend on which model HFLM wrapped; records what it was given."""
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model, self.tokenizer, self.batch_size = pretrained, tokenizer, batch_size

    def simple_evaluate(model, tasks, limit):
        calls.append({"model": model, "tasks": tasks, "limit": limit})
        # The baseline is loaded first; give it, and then the model, different accuracies.
        acc = 0.6 if len(calls) == 1 else 0.45
        results = {
            "arc_easy": {"alias": "arc_easy", "acc,none": acc, "acc_stderr,none": 0.05, "acc_norm,none": acc + 0.1,
                         "acc_norm_stderr,none": "N/A"},
            "lambada": {"alias": "lambada", "perplexity,none": 10.0 / acc, "acc,none": acc},
        }  # fmt: skip
        return {"results": {t: results[t] for t in tasks}, "config": {}}

    package = types.ModuleType("lm_eval")
    package.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    for name, module in (("lm_eval", package), ("lm_eval.models", models), ("lm_eval.models.huggingface", huggingface)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_side_by_side_table(fake_lm_eval, tmp_path, tiny_checkpoint):
    edited = save_tiny_checkpoint(tmp_path / "edited", seed=1)
    out = tmp_path / "bench.json"
    argv = ["benchmark", str(edited), "--baseline", str(tiny_checkpoint), "--tasks", "arc_easy, lambada"]
    assert cli.main([*argv, "--limit", "5", "--out", str(out)]) == 0
    assert [c["tasks"] for c in fake_lm_eval] == [["arc_easy", "lambada"]] * 2
    assert all(c["limit"] == 5 for c in fake_lm_eval)
    wrapped = [c["model"] for c in fake_lm_eval]
    assert wrapped[0].model is not wrapped[1].model and wrapped[0].tokenizer.padding_side == "left"
    report = json.loads(out.read_text())
    rows = {(r["task"], r["metric"]): r for r in report["rows"]}
    assert set(rows) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("lambada", "acc"), ("lambada", "perplexity")}
    acc = rows[("arc_easy", "acc")]
    assert (acc["baseline"], acc["model"], acc["model_stderr"]) == (0.6, 0.45, 0.05)
    assert acc["difference"] == pytest.approx(-0.15)
    assert rows[("arc_easy", "acc_norm")]["model_stderr"] is None  # lm-eval's "N/A"
    assert rows[("lambada", "perplexity")]["difference"] == pytest.approx(10 / 0.45 - 10 / 0.6)
    md = out.with_suffix(".md").read_text()
    assert "| arc_easy | acc | 0.6000 ± 0.0500 | 0.4500 ± 0.0500 | -0.1500 |" in md
    assert "--limit" in md


def test_single_model_table_and_bad_arguments(fake_lm_eval, tiny_checkpoint):
    rows = benchmark.side_by_side(None, {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "x"}})
    assert rows == [{"task": "arc_easy", "metric": "acc", "model": 0.5, "model_stderr": 0.1}]
    with pytest.raises(benchmark.AbliterateError, match="no tasks"):
        benchmark.run(str(tiny_checkpoint), None, [])
    with pytest.raises(benchmark.AbliterateError, match="neither a local path"):
        benchmark.run("./missing-folder", None, ["arc_easy"])
    assert fake_lm_eval == []  # nothing was evaluated
