"""What the package index and pip get: the metadata (version from the package, Python
versions, classifiers, links), a long description that stands alone (absolute links, commands
that exist, no checkout assumed) and the package data every command needs (the configs)."""

from __future__ import annotations

import re
import shlex
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

import moco
from moco.cli import build_parser, command_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def long_description() -> str:
    readme = PROJECT["readme"]
    assert readme["content-type"] == "text/markdown"
    return (REPO / readme["file"]).read_text()


def test_the_version_is_the_package_s() -> None:
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moco.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", moco.__version__)


def test_python_versions_and_classifiers() -> None:
    classifiers = PROJECT["classifiers"]
    assert PROJECT["requires-python"] == ">=3.10"
    for minor in range(10, 14):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Operating System :: OS Independent" in classifiers
    assert PROJECT["license"] == "MIT" and "Typing :: Typed" in classifiers
    assert all(url.startswith("https://") for url in PROJECT["urls"].values())


def test_the_long_description_stands_alone() -> None:
    text = long_description()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and all(link.startswith("https://") for link in links), links
    assert "make " not in text and "pip install momentum-contrast" in text


def _moco_lines(text: str) -> list[list[str]]:
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    lines = [line.split("#", 1)[0].strip() for b in blocks for line in b.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("moco ")]


def test_every_command_of_the_long_description_parses() -> None:
    argvs = _moco_lines(long_description())
    assert len(argvs) >= 8
    for argv in argvs:
        if argv == ["--version"]:
            continue
        parser = build_parser(command_of(argv))
        args, extra = parser.parse_known_args(argv)
        assert not extra and args.command == argv[0], (argv, extra)


def test_the_library_examples_use_public_names() -> None:
    code = re.findall(r"^```python\n(.*?)^```", long_description(), flags=re.S | re.M)
    assert len(code) == 2  # the released weights, the library
    for block in code:
        compile(block, "README-pypi.md", "exec")
    imported = [n.strip() for line in re.findall(r"^from moco import (.+)$", "".join(code),
                                                  flags=re.M) for n in line.split(",")]
    used = re.findall(r"\bmoco\.([a-z_]+)\(", "".join(code))
    assert imported and used and set(imported + used) <= set(moco.__all__)


def test_every_config_file_is_package_data() -> None:
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["moco"]
    files = [p.relative_to(REPO / "moco").as_posix()
             for p in sorted((REPO / "moco" / "configs").rglob("*")) if p.is_file()]
    assert len(files) >= 10 and "py.typed" in patterns
    missing = [f for f in files if not any(fnmatch(f, pat) and f.count("/") == pat.count("/")
                                           for pat in patterns)]
    assert not missing, f"files under moco/configs that a wheel would leave out: {missing}"
    # the repository path users type keeps working
    assert (REPO / "configs" / "detectron2").resolve() == REPO / "moco" / "configs" / "detectron2"
