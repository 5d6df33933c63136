"""Library code logs with `logging` and never prints to stderr; the `moco` command shows the
records on stderr as it showed the prints before; importing moco changes no environment
variable."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_FLAGS, run_cli

from moco.utils.logs import show_on_stderr

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "moco"


def test_no_library_module_prints_to_stderr() -> None:
    found = []
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(REPO).as_posix()
        if rel.startswith("moco/cli/") or rel == "moco/utils/logs.py":
            continue  # the command line writes to the terminal; logs.py is the handler
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"sys\.stderr|print\([^)]*file=", line.split("#")[0]):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "library code writing to stderr (log with logging):\n" + "\n".join(found)


def test_importing_any_module_sets_no_environment_variable() -> None:
    code = """
import importlib, json, os, pkgutil
import moco
# The dependencies first: importing torchvision sets TORCHINDUCTOR_CACHE_DIR (torch's own
# inductor cache folder), which is not moco's doing.
import numpy, PIL.Image, safetensors, torch, torchvision, tqdm, yaml
before = dict(os.environ)
failed = []
for m in pkgutil.walk_packages(moco.__path__, "moco."):
    try:
        importlib.import_module(m.name)
    except ImportError as e:  # detectron2's own modules where it is not installed
        failed.append(m.name)
    assert dict(os.environ) == before, (m.name, set(os.environ) ^ set(before))
print(json.dumps(failed))
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) <= {"moco.detection.roi_heads", "moco.detection.train_net"}


def test_the_command_shows_library_records_on_stderr_once() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        show_on_stderr()
        show_on_stderr()
        logging.getLogger("moco.data.somewhere").info("a notice from the library")
        logging.getLogger("other.package").warning("not ours")
    lines = err.getvalue().splitlines()
    assert lines.count("a notice from the library") == 1
    assert "not ours" not in lines


def test_a_real_notice_reaches_the_command_s_stderr(tiny_data: Path, tmp_path: Path) -> None:
    """The decoded cache's notice (logged by moco.data.cache) on `moco pretrain`'s stderr;
    the epoch lines (the command's narrative) on its stdout."""
    rc, out, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--epochs", "1",
                            "--knn-every", "0", "--output", str(tmp_path / "run")])
    assert rc == 0, err
    assert "decoding 32 images" in err and "epoch 1/1" not in err
    assert "epoch 1/1: loss" in out


def test_pretrain_from_python_logs_its_lines(tiny_data: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    from helpers import TINY_FLAGS as flags

    from moco.cli import build_parser
    from moco.cli.pretrain import config_from_args
    from moco.engine.loop import pretrain

    cfg = config_from_args(build_parser().parse_args(
        ["pretrain", str(tiny_data), *flags, "--epochs", "1", "--knn-every", "0",
         "--output", str(tmp_path / "run")]))
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="moco"), contextlib.redirect_stdout(out):
        pretrain(cfg, progress=False)
    assert out.getvalue() == ""  # nothing printed
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("moco.")]
    assert any(m.startswith("epoch 1/1: loss") for m in lines), lines
