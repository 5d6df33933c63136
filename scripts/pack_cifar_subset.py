"""Pack what ``make gpu-check`` needs on a GPU machine besides the tracked files into
gpu-pack/. The folder is git-ignored: a device call brings it only when it names it
(``carry: ["gpu-pack"]``), within the call's 64 MiB with the working tree (../shared stays
behind). Run it with the project's venv (it reads the data with the ``moco`` package):
``make gpu-pack``, i.e. ``.venv/bin/python scripts/pack_cifar_subset.py``.

* ``cifar10-subset.tar.gz``: a class-balanced subset of CIFAR-10 (default: all of it, 50,000
  train + 10,000 test JPEGs, 19.5 MiB; the files as they are, in a gzipped tar: CIFAR's ~1 KB
  JPEGs would more than double in a plain tar's 512-byte blocks) in the ImageFolder layout
  ``cifar10-subset/{train,test}/<class>/<file>``;
* ``site-packages/``: pytest and its pure-Python dependencies, copied from this environment
  (the GPU machine has torch but no pytest, and no network to install it).

    make gpu-pack                                                   # from $MOCO_DATA or ../shared
    .venv/bin/python scripts/pack_cifar_subset.py DATA --train 25000 --test 5000   # smaller
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import numpy  # noqa: F401  (what moco.data needs, as the venv has it)
    import torch  # noqa: F401
    from packaging.requirements import Requirement
except ImportError as _e:
    raise SystemExit(f"pack_cifar_subset: {_e}: run it with the project's venv: make gpu-pack "
                     "(= .venv/bin/python scripts/pack_cifar_subset.py)") from None

TEST_PACKAGES = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
# The GPU machine: Linux, Python 3.12 (dependency markers are evaluated for it, not for here).
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "extra": ""}


def default_source() -> Path:
    """$MOCO_DATA, else ../shared/data/cifar10 beside the checkout (as ``moco pretrain``)."""
    from moco.engine.config_sources import default_data_dir

    return Path(default_data_dir() or ROOT.parent / "shared" / "data" / "cifar10")


def pack_subset(data: Path, out: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[int, int]:
    """Write the class-balanced subset as a .tar.gz; returns (images, bytes)."""
    from moco.data.datasets import class_balanced_subset
    from moco.data.splits import find_dataset

    splits = find_dataset(data)
    chosen = [("train", splits.train, n_train)]
    if splits.test is not None:
        chosen.append(("test", splits.test, n_test))
    count = 0
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:  # gzip: tar's 512-byte blocks
        for split, src, n in chosen:
            if not src.labeled or src.files is None:
                raise SystemExit(f"{data}/{split} is not a labeled folder of image files")
            for i in class_balanced_subset(src.labels or [], n, seed):
                f = Path(src.files[i])
                tar.add(f, arcname=f"cifar10-subset/{split}/{f.parent.name}/{f.name}")
                count += 1
    os.replace(tmp, out)
    return count, out.stat().st_size


def _top_level(dist: md.Distribution) -> set[str]:
    names = set()
    for f in dist.files or []:
        top = f.parts[0]
        if top.endswith((".dist-info", ".pth")) or top == "..":
            continue
        names.add(top)
    return names


def pack_test_packages(dest: Path) -> int:
    """Copy pytest and its dependencies (pure Python) into ``dest``; returns bytes."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    seen: set[str] = set()
    todo = list(TEST_PACKAGES)
    while todo:
        name = todo.pop()
        key = name.replace("_", "-").replace(".", "-").lower()
        if key in seen:
            continue
        seen.add(key)
        dist = md.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(TARGET):
                todo.append(req.name)
        base = Path(str(dist.locate_file("")))
        for top in _top_level(dist):
            src = base / top
            if src.is_dir():
                shutil.copytree(src, dest / top, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.is_file():
                shutil.copy2(src, dest / top)
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=str(default_source()), help="CIFAR-10 ImageFolder "
                   "(train/, test/); default $MOCO_DATA, else ../shared/data/cifar10")
    p.add_argument("--train", type=int, default=50_000, help="train images (class-balanced; default: all of CIFAR-10)")
    p.add_argument("--test", type=int, default=10_000, help="test images (class-balanced; default: all)")
    p.add_argument("--out", default=str(ROOT / "gpu-pack"), help="folder to fill (default gpu-pack/)")
    p.add_argument("--no-pytest", action="store_true", help="do not copy pytest")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from moco.core.errors import MocoError

    try:
        n, size = pack_subset(Path(args.data), out / "cifar10-subset.tar.gz", args.train, args.test)
    except MocoError as e:
        raise SystemExit(f"pack_cifar_subset: {e} (give the CIFAR-10 folder: make gpu-pack "
                         "PACK_ARGS=DATA, or set $MOCO_DATA)") from None
    print(f"{out / 'cifar10-subset.tar.gz'}: {n} JPEGs, {size / 2**20:.1f} MiB")
    if not args.no_pytest:
        size2 = pack_test_packages(out / "site-packages")
        print(f"{out / 'site-packages'}: {', '.join(TEST_PACKAGES)} and what they need, "
              f"{size2 / 2**20:.1f} MiB")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB in all (the device call carries at most 64 MiB with "
          "the working tree); name it in the call: carry [\"gpu-pack\"]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

