"""The first-party packages import each other without a cycle.

A cycle works only while every module in it defers the names it takes from the others, and the
first import that runs in a new order breaks it with a half-initialised module; a layered graph
also says which module may depend on which. The graph is built from the source with ``ast``: the
imports a module runs when it is loaded (at its top level, including ``from x import y``), not
those inside functions (run later, when every module is loaded) nor under ``if TYPE_CHECKING``
(never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "trainer", "jobs", "bench")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → its file, for every module of ``packages`` under ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when a module is loaded: its top level and the blocks there
    (if/try/with), but no function or class body's, and no ``if TYPE_CHECKING:`` block's."""
    found = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _load_time_imports(node.body)
            found += _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(handler.body for handler in node.handlers), node.orelse, node.finalbody):
                found += _load_time_imports(block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            found += _load_time_imports(node.body)
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The first-party modules one import statement loads (``from p import m`` loads p.m if it is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:  # relative: from the module's package (its own name, for a package's __init__)
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    targets = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    if base in known and len(targets) < len(node.names):
        targets.add(base)
    return targets


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module → the first-party modules it imports while it loads."""
    files = module_files(root, packages)
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in _load_time_imports(tree.body):
            edges |= _imported(node, module, path.name == "__init__.py", known)
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it, first repeated at the end; None if it has none."""
    done, path, on_path = set(), [], {}

    def visit(node: str) -> list[str] | None:
        on_path[node] = len(path)
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if child in on_path:
                return path[on_path[child]:] + [child]
            if child not in done and (cycle := visit(child)) is not None:
                return cycle
        path.pop()
        del on_path[node]
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_first_party_modules_import_without_a_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert "trainer.config" in graph["trainer.loop"]  # the graph sees the imports it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(("b_text", "cycle"), [
    ("from pkg import a\n", ["pkg.a", "pkg.b", "pkg.a"]),
    ("from .a import thing\n", ["pkg.a", "pkg.b", "pkg.a"]),
    ("import pkg.a\n", ["pkg.a", "pkg.b", "pkg.a"]),
    ("def f():\n    from pkg import a\n", None),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import thing\n", None),
])
def test_the_check_finds_a_cycle_and_names_it(tmp_path, b_text, cycle):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import other\n", "pkg/b.py": b_text})
    assert find_cycle(import_graph(tmp_path, ("pkg",))) == cycle
