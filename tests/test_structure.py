"""The drawn structure holds: no import cycle, no upward import, nothing imports the CLI, files is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PKG = ROOT / "src" / "abliterate"


def _module(path: Path) -> str:
    parts = ["abliterate", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module's imports of abliterate modules, lazy ones inside functions included."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("abliterate"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("abliterate"))
        graph[name] = {m for m in found if m in modules and m != name and m != "abliterate"}
    return graph


def test_no_import_cycle() -> None:
    """Depth-first search finds no module that reaches itself."""
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_nothing_imports_the_cli_and_files_is_a_leaf() -> None:
    """The CLI is the top; files, errors and settings sit at the bottom."""
    graph = _imports()
    assert [m for m, deps in graph.items() if "abliterate.cli" in deps] == []
    assert graph["abliterate.files"] <= {"abliterate.errors"}
    assert graph["abliterate.errors"] == set()
    assert graph["abliterate.settings"] <= {"abliterate.errors"}


def test_the_method_does_not_import_its_wings() -> None:
    """The method's steps never import the output, export or evaluation folders, nor the pipeline."""
    graph = _imports()
    method = ("prompts", "capture", "directions", "selection", "edit", "architectures", "model")
    for step in method:
        upward = {m for m in graph[f"abliterate.{step}"] if m.startswith(("abliterate.output", "abliterate.export",
                                                                          "abliterate.evaluation", "abliterate.pipeline"))}  # fmt: skip
        assert not upward, f"{step} imports {sorted(upward)}"


def _top_level_imports(path: Path) -> set[str]:
    """The first name of every module a file imports, lazy ones inside functions and relative ones ('.') included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.add(node.module.split(".")[0] if node.level == 0 and node.module else ".")
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


def test_tests_do_not_import_each_other() -> None:
    """Test modules share code through helpers.py only; bench/ builds on abliterate alone, never on the tests."""
    test_files = sorted(TESTS.glob("test_*.py")) + [TESTS / "helpers.py", TESTS / "conftest.py"]
    assert len(test_files) > 3
    for path in test_files:
        bad = {m for m in _top_level_imports(path) if m.startswith("test_") or m in ("conftest", "tests", ".")}
        assert not bad, f"tests/{path.name} imports {sorted(bad)}: shared code belongs in tests/helpers.py"
    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert scripts
    for script in scripts:
        bad = {
            m for m in _top_level_imports(script) if m.startswith("test_") or m in ("conftest", "helpers", "tests", ".")
        }
        assert not bad, f"bench/{script.name} imports {sorted(bad)}: bench builds on the abliterate package alone"
        assert "sys.path" not in script.read_text(encoding="utf-8"), f"bench/{script.name} edits sys.path"


def test_the_library_never_sees_argparse() -> None:
    """Flags are parsed in the CLI alone; the library takes typed objects (Settings, LoadOptions, Options)."""
    for path in PKG.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            module = node.module if isinstance(node, ast.ImportFrom) else None
            assert "argparse" not in names and module != "argparse", f"{path.name} imports argparse"
