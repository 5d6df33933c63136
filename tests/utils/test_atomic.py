"""The one atomic write (moco.utils.atomic): its guarantee, and that every writer in the
package goes through it."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import fill_disk_after

import moco.utils.atomic as atomic_mod
from moco.utils.atomic import (
    atomic_file,
    atomic_path,
    atomic_write,
    atomic_write_text,
    remove_stale_temporaries,
)

PACKAGE = Path(__file__).resolve().parents[2] / "moco"


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_the_content_replaces_the_file_with_a_normal_mode(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    atomic_write_text(p, "one")
    atomic_write(p, lambda f: f.write(b"two"))
    assert p.read_text() == "two"
    assert p.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    with atomic_path(tmp_path / "b.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".b.bin.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"by name")
    assert (tmp_path / "b.bin").read_bytes() == b"by name"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_file_and_folder_are_fsynced_before_and_after_the_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(a: Any, b: Any) -> None:
        events.append("replace")
        real_replace(a, b)

    monkeypatch.setattr(atomic_mod.os, "fsync", fsync)
    monkeypatch.setattr(atomic_mod.os, "replace", replace)
    atomic_write_text(tmp_path / "f", "x")
    assert events == ["fsync file", "replace", "fsync dir"]
    events.clear()
    with atomic_path(tmp_path / "g") as tmp:
        tmp.write_text("y")
    assert events == ["fsync file", "replace", "fsync dir"]


@pytest.mark.parametrize("form", ["file", "path"])
def test_a_full_disk_keeps_the_old_file_removes_the_temporary_and_names_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    p = tmp_path / "metrics.jsonl"
    atomic_write_text(p, "old\n")
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic_mod.os, "fdopen", lambda *a, **k: fill_disk_after(
        real_fdopen(*a, **k), 100, monkeypatch))
    with pytest.raises(OSError) as info:
        if form == "file":
            atomic_write(p, lambda f: [f.write(b"x" * 60) for _ in range(3)])
        else:
            with atomic_path(p) as tmp:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(p) and str(p) in str(info.value)
    assert p.read_text() == "old\n" and [q.name for q in tmp_path.iterdir()] == [p.name]


def test_an_error_of_the_writer_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("old")
    with pytest.raises(ValueError), atomic_file(p) as f:
        f.write(b"half")
        raise ValueError("the writer failed")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["config.yaml"]


def test_a_missing_folder_is_an_oserror_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        atomic_write_text(tmp_path / "no" / "x.json", "{}")
    assert info.value.filename == str(tmp_path / "no" / "x.json")


def test_stale_temporaries_of_a_name_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in (".checkpoint_0001.pth.tar.abc123.tmp", ".config.yaml.x1.tmp", "checkpoint_0001.pth.tar",
                 "notes.tmp"):
        (tmp_path / name).write_text("")
    removed = remove_stale_temporaries(tmp_path, "checkpoint_*.pth.tar")
    assert [p.name for p in removed] == [".checkpoint_0001.pth.tar.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".config.yaml.x1.tmp", "checkpoint_0001.pth.tar", "notes.tmp"]


# Writers that are not "a file replaced atomically": the decoded cache is built in a hidden
# folder renamed into place as a whole, the run lock is a lock file, the write probe checks
# permissions. Everything else writes through moco.utils.atomic.
NOT_FILE_WRITERS = {"moco/data/cache.py", "moco/utils/runlock.py", "moco/engine/rundir.py"}
_WRITES = re.compile(r"\bmkstemp\(|\bos\.replace\(|\.write_text\(|\.write_bytes\(|\bsavefig\(|"
                     r"open\([^)]*[\"'][wa]b?[\"']|\btorch\.save\(|\bnp\.save\(")


def test_every_writer_goes_through_the_one_atomic_write() -> None:
    found = []
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE.parent).as_posix()
        if rel in NOT_FILE_WRITERS or rel == "moco/utils/atomic.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if _WRITES.search(code) and "atomic" not in code and '"""' not in code:
                found.append(f"{rel}:{i}: {line.strip()}")
    allowed = [  # (file, what): folders moved into place, writes to an atomic writer's file
        ("moco/data/shard_writer.py", "os.replace("),  # a complete split folder
        ("moco/utils/checkpoint.py", "torch.save("),  # into atomic_write's file object
        ("moco/utils/runlog.py", "savefig(tmp"),  # into atomic_path's name
        ("moco/ablation/step_cost.py", "/proc/self/clear_refs"),  # a kernel interface
        ("moco/data/cifar_download.py", "os.replace("),  # a complete, checked folder
        # a download's part file: kept across runs to resume, never under the final name; the
        # rename follows its checksum and is fsynced as the atomic write's
        ("moco/utils/download.py", 'open(part, "ab"'),
        ("moco/utils/download.py", "os.replace(part, dest)"),
    ]
    found = [f for f in found if not any(f.startswith(k) and v in f for k, v in allowed)]
    assert not found, "writes outside moco.utils.atomic:\n" + "\n".join(found)
