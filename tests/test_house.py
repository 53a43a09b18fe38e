"""The house keeps its shape: the import graph of mesh/ runtimes/ scheduler/ hw/ has no cycle
(between modules, and between rooms: the folders of mesh/ and the three lower packages),
nothing below mesh/ imports it, and no module or function outgrows one sitting.

Every import counts: those inside functions and under ``TYPE_CHECKING`` too, since a cycle
dodged by deferring an import is still a cycle in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "runtimes", "scheduler", "hw")
LOWER = ("runtimes", "scheduler", "hw")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imported(mods: dict[str, Path], module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Names of our modules that ``node`` (inside ``module``) imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if mods[module].name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        names = [
            f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names
        ]
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        # A submodule importing its own package's __init__ is how Python loads it, not a use.
        if name and name != module and not module.startswith(name + "."):
            out.append(name)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges[module].update(_imported(mods, module, node))
    return edges, mods


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _room(module: str) -> str:
    """mesh.<folder> for mesh's rooms, mesh.<module> for its top modules, else the package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "mesh" else parts[0]


def test_the_cycle_finder_finds_cycles() -> None:
    """The checks below would pass vacuously if the finder saw nothing."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    edges, _ = _graph()
    assert len(edges) > 60  # the walk saw the project
    assert _cycles(edges) == []


def test_no_import_cycle_between_rooms() -> None:
    edges, _ = _graph()
    rooms: dict[str, set[str]] = {}
    for module, targets in edges.items():
        here = _room(module)
        rooms.setdefault(here, set()).update(_room(t) for t in targets if _room(t) != here)
    assert _cycles(rooms) == []


def test_lower_packages_never_import_mesh() -> None:
    edges, _ = _graph()
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in edges.items()
        for t in targets
        if m.split(".")[0] in LOWER and t.split(".")[0] == "mesh"
    )
    assert upward == []


@pytest.mark.parametrize("limit", [MAX_MODULE_LINES])
def test_modules_fit_one_sitting(limit: int) -> None:
    _, mods = _graph()
    long = {str(p.relative_to(ROOT)): n for p in mods.values() if (n := _lines(p)) > limit}
    assert long == {}


def test_functions_fit_one_sitting() -> None:
    _, mods = _graph()
    long = []
    for path in mods.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert long == []


def _lines(path: Path) -> int:
    return path.read_text(encoding="utf-8").count("\n")
