"""One settings object: defaults < TOML < environment < CLI flags."""

from __future__ import annotations

import argparse

import pytest

from abliterate import settings
from abliterate.cli import add_settings_arguments
from abliterate.errors import AbliterateError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return vars(parser.parse_args(argv))


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "a.toml"
    cfg.write_text('max_kl = 0.3\nbatch_size = 4\nn_val = 7\nforce = true\nsystem_prompt = "toml"\n')
    monkeypatch.setenv("ABLITERATE_BATCH_SIZE", "5")
    monkeypatch.setenv("ABLITERATE_N_VAL", "9")
    s = settings.resolve(parse(["m", "--config", str(cfg), "--n-val", "11"]))
    assert (s.max_kl, s.batch_size, s.n_val, s.force, s.system_prompt) == (0.3, 5, 11, True, "toml")
    assert s.model == "m" and s.n_train == settings.Settings().n_train


def test_flags_cover_every_setting():
    parsed = parse(["m"])
    assert set(parsed) == {f for f in settings.Settings().as_dict()}


@pytest.mark.parametrize(
    ("toml", "match"),
    [("nope = 1\n", "unknown settings"), ("batch_size = 'big'\n", "must be int"), ("max_kl = [\n", "not valid TOML")],
)
def test_bad_config(tmp_path, toml, match):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(AbliterateError, match=match):
        settings.resolve({"model": "m", "config": str(cfg)})


def test_bad_env(monkeypatch):
    monkeypatch.setenv("ABLITERATE_FORCE", "maybe")
    with pytest.raises(AbliterateError, match="ABLITERATE_FORCE"):
        settings.resolve({"model": "m"})
