"""Packaging facts kept in one place: the version, and optional libraries behind extras."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import tomllib

import abliterate
from abliterate.errors import AbliterateError, require

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_home() -> None:
    """pyproject takes the version from the package, so the two cannot disagree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("abliterate") == abliterate.__version__


def test_heavy_optional_libraries_are_extras() -> None:
    """peft, scikit-learn and pyarrow serve one command each, so the default install leaves them out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = " ".join(project["dependencies"])
    for lib in ("peft", "scikit-learn", "pyarrow"):
        assert lib not in names
        assert any(lib in " ".join(deps) for deps in project["optional-dependencies"].values())


def test_missing_optional_library_is_one_line_naming_the_extra() -> None:
    """A missing extra is an AbliterateError that says what to install."""
    with pytest.raises(AbliterateError) as caught:
        require("no_such_module_abliterate_test", "adapter", "export-adapter")
    message = str(caught.value)
    assert "\n" not in message and "abliterate[adapter]" in message and "export-adapter" in message
    assert require("json", "x", "y").dumps([1]) == "[1]"
