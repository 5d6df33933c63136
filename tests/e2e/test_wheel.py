"""The wheel as pip installs it: built from a copy of the source tree, installed into a folder
of its own (``pip install --target``) and run from a folder outside the repository, where only
the installed copy of ``moco`` can be imported (torch and the other dependencies come from this
environment). ``moco --version`` and ``moco detectron2-config`` (which needs the configs as
package data) work there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import save_original_checkpoint

import moco

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README-pypi.md", "LICENSE", "moco")


def _pip(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the wheel is installed into (``pip install --target``)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info beside the sources
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    # offline: this environment's setuptools builds it, nothing is downloaded
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "dist"),
         str(src))
    wheels = list((root / "dist").glob("momentum_contrast-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "moco/py.typed" in names and "moco/configs/detectron2/Base-RCNN-C4-BN.yaml" in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "configs/"))]
    target = root / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheels[0]))
    return target


def _run(target: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_the_installed_copy_is_the_one_imported(installed: Path, tmp_path: Path) -> None:
    r = _run(installed, [sys.executable, "-c", "import moco; print(moco.__file__)"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(installed)


@pytest.mark.slow
def test_version_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    for argv in ([sys.executable, "-m", "moco", "--version"], [str(installed / "bin" / "moco"),
                                                              "--version"]):
        r = _run(installed, argv, tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == f"moco {moco.__version__}", r.stderr


@pytest.mark.slow
def test_detectron2_config_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "moco.pth.tar"
    save_original_checkpoint(ckpt, "resnet50", with_optimizer=False)
    r = _run(installed, [sys.executable, "-m", "moco", "detectron2-config", str(ckpt), "--task",
                         "voc"], tmp_path)
    assert r.returncode == 0, r.stderr
    config = installed / "moco" / "configs" / "detectron2" / "pascal_voc_R_50_C4_24k_moco.yaml"
    assert str(config) in r.stdout and config.is_file()
    assert "moco export" in r.stdout and "MODEL.WEIGHTS" in r.stdout
