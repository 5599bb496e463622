"""`abliterate evaluate`: a report with intervals, paired tests, KL and perplexity; clean failures."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from abliterate import cli
from abliterate.architectures import architecture_for
from abliterate.edit import orthogonalize, unit
from abliterate.evaluation import damage
from abliterate.tiny import recorded_edit, save_tiny_checkpoint

FAST = ["--n-test", "4", "--max-new-tokens", "8", "--kl-tokens", "4", "--batch-size", "4", "--samples", "2"]
RATES = ("harmful_refusal", "harmful_degenerate", "benign_refusal", "benign_degenerate")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny original and an orthogonalized copy of it, saved as ordinary HF folders."""
    root = tmp_path_factory.mktemp("evaluate")
    base = save_tiny_checkpoint(root / "base")
    net = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    r = unit(torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    orthogonalize(net, architecture_for(net), r)
    edited = root / "edited"
    net.save_pretrained(edited)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, edited / f.name)
    return base, edited


@pytest.fixture(autouse=True)
def few_paragraphs(monkeypatch):
    """Four perplexity paragraphs instead of sixty: byte-level tiny tokenizers make them long."""
    texts = damage.harmless_text()[:4]
    monkeypatch.setattr(damage, "harmless_text", lambda: texts)


def evaluate(*args):
    return cli.main(["evaluate", *map(str, args), *FAST])


def check_interval(d: dict) -> None:
    assert 0 <= d["low"] <= d["high"] <= 1


def test_against_baseline_writes_json_and_markdown(tmp_path, checkpoints):
    base, edited = checkpoints
    out = tmp_path / "report.json"
    assert evaluate(edited, "--baseline", base, "--out", out) == 0
    report = json.loads(out.read_text())
    for key in ("model", "baseline", "settings", "prompts", "metrics", "samples", "answers"):
        assert key in report, key
    metrics = report["metrics"]
    for key in RATES:
        m = metrics[key]
        for side in ("before", "after"):
            check_interval(m[side])
            assert m[side]["low"] <= m[side]["value"] <= m[side]["high"] and m[side]["n"] == 4
        assert 0 <= m["p_value"] <= 1
        assert sum(b["n"] for b, _ in m["by_category"].values()) == 4  # every prompt in one category
    assert metrics["kl_first_token_harmless"]["value"] > 1e-5
    assert metrics["kl_answer_harmless"]["value"] > 1e-5 and metrics["kl_answer_harmless"]["n"] == 4
    assert 4 <= metrics["kl_answer_harmless"]["tokens"] <= 16  # at most --kl-tokens per prompt
    for key in ("perplexity_harmless_text", "perplexity_original_answers"):
        for side in ("before", "after"):
            assert 1 < metrics[key][side]["low"] <= metrics[key][side]["value"] <= metrics[key][side]["high"]
    first = report["answers"]["harmful"][0]  # the fields of a run's evaluation.json: before is the baseline
    assert len(report["answers"]["harmful"]) == 4 and {"before", "before_label", "after", "after_label"} <= set(first)
    assert len(report["samples"]["benign"]) == 2
    md = out.with_suffix(".md").read_text()
    assert "| metric | baseline | model | paired p |" in md
    assert "Per-token KL on the original's harmless answers" in md and "## By category" in md
    assert "## Sample answers" in md and "| baseline (" in md


def test_against_itself_costs_nothing(tmp_path, checkpoints):
    base, _ = checkpoints
    out = tmp_path / "same.json"
    assert evaluate(base, "--baseline", base, "--out", out) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["kl_first_token_harmless"]["value"] < 1e-6
    assert metrics["kl_answer_harmless"]["value"] < 1e-6
    assert all(metrics[key]["p_value"] == 1.0 for key in RATES)  # the same greedy answers
    ppl = metrics["perplexity_original_answers"]
    assert ppl["after"]["value"] == pytest.approx(ppl["before"]["value"], rel=1e-5)


