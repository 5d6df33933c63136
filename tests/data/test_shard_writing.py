"""Writing shards never damages what is there (moco.data.shard_writer): an OUT that is another
dataset is refused, --overwrite leaves no old split that the new data lacks, a SIGTERM during
an overwrite leaves the old shards or the complete new ones, two writers on one OUT never
delete each other's files; and every folder pretrain accepts can be sharded."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import make_image_folder, run_cli

from moco.core.errors import FolderInUseError
from moco.data.shard_writer import SplitWritten, parse_size, write_shards
from moco.data.shards import ShardSource
from moco.data.source import DataError
from moco.data.splits import find_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = parse_size("25KB")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ----- an OUT that is another dataset ----------------------------------------------------------
@pytest.mark.parametrize("where", ["split", "root"])
def test_an_out_that_holds_another_dataset_is_refused_untouched(tmp_path: Path, where: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    other = make_image_folder(tmp_path / "other", per_class=2, splits=("train",))
    out = other if where == "split" else other / "train"  # train/ of class folders, or them
    before = _tree(other)
    with pytest.raises(DataError, match="another dataset|holds images"):
        write_shards(data, out, SIZE, progress=False)
    with pytest.raises(DataError, match="another dataset|holds images"):
        write_shards(data, out, SIZE, overwrite=True, progress=False)
    assert _tree(other) == before


# ----- --overwrite -----------------------------------------------------------------------------
def test_overwrite_removes_an_old_split_the_new_data_lacks(tmp_path: Path) -> None:
    old = make_image_folder(tmp_path / "old", per_class=4, splits=("train", "val"))
    new = make_image_folder(tmp_path / "new", per_class=3, splits=("train", "test"), seed=1)
    out = tmp_path / "out"
    write_shards(old, out, SIZE, progress=False)
    write_shards(new, out, SIZE, overwrite=True, progress=False)
    splits = find_dataset(out)
    assert not list((out / "val").glob("*.tar")) if (out / "val").exists() else True
    assert isinstance(splits.test, ShardSource) and splits.test.name.endswith("test")
    assert len(splits.train) == 6 and len(splits.test) == 6


def _writer_script(data: Path, out: Path, kill_in: str, after: int) -> str:
    """A `write_shards --overwrite` that SIGTERMs itself at the ``after``-th call of
    ``kill_in`` (a function of moco.data.shard_writer: ``_member`` while writing, ``_move``
    while the new shards replace the old)."""
    return textwrap.dedent(f"""
        import os, signal
        import moco.data.shard_writer as W
        from moco.data.shard_writer import parse_size, write_shards
        n = {{"k": 0}}
        target = {kill_in!r}
        real = getattr(W, target)
        def hooked(*a, **k):
            n["k"] += 1
            if n["k"] == {after}:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        setattr(W, target, hooked)
        from pathlib import Path
        write_shards(Path({str(data)!r}), Path({str(out)!r}), parse_size("25KB"), seed=1,
                     overwrite=True, progress=False)
    """)


@pytest.mark.parametrize("kill_in,after", [("_member", 7), ("_member", 40), ("_move", 2),
                                           ("_move", 9)])
def test_a_sigterm_during_an_overwrite_leaves_the_old_or_the_complete_new_shards(
        tmp_path: Path, kill_in: str, after: int) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8)
    out, ref_old, ref_new = tmp_path / "out", tmp_path / "ref_old", tmp_path / "ref_new"
    write_shards(data, out, SIZE, seed=0, progress=False)
    write_shards(data, ref_old, SIZE, seed=0, progress=False)
    write_shards(data, ref_new, SIZE, seed=1, progress=False)
    old, new = _tree(ref_old), _tree(ref_new)
    r = subprocess.run([sys.executable, "-c", _writer_script(data, out, kill_in, after)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (-signal.SIGTERM, 0), r.stderr
    got = {k: v for k, v in _tree(out).items()  # a killed writer's hidden leftovers aside
           if not any(part.startswith(".") for part in Path(k).parts)}
    assert got in (old, new), sorted(got)
    assert find_dataset(out).train is not None


# ----- two writers on one OUT ------------------------------------------------------------------
def test_a_second_writer_on_the_same_out_refuses_and_deletes_nothing(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    write_shards(data, out, SIZE, progress=False)
    before = _tree(out)
    fd = os.open(out / ".lock", os.O_CREAT | os.O_RDWR)
    os.write(fd, b"pid 4242\nhost elsewhere\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer holds OUT
    try:
        with pytest.raises(FolderInUseError, match="4242"):
            write_shards(data, out, SIZE, overwrite=True, progress=False)
    finally:
        os.close(fd)
    assert {k: v for k, v in _tree(out).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}


def test_two_shard_commands_at_once_one_wins_and_the_result_is_complete(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=12)
    out, ref = tmp_path / "out", tmp_path / "ref"
    write_shards(data, ref, SIZE, progress=False)
    slow = textwrap.dedent(f"""
        import sys, time
        import moco.data.shard_writer as W
        real = W._member
        W._member = lambda *a: (time.sleep(0.02), real(*a))[1]  # both write at once
        from moco.cli import main
        sys.exit(main(["shard", {str(data)!r}, {str(out)!r}, "--shard-size", "25KB",
                       "--no-progress"]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)  # type: ignore[union-attr]
    assert [rc for rc, _ in results] == [0, 2], results
    assert "in use" in results[1][1] or "already holds" in results[1][1], results[1][1]
    assert "Traceback" not in results[1][1]
    assert _tree(out) == _tree(ref)


# ----- what can be sharded, and what it says ---------------------------------------------------
@pytest.mark.parametrize("layout", ["flat", "classes"])
def test_a_folder_pretrain_accepts_without_train_is_sharded_as_train(tmp_path: Path,
                                                                     layout: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3, splits=("train",)) / "train"
    if layout == "flat":
        for i, p in enumerate(sorted(data.rglob("*.png"))):
            p.rename(data / f"{i}.png")
        for d in data.iterdir():
            if d.is_dir():
                d.rmdir()
    pretrain_sees = find_dataset(data).train
    done = write_shards(data, tmp_path / "out", SIZE, progress=False)
    assert [s.split for s in done] == ["train"]
    shards = find_dataset(tmp_path / "out").train
    assert len(shards) == len(pretrain_sees) == 6
    assert shards.labeled == pretrain_sees.labeled


def test_sizes_print_in_a_unit_that_shows_them(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    rc, out, err = run_cli(["shard", str(data), str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, err
    assert "0.0 MB" not in out and " kB" in out
    said = {n: SplitWritten("train", 1, [], n).describe(Path("o")) for n in (512, 4_200, 3_100_000,
                                                                              7 * 10**9)}
    assert "512 B" in said[512] and "4.2 kB" in said[4_200] and "3.1 MB" in said[3_100_000]
    assert "7.0 GB" in said[7 * 10**9]
