"""The package's layout: an order of packages that holds, no import cycles, no module over 400
lines, no function over 60 lines or with more than 8 parameters.

The order (ARCHITECTURE.md): ``core`` (the paper's parts) < ``utils`` (general helpers) <
``data``, ``detection`` < ``eval`` < ``engine``, ``hub`` < ``ablation`` < ``cli``. A package
imports only from packages below it: the engine may call evaluation for its monitor, evaluation
never imports the engine. ``moco/__init__.py`` and ``moco/__main__.py`` (the public facade)
may name anything.

The import graph is read from the source (the AST of every module), counting every import at
any depth (inside functions too: a function-level import hides a cycle, it does not remove it),
relative and absolute. ``from moco.x import y`` is an edge to ``moco.x.y`` when that is a
module, else to ``moco.x``; a package's ``__init__`` run on the way is not counted as an edge
(it would make every module depend on ``moco/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "moco"
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
#: Each package's level: a package imports only from packages of a lower level.
LEVELS = {"core": 0, "utils": 1, "data": 2, "detection": 2, "eval": 3, "engine": 4, "hub": 4,
          "ablation": 5, "cli": 6}
FACADE = {"moco", "moco.__main__"}
def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (``moco`` itself)."""
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*.py")):
        parts = [root.name, *p.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``name`` (at ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    found = set()
    for t in targets:
        while t not in modules and "." in t:  # moco.x.attr -> moco.x
            t = t.rpartition(".")[0]
        if t in modules and t != name:
            found.add(t)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: imported_modules(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ----- the checker itself, on hand-built packages ------------------------------------------

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "moco"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "a.py": "from moco.b import f\n",
        "b.py": "def f():\n    from moco import a\n    return a\n",
        "c.py": "import moco.a\n",
    })
    graph = import_graph(root)
    assert graph["moco.b"] == {"moco.a"} and graph["moco.c"] == {"moco.a"}
    assert find_cycles(graph) == [["moco.a", "moco.b"]]


def test_relative_imports_and_subpackages_are_resolved(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "core/__init__.py": "",
        "core/x.py": "from . import y\nfrom .y import Y\n",
        "core/y.py": "from ..data.z import Z\n",
        "data/__init__.py": "",
        "data/z.py": "Z = 1\n",
    })
    graph = import_graph(root)
    assert graph["moco.core.x"] == {"moco.core.y"}
    assert graph["moco.core.y"] == {"moco.data.z"}
    assert find_cycles(graph) == []


# ----- the package -------------------------------------------------------------------------

def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (counting function-level imports): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_core_imports_nothing_else_from_the_package() -> None:
    graph = import_graph()
    core = [m for m in graph if m == "moco.core" or m.startswith("moco.core.")]
    assert core, "moco/core is missing"
    outside = {m: sorted(d for d in deps if not (d == "moco.core" or d.startswith("moco.core.")))
               for m, deps in graph.items() if m in core}
    outside = {m: d for m, d in outside.items() if d}
    assert not outside, f"moco.core imports from outside moco.core: {outside}"


def test_no_module_over_400_lines() -> None:
    limit = MAX_LINES
    long = {str(p.relative_to(PACKAGE.parent)): n for p in module_files().values()
            if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"modules over {limit} lines (split them by concern): {long}"


def package_of(module: str) -> str:
    """``moco.data.cache`` -> ``data``; the facade modules -> ''."""
    parts = module.split(".")
    return "" if module in FACADE or len(parts) < 2 else parts[1]


def order_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a package at the same or a higher level than its own."""
    out = []
    for m, deps in sorted(graph.items()):
        here = package_of(m)
        if not here:
            continue
        for d in sorted(deps):
            there = package_of(d)
            if there and there != here and LEVELS.get(there, 99) >= LEVELS.get(here, -1):
                out.append(f"{m} -> {d}")
    return out


def test_the_order_checker_finds_an_upward_import(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "core/__init__.py": "", "core/a.py": "",
        "eval/__init__.py": "", "eval/b.py": "def f():\n    from moco.engine import c\n",
        "engine/__init__.py": "", "engine/c.py": "from moco.eval.b import f\nfrom moco.core import a\n",
    })
    assert order_violations(import_graph(root)) == ["moco.eval.b -> moco.engine.c"]


def test_every_package_has_a_level() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(LEVELS), f"give each package a level in LEVELS: {packages - set(LEVELS)}"


def test_packages_import_only_from_below() -> None:
    bad = order_violations(import_graph())
    assert not bad, "imports against the package order (core < utils < data, detection < eval " \
        "< engine, hub < ablation < cli): " + "; ".join(bad)


def _functions(root: Path = PACKAGE) -> list[tuple[str, int, int]]:
    """(where, lines, parameters) of every function and method in the package."""
    out = []
    for p in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [x for x in a.posonlyargs + a.args + a.kwonlyargs
                          if x.arg not in ("self", "cls")]
                n = len(params) + bool(a.vararg) + bool(a.kwarg)
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                out.append((f"{p.relative_to(root.parent)}:{node.lineno} {node.name}", lines, n))
    return out


def test_no_function_over_60_lines() -> None:
    long = [f"{w} ({n} lines)" for w, n, _ in _functions() if n > MAX_FUNCTION_LINES]
    assert not long, "functions over 60 lines (split them by job): " + "; ".join(long)


def test_no_function_with_more_than_8_parameters() -> None:
    many = [f"{w} ({n})" for w, _, n in _functions() if n > MAX_PARAMETERS]
    assert not many, "functions with more than 8 parameters (a dataclass for the rest): " + \
        "; ".join(many)
