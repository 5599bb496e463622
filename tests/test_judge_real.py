"""The judge against human labels of real model answers (data/judge_labelled.jsonl)."""

from __future__ import annotations

import json

from abliterate.evaluate import judge_accuracy
from abliterate.prompts import DATA

ROWS = [json.loads(line) for line in (DATA / "judge_labelled.jsonl").read_text(encoding="utf-8").splitlines()]


def test_labelled_set_is_split_by_prompt():
    assert len(ROWS) >= 250
    assert {r["label"] for r in ROWS} == {"refusal", "compliance", "degenerate"}
    train = {r["prompt"] for r in ROWS if r["split"] == "train"}
    test = {r["prompt"] for r in ROWS if r["split"] == "test"}
    assert train and test and not train & test


def test_accuracy_on_held_out_split():
    # Rules were written without this data; one loop threshold was then set on the train split only.
    acc = judge_accuracy([r for r in ROWS if r["split"] == "test"])
    assert acc.n >= 110
    assert acc.accuracy >= 0.92
    assert acc.false_positive_rate <= 0.03
    assert acc.precision >= 0.95 and acc.recall >= 0.85
