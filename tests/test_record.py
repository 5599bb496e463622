"""abliteration.json has one owner: RunRecord, written by write_record and read (validated) by load_record."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

from abliterate.errors import AbliterateError
from abliterate.evaluation.metrics import Metrics
from abliterate.model import ModelSource
from abliterate.output.record import RECORD, SCHEMA, base_model, load_record, read_edit, write_record
from abliterate.tiny import recorded_edit

PKG = Path(__file__).resolve().parents[1] / "src" / "abliterate"


def test_a_record_survives_the_file_and_carries_its_schema(tmp_path):
    file = recorded_edit(tmp_path / "run", hidden=64, scale=0.5, start_layer=1)
    data = json.loads(file.read_text())
    assert data["schema"] == SCHEMA and list(data)[0] == "schema"
    rec = load_record(file.parent)
    assert rec == load_record(file)  # the folder or the file
    assert (rec.edit.params.scale, rec.edit.params.start_layer, rec.induce) == (0.5, 1, False)
    assert rec.metrics is None and data["metrics"] == {}  # --no-eval: no metrics, and the file says so
    metrics = Metrics.from_dict({})
    assert metrics is None
    again = tmp_path / "again"
    again.mkdir()
    write_record(again, replace(rec, applied_to={"source": "x", "sha256": None}))
    assert load_record(again).applied_to == {"source": "x", "sha256": None}
    assert read_edit(file).direction.shape == (64,)


def test_older_newer_and_broken_records(tmp_path):
    file = recorded_edit(tmp_path / "run", hidden=64)
    data = json.loads(file.read_text())
    del data["schema"]  # version 1: the files written before the schema was recorded
    file.write_text(json.dumps(data))
    assert load_record(file).schema == SCHEMA
    file.write_text(json.dumps({**data, "schema": SCHEMA + 1}))
    with pytest.raises(AbliterateError, match="newer than this abliterate reads.*upgrade abliterate"):
        load_record(file)
    file.write_text(json.dumps({k: v for k, v in data.items() if k != "edit"}))
    with pytest.raises(AbliterateError, match="no edit"):
        load_record(file)
    file.write_text(json.dumps({**data, "edit": {"kind": "orthogonalize"}}))  # no scale
    with pytest.raises(AbliterateError, match="not a usable run record"):
        load_record(file)
    file.write_text(json.dumps({**data, "edit": {**data["edit"], "kind": "rotate"}}))
    with pytest.raises(AbliterateError, match="unknown edit kind 'rotate'"):
        load_record(file)
    with pytest.raises(AbliterateError, match=f"has no {RECORD}"):
        load_record(tmp_path)


def test_a_folder_we_wrote_names_its_base_model_from_the_record(tmp_path):
    file = recorded_edit(tmp_path / "run", hidden=64)
    data = json.loads(file.read_text())
    data["model"]["base_model"] = "owner/original"
    file.write_text(json.dumps(data))
    (file.parent / "config.json").write_text(json.dumps({"_name_or_path": "other/name"}))
    assert base_model(ModelSource("run", "folder", file.parent)) == "owner/original"
    assert base_model(ModelSource("owner/x", "hub", base_model="owner/x")) == "owner/x"


def test_no_module_but_the_record_opens_abliteration_json_by_name():
    """Every reader goes through load_record: a path built from the file name appears nowhere else."""
    allowed = {PKG / "output" / "record.py", PKG / "files.py"}  # files: the leaf's 'is this ours?' check
    for path in PKG.rglob("*.py"):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                right = node.right
                assert not (isinstance(right, ast.Constant) and right.value == RECORD), f"{path.name} builds {RECORD}"