def test_without_baseline_reports_rates_and_text_perplexity(tmp_path, checkpoints):
    _, edited = checkpoints
    out = tmp_path / "alone.json"
    assert evaluate(edited, "--out", out) == 0
    report = json.loads(out.read_text())
    assert report["baseline"] is None
    metrics = report["metrics"]
    for key in RATES:
        check_interval(metrics[key]["after"])
        assert metrics[key]["before"] is None and metrics[key]["p_value"] is None
    assert metrics["perplexity_harmless_text"]["after"]["value"] > 1
    assert metrics["perplexity_harmless_text"]["before"] is None
    assert not any(key.startswith("kl_") for key in metrics)
    assert "| metric | model |" in out.with_suffix(".md").read_text()


def test_bad_model_path_is_one_line_and_writes_nothing(tmp_path, capsys, checkpoints):
    base, _ = checkpoints
    out = tmp_path / "r.json"
    assert evaluate(tmp_path / "no" / "such", "--baseline", base, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a local path" in err[0]
    assert list(tmp_path.iterdir()) == []
    assert evaluate(base, "--out", tmp_path / "r.txt") == 2
    assert "must name a .json file" in capsys.readouterr().err
    out.write_text("{}")
    assert evaluate(base, "--out", out) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "{}"


def recorded_run(folder, model, settings):
    """A run folder as `abliterate run` leaves it: the model plus the split record of these settings."""
    from abliterate.output.record import load_record, split_record, write_record
    from abliterate.pipeline import load_prompt_sets

    recorded_edit(folder / "edit", hidden=64)  # a record as a run writes it, given this run's split
    record = load_record(folder / "edit")
    shutil.copytree(model, folder, dirs_exist_ok=True)
    splits = load_prompt_sets(settings)
    write_record(folder, replace(record, split=split_record(settings, splits)))
    return splits


def test_a_run_folder_is_evaluated_on_the_prompts_that_run_held_out(tmp_path, checkpoints, monkeypatch):
    from abliterate.settings import Settings

    _, edited = checkpoints
    own = tmp_path / "own_harmful.txt"
    own.write_text("\n".join(f"Explain how to pick lock number {i} without a key." for i in range(40)))
    monkeypatch.chdir(tmp_path)  # the record keeps the file's absolute path: evaluate runs from anywhere
    settings = Settings(harmful="own_harmful.txt", n_train=10, n_val=5, n_test=6, seed=3)
    splits = recorded_run(tmp_path / "run", edited, settings)
    monkeypatch.chdir(tmp_path / "run")
    out = tmp_path / "report.json"
    assert evaluate(tmp_path / "run", "--out", out) == 0  # FAST asks --n-test 4: the recorded 6 win
    report = json.loads(out.read_text())
    assert report["split_from"] == str(tmp_path / "run" / "abliteration.json")
    for key in ("harmful", "benign", "harmless"):
        assert report["prompts"][key]["sha256"] == splits[key].test.sha256, key
        assert report["prompts"][key]["n"] == 6
    asked = {row["prompt"] for row in report["answers"]["harmful"]}
    assert asked == set(splits["harmful"].test.texts)
    assert not asked & set(splits["harmful"].train.texts + splits["harmful"].val.texts)


def test_a_no_eval_run_is_evaluated_on_prompts_it_never_saw(tmp_path, checkpoints):
    from abliterate.settings import Settings

    _, edited = checkpoints
    settings = Settings(n_train=20, n_val=7, no_eval=True, seed=5)
    splits = recorded_run(tmp_path / "run", edited, settings)
    out = tmp_path / "report.json"
    assert evaluate("--split-from", tmp_path / "run", edited, "--out", out) == 0
    report = json.loads(out.read_text())
    seen = set(splits["harmful"].train.texts + splits["harmful"].val.texts)
    asked = [row["prompt"] for row in report["answers"]["harmful"]]
    assert len(asked) == 4 and not set(asked) & seen


def test_a_changed_prompt_file_is_refused(tmp_path, checkpoints, capsys):
    from abliterate.settings import Settings

    _, edited = checkpoints
    own = tmp_path / "own.txt"
    own.write_text("\n".join(f"Describe a risky stunt number {i}." for i in range(30)))
    recorded_run(tmp_path / "run", edited, Settings(harmful=str(own), n_train=10, n_val=5, n_test=5))
    own.write_text("\n".join(f"Describe a risky stunt number {i}." for i in range(1, 31)))
    assert evaluate(tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the file the run split" in err and "--harmful" in err
