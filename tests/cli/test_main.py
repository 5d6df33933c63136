"""The ``moco`` entry point: ``--version``, help pages that load no torch (only the module of
the command given is imported), and ``pretrain --print-config``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

import moco
from moco.cli import COMMANDS, main
from moco.engine.config import MocoConfig

REPO = Path(__file__).resolve().parents[2]
LIGHT = ("pretrain", "lincls", "knn", "embed", "shard", "cache", "ablate")


def _modules_after(argv: list[str]) -> tuple[str, list[str]]:
    """stdout of ``moco ARGV`` run in a fresh interpreter, and the heavy modules it loaded."""
    code = ("import sys\nfrom moco.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'numpy', 'PIL') "
            "if m in sys.modules), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       env=env, timeout=120)
    return r.stdout, r.stderr.strip().splitlines()[-1:]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moco {moco.__version__}"
    out, loaded = _modules_after(["--version"])
    assert out.strip() == f"moco {moco.__version__}" and loaded == ["[]"]


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in LIGHT]])
def test_help_loads_no_torch(argv: list[str]) -> None:
    out, loaded = _modules_after(argv)
    assert "usage: moco" in out and loaded == ["[]"], (out[-300:], loaded)


def test_python_m_moco_help_lists_every_command() -> None:
    r = subprocess.run([sys.executable, "-m", "moco", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0
    for name in COMMANDS:
        assert name.replace("_", "-") in r.stdout


def test_print_config_shows_the_resolved_settings_and_writes_nothing(tiny_data: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, text, err = run_cli(["pretrain", str(tiny_data), "--preset", "cifar10", "--epochs", "3",
                             "--output", str(out), "--print-config"])
    assert rc == 0, err
    settings = yaml.safe_load(text)
    expected = MocoConfig(preset="cifar10", data=str(tiny_data), epochs=3, output=str(out))
    assert settings == expected.to_dict()
    assert not out.exists()
    rc, _, err = run_cli(["pretrain", str(tiny_data), "--moco-k", "4", "--print-config"])
    assert rc == 2 and "--moco-k 4 is smaller than" in err  # checked as a run would be
