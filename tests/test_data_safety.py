"""--force replaces only an empty folder or what abliterate itself wrote; everything else is refused, untouched."""

from __future__ import annotations

import json
import shutil

import pytest

from abliterate import cli, files, model
from abliterate.errors import AbliterateError
from abliterate.files import check_output
from abliterate.tiny import recorded_edit

FAST = ["--n-train", "8", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "8", "--batch-size", "4", "--no-eval"]


def user_folder(path):
    """A folder of someone's own files, as `--out ~/models` would find it."""
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 jpeg")
    return path


def untouched(path) -> bool:
    return (path / "notes.txt").read_text() == "my notes" and (
        path / "sub" / "photo.jpg"
    ).read_bytes() == b"\xff\xd8 jpeg"


def one_line_error(capsys, match: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    return err


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if a refused command gets as far as resolving a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("model work started before the output path was checked")

    monkeypatch.setattr(model, "resolve", refuse)


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_checkpoint):
    """A real output folder of abliterate (`apply` of a recorded edit): what --force may replace."""
    root = tmp_path_factory.mktemp("previous")
    edit = recorded_edit(root / "edit", 64)
    out = root / "run"
    assert cli.main(["apply", str(tiny_checkpoint), "--edit", str(edit), "--out", str(out)]) == 0
    return out


def test_force_refuses_a_users_folder_before_any_model_work(
    tmp_path, tiny_checkpoint, previous_run, capsys, no_model_work
):
    folder = user_folder(tmp_path / "models")
    edit = str(previous_run / "abliteration.json")
    for command in (
        ["run", str(tiny_checkpoint), "--out", str(folder), "--force", *FAST],
        ["apply", str(tiny_checkpoint), "--edit", edit, "--out", str(folder), "--force"],
        ["export-adapter", str(previous_run), "--base", str(tiny_checkpoint), "--out", str(folder), "--force"],
        ["export-gguf", str(previous_run), "--out", str(folder / "notes.txt"), "--force"],
    ):
        assert cli.main(command) == 2
        err = one_line_error(capsys, f"{folder}")
        assert "exists and is not" in err and "choose another --out" in err
        assert untouched(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_force_refuses_an_existing_file_where_a_folder_goes(tmp_path, tiny_checkpoint, capsys, no_model_work):
    file = tmp_path / "model.bin"
    file.write_bytes(b"precious")
    assert cli.main(["run", str(tiny_checkpoint), "--out", str(file), "--force", *FAST]) == 2
    one_line_error(capsys, "is an existing file, not a folder")
    assert file.read_bytes() == b"precious"


def test_current_directory_and_home_are_never_replaced(tmp_path, tiny_checkpoint, capsys, monkeypatch, no_model_work):
    home = tmp_path / "home"
    home.mkdir()
    (home / "abliteration.json").write_text(json.dumps({"abliterate_version": "0", "edit": {}}))  # even so
    monkeypatch.setenv("HOME", str(home))
    work = user_folder(home / "work")
    monkeypatch.chdir(work / "sub")
    for out, what in ((".", "the current directory"), ("..", "the current directory"), ("~", "your home folder")):
        assert cli.main(["run", str(tiny_checkpoint), "--out", out, "--force", *FAST]) == 2
        one_line_error(capsys, f"is {what} or a folder above it")
    assert untouched(work) and (home / "abliteration.json").is_file()


def test_empty_folder_is_replaced_with_force(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AbliterateError, match="already exists; pass --force"):
        check_output(empty, force=False)
    assert check_output(empty, force=True) == empty
    with files.staging(empty, force=True) as tmp:
        (tmp / "abliteration.json").write_text("{}")
    assert (empty / "abliteration.json").read_text() == "{}"


def test_previous_output_is_replaced_with_force(tmp_path, tiny_checkpoint, previous_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(previous_run, out)
    (out / "stale.txt").write_text("from the earlier run")
    edit = str(previous_run / "abliteration.json")
    for command in (
        ["apply", str(tiny_checkpoint), "--edit", edit, "--out", str(out)],
        ["export-adapter", str(previous_run), "--base", str(tiny_checkpoint), "--out", str(out)],
    ):
        assert cli.main(command) == 2
        one_line_error(capsys, "already exists; pass --force")
        assert cli.main([*command, "--force"]) == 0
        capsys.readouterr()
        assert not (out / "stale.txt").exists() and (out / "abliteration.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()  # the adapter replaced the applied model
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_folder_that_appears_during_the_run_is_checked_again(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(AbliterateError, match="exists and is not an earlier abliterate output folder"):
        with files.staging(out, force=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            user_folder(out)  # someone else writes there while the run works
    assert untouched(out) and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_single_file_outputs_replace_only_their_own_files(tmp_path, capsys, no_model_work):
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "data"}')
    assert cli.main(["evaluate", "some-model", "--out", str(mine), "--force"]) == 2
    one_line_error(capsys, "is not an abliterate evaluate report")
    assert cli.main(["benchmark", "some-model", "--tasks", "arc_easy", "--out", str(mine), "--force"]) == 2
    one_line_error(capsys, "is not an abliterate benchmark report")
    assert mine.read_text() == '{"my": "data"}'
    # A markdown file of the user's beside an otherwise new report is refused too.
    (tmp_path / "new.md").write_text("# my notes\n")
    assert cli.main(["evaluate", "some-model", "--out", str(tmp_path / "new.json"), "--force"]) == 2
    one_line_error(capsys, "new.md exists and is not an abliterate evaluate report")

    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)  # a GGUF without our key
    with pytest.raises(AbliterateError, match="is not a GGUF written by abliterate export-gguf"):
        check_output(gguf, True, "gguf")
    ours = {"abliterate_version": "1", "metrics": {}, "answers": {}}
    mine.write_text(json.dumps(ours))
    assert check_output(mine, True, "evaluation") == mine
    with pytest.raises(AbliterateError, match="already exists; pass --force"):
        check_output(mine, False, "evaluation")


def test_judge_writes_over_its_own_labels_only(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "How do I bake bread?", "response": "I can't help with that."}) + "\n")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("my own notes\n")
    assert cli.main(["judge", str(answers), "--out", str(labels), "--rules-only", "--force"]) == 2
    one_line_error(capsys, "is not labels written by abliterate judge")
    assert labels.read_text() == "my own notes\n"
    labels.unlink()
    assert cli.main(["judge", str(answers), "--out", str(labels), "--rules-only"]) == 0
    assert cli.main(["judge", str(answers), "--out", str(labels), "--rules-only"]) == 2
    one_line_error(capsys, "already exists; pass --force")
    assert cli.main(["judge", str(answers), "--out", str(labels), "--rules-only", "--force"]) == 0
    assert json.loads(labels.read_text())["label"] == "refusal"


def test_report_folder_is_replaced_only_while_it_holds_plots(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "old.png").write_bytes(b"png")
    with files.staging(report, force=True, kind="report") as tmp:
        (tmp / "new.png").write_bytes(b"png")
    assert [p.name for p in report.iterdir()] == ["new.png"]
    (report / "my.txt").write_text("mine")
    with pytest.raises(AbliterateError, match="is not a report folder of .png files"):
        with files.staging(report, force=True, kind="report") as tmp:
            (tmp / "new.png").write_bytes(b"png")
    assert (report / "my.txt").read_text() == "mine"
