"""The package's import graph has no circles, imports inside functions included.

A circle hidden behind an import inside a function still ties two modules together: neither
can be understood, tested or moved alone, and the order they first load in decides whether
the program starts. This walks every ``import`` statement in ``spotrun/`` (top level, inside
functions and classes; not ``if TYPE_CHECKING:`` blocks, which never run) and fails on any
strongly connected group of modules, naming it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import spotrun

PACKAGE = Path(spotrun.__file__).parent


def _modules(package: Path) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the spotrun modules it imports (a package counts with its ``__init__``;
    the importer's own parent packages are already loading, so they are not edges)."""
    mods = _modules(package)
    top = package.name
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text())
        package = name if is_pkg else name.rpartition(".")[0]
        skip = _type_checking_nodes(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in mods:
                        target = target.rpartition(".")[0]
                    if target:
                        targets.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == top:
                    source = node.module or ""
                else:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in mods else source)
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        edges: set[str] = set()
        for target in targets:
            parts = target.split(".")
            for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                ancestor = ".".join(parts[:k])
                if ancestor in mods and ancestor not in own:
                    edges.add(ancestor)
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_the_walker_finds_a_circle_hidden_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import B\n    return B\n")
    (pkg / "sub" / "b.py").write_text("class B:\n    def g(self):\n        from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
                              "import pkg.sub\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}  # the package's __init__ runs too
    assert graph["pkg.c"] == {"pkg.sub"}  # TYPE_CHECKING imports never run
    assert circles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b"]]


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    detail = "; ".join(
        " <-> ".join(group) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(group))}" for m in group) + ")"
        for group in found
    )
    assert not found, f"import circles: {detail}"


@pytest.mark.parametrize("module", ["spotrun.launch.node", "spotrun.distributed"])
def test_modules_run_with_python_m_import_cleanly(module):
    # A package __init__ that imports the module (through a sibling) makes `python -m` warn
    # "found in sys.modules ... unpredictable behaviour" on every node of every launch.
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "RuntimeWarning" not in done.stderr, done.stderr[-2000:]
