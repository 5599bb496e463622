"""--push-to-hub: the finished folder is uploaded with the token from the environment, which leaks nowhere."""

from __future__ import annotations

import logging

import huggingface_hub
import pytest
from helpers import FAST

from abliterate import cli, model
from abliterate.errors import AbliterateError
from abliterate.export import hub
from abliterate.tiny import recorded_edit

SECRET = "hf_SeCrEt0123456789abcdefTOKEN"


class FakeHfApi:
    """Records what would have been sent to the hub; no network."""

    calls: list[tuple] = []
    fail_with: Exception | None = None

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        if self.fail_with:
            raise self.fail_with
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())  # what is there at upload time
        self.calls.append(("upload_folder", folder_path, repo_id, files))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls = []
    FakeHfApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return FakeHfApi


def assert_no_secret(capsys, caplog, folder):
    out, err = capsys.readouterr()
    assert SECRET not in out and SECRET not in err
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    return out, err


def test_run_and_apply_upload_the_finished_folder(tmp_path, tiny_checkpoint, fake_hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    args = ["run", str(tiny_checkpoint), "--out", str(out), *FAST, "--no-eval", "--layer", "1"]
    assert cli.main([*args, "--push-to-hub", "someone/tiny-abliterated"]) == 0
    init, create, upload = fake_hub.calls
    assert init == ("init", SECRET)
    assert create[1] == "someone/tiny-abliterated" and create[2]["exist_ok"] is True
    assert upload[1] == str(out) and upload[2] == "someone/tiny-abliterated"
    # Uploaded after the rename into place: the complete folder, not a temp one.
    assert {"model.safetensors", "abliteration.json", "README.md", "directions.safetensors"} <= set(upload[3])
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert_no_secret(capsys, caplog, out)

    fake_hub.calls.clear()
    applied = tmp_path / "applied"
    edit = str(out / "abliteration.json")
    assert cli.main(["apply", str(tiny_checkpoint), "--edit", edit, "--out", str(applied), "--push-to-hub", "a/b"]) == 0
    assert [c[0] for c in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[0][1] == SECRET and fake_hub.calls[2][1:3] == (str(applied), "a/b")
    assert_no_secret(capsys, caplog, applied)


@pytest.mark.parametrize("command", ["run", "apply"])
def test_missing_token_fails_before_loading(tmp_path, tiny_checkpoint, fake_hub, monkeypatch, capsys, command):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(model, "load", lambda *a, **k: pytest.fail("the model was loaded before the token check"))
    edit = recorded_edit(tmp_path / "run", hidden=64)
    out = tmp_path / "o"
    extra = ["--edit", str(edit)] if command == "apply" else []
    assert cli.main([command, str(tiny_checkpoint), "--out", str(out), *extra, "--push-to-hub", "u/n"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_TOKEN" in err[0]
    assert not out.exists() and fake_hub.calls == []


def test_token_sources_and_repo_id(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_other")
    assert hub.token() == "hf_other"
    monkeypatch.setenv("HF_TOKEN", "hf_first")
    assert hub.token() == "hf_first"
    for bad in ("no-slash", "a/b/c", "/name", "owner/"):
        with pytest.raises(AbliterateError, match="owner/name"):
            hub.check(bad)
    hub.check("owner/name.v2")


def test_upload_error_is_one_line_without_the_token(tmp_path, fake_hub):
    (tmp_path / "config.json").write_text("{}")
    fake_hub.fail_with = RuntimeError(
        f"401 Unauthorized ({SECRET}) for url: https://huggingface.co/api/x?auth={SECRET}&a=b\nBearer {SECRET}"
    )
    with pytest.raises(AbliterateError) as info:
        hub.push(tmp_path, "u/n")
    message = str(info.value)
    assert SECRET not in message and "\n" not in message
    assert "401 Unauthorized" in message and f"hf upload u/n {tmp_path}" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
