"""The docs a user needs live in the repository: nothing a user reads points outside it (the
developers' reference file, the data set's notes); the papers and the original code are
cited instead."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READ_BY_USERS = ["README.md", "docs", "moco", "configs", "scripts", "benchmarks"]
OUTSIDE = re.compile(r"REFERENCE\.md|REFERENCE §|\.\./shared/(?!data/cifar10)")


def _files() -> list[Path]:
    out: list[Path] = []
    for name in READ_BY_USERS:
        p = REPO / name
        out += [p] if p.is_file() else [
            f for f in sorted(p.rglob("*")) if f.is_file()
            and f.suffix in (".md", ".py", ".yaml", ".yml", ".txt", ".toml", ".cfg")]
    return out


def test_no_reference_outside_the_repository() -> None:
    found = [f"{f.relative_to(REPO)}:{i}: {line.strip()[:100]}"
             for f in _files() for i, line in enumerate(f.read_text().splitlines(), 1)
             if OUTSIDE.search(line)]
    assert not found, "references outside the repository:\n" + "\n".join(found)


# ----- ARCHITECTURE.md names only what exists ---------------------------------------------------

ARCHITECTURE = REPO / "ARCHITECTURE.md"
#: A file or folder of the repository in backticks, optionally followed by ``:Name`` or
#: ``:Class.attribute`` (``moco/engine/run.py:build_run``).
NAMED = re.compile(r"`((?:moco|tests|docs|scripts|benchmarks)/[\w./-]*|README\.md|hubconf\.py|"
                   r"pyproject\.toml)(?::([\w.]+))?")
#: Placeholders of a path to create (``moco/cli/NAME.py``, ``tests/PACKAGE/test_MODULE.py``).
PLACEHOLDER = re.compile(r"<|NAME|PACKAGE|MODULE")


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level, and ``Class.name`` for what its classes
    define (methods, class attributes, dataclass fields)."""
    def targets(node: ast.stmt) -> list[str]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return [node.name]
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []

    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        out.update(targets(node))
        if isinstance(node, ast.ClassDef):
            out.update(f"{node.name}.{n}" for item in node.body for n in targets(item))
    return out


def architecture_references() -> list[tuple[str, str | None]]:
    """(path, name or None) of every file, folder and name ARCHITECTURE.md writes."""
    return [(m.group(1), m.group(2)) for m in NAMED.finditer(ARCHITECTURE.read_text())
            if not PLACEHOLDER.search(m.group(1))]


def test_architecture_names_only_files_and_names_that_exist() -> None:
    refs = architecture_references()
    assert len(refs) > 50, "ARCHITECTURE.md names the modules it describes"
    missing = sorted({p for p, _ in refs if not (REPO / p).exists()})
    assert not missing, f"ARCHITECTURE.md names files that do not exist: {missing}"
    unknown = sorted({f"{p}:{n}" for p, n in refs if n and p.endswith(".py")
                      and n not in defined_names(REPO / p)})
    assert not unknown, f"ARCHITECTURE.md names what these modules do not define: {unknown}"


def test_the_reference_finder_sees_paths_names_and_placeholders() -> None:
    text = ("`moco/engine/run.py:build_run` `moco/eval/health/` `moco/cli/NAME.py` "
            "`moco/engine/loop.py:Pretrainer.run`, `README.md` `--aug` `-a/--arch` `main_moco.py`")
    found = [(m.group(1), m.group(2)) for m in NAMED.finditer(text)
             if not PLACEHOLDER.search(m.group(1))]
    assert found == [("moco/engine/run.py", "build_run"), ("moco/eval/health/", None),
                     ("moco/engine/loop.py", "Pretrainer.run"), ("README.md", None)]
    assert "Pretrainer.run" in defined_names(REPO / "moco/engine/loop.py")


def test_architecture_lists_every_package_at_its_level() -> None:
    from test_layout import LEVELS

    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", ARCHITECTURE.read_text(), re.MULTILINE)
    assert {name: int(level) for level, name in rows} == LEVELS
    packages = {p.parent.name for p in (REPO / "moco").glob("*/*.py")}
    assert packages == set(LEVELS)
