"""The public API (moco/__init__.py): every name resolves, lazily, and `import moco` alone
loads no heavy dependency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import moco

REPO = Path(__file__).resolve().parents[2]


def test_all_lists_every_public_name_and_each_resolves() -> None:
    assert moco.__all__ == sorted(moco._API)
    for name in moco.__all__:
        obj = getattr(moco, name)
        assert obj is getattr(__import__(moco._API[name], fromlist=[name]), name)
    assert set(moco.__all__) <= set(dir(moco))


def test_import_moco_is_light() -> None:
    code = "import sys, moco; print(sorted(m for m in ('torch', 'torchvision', 'numpy', " \
           "'matplotlib') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_an_unknown_name_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moco.nope  # noqa: B018
