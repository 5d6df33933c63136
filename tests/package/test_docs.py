"""The docs a user needs live in the repository: nothing a user reads points outside it (the
developers' reference file, the data set's notes); the papers and the original code are
cited instead."""

from __future__ import annotations

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
