"""The README is an entry page whose commands are the CLI's, and every doc it links exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from abliterate.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_readme_command_table_matches_help() -> None:
    """Every subcommand in --help has a row in the README's table, and every row is a real subcommand."""
    rows = re.findall(r"^\| `abliterate ([a-z-]+)", README, flags=re.M)
    assert sorted(rows) == sorted(_subcommands())


def test_readme_flags_exist() -> None:
    """Each flag the README's command table shows is accepted by that subcommand."""
    commands = _subcommands()
    for command, rest in re.findall(r"^\| `abliterate ([a-z-]+)([^`]*)`", README, flags=re.M):
        known = {opt for action in commands[command]._actions for opt in action.option_strings}
        for flag in re.findall(r"--[a-z][a-z0-9-]*", rest):
            assert flag in known, f"README shows {command} {flag}, which `abliterate {command} --help` lacks"


def test_readme_is_an_entry_page_and_links_resolve() -> None:
    """Under 15 KB, and each docs/ link points at a file that exists."""
    assert len(README.encode()) < 15_000
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links, "the README links no docs"
    for link in links:
        assert (ROOT / link).is_file(), link


def test_readme_scripts_exist() -> None:
    """The two commands of the quick start name scripts that exist."""
    for script in re.findall(r"^bash (scripts/\S+)", README, flags=re.M):
        assert (ROOT / script).is_file(), script
