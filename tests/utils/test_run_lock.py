"""Two processes, one folder: the run folder's lock and the decoded cache's abandoned build
folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_FLAGS, make_image_folder, run_cli, save_original_checkpoint

from moco.core.errors import FolderInUseError
from moco.data.cache import cached_images
from moco.data.cache_dir import BUILDING, hold_lock, remove_abandoned_builds
from moco.data.folders import image_folder
from moco.utils.runlock import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def holder(folder: Path) -> subprocess.Popen[str]:
    """Another process that takes the lock of ``folder`` and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from moco.utils.runlock import RunLock
        RunLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_a_second_process_is_refused_naming_the_holder(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    p = holder(out)
    try:
        for extra in ([], ["--resume", "auto"]):
            rc, _, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out),
                                  "--knn-every", "0", *extra])
            assert rc == 2 and "Traceback" not in err, err
            assert f"is in use by process {p.pid}" in err and "wait for it to finish" in err
        assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint_*"))
    finally:
        p.kill()
        p.wait()
    # The holder is gone (killed: its lock file is left): the next run takes it over.
    assert (out / LOCK_NAME).is_file()
    rc, stdout, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out),
                               "--knn-every", "0", "--epochs", "1"])
    assert rc == 0, err
    assert f"taking over the lock left by process {p.pid}" in stdout + err
    assert not (out / LOCK_NAME).exists()  # released (and removed) at the end of the run


def test_lincls_run_folder_is_locked_too(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    ckpt = tmp_path / "m.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    out = tmp_path / "lin"
    out.mkdir()
    p = holder(out)
    try:
        rc, _, err = run_cli(["lincls", str(data), "--pretrained", str(ckpt), "--output", str(out),
                              "--epochs", "1", "-j", "0", "--device", "cpu", "--no-progress",
                              "--image-size", "32", "--fast"])
        assert rc == 2 and f"is in use by process {p.pid}" in err, err
    finally:
        p.kill()
        p.wait()


def test_lock_lifecycle_in_one_process(tmp_path: Path) -> None:
    logs: list[str] = []
    a = RunLock(tmp_path, log=logs.append).acquire()
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}\n")
    b = RunLock(tmp_path, log=logs.append).acquire()  # the same process: replaces its own lock
    assert not a.held and b.held and logs == []
    b.release()
    b.release()  # twice is fine
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("pid 4194304\nhost elsewhere\nsince 2020-01-01 00:00:00\n")
    with RunLock(tmp_path, log=logs.append):
        pass
    assert logs and "process 4194304 on elsewhere" in logs[0] and "no longer running" in logs[0]


def test_refusal_message_names_pid_host_and_start(tmp_path: Path) -> None:
    p = holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by process {p.pid} on \S+, since "
                           r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()


# ----- the decoded cache: a build stopped by a signal ------------------------------------------

def test_a_build_folder_left_by_a_killed_process_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    code = textwrap.dedent(f"""
        import os, signal, tempfile
        from pathlib import Path
        from moco.data.cache_dir import BUILDING, hold_lock
        tmp = Path(tempfile.mkdtemp(prefix=".train-0123abcd-", suffix=BUILDING, dir={str(root)!r}))
        (tmp / "images.npy").write_bytes(b"half written")
        hold_lock(tmp)
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -signal.SIGTERM
    left = list(root.glob(f".*{BUILDING}"))
    assert len(left) == 1
    # A build in progress (its process holds the folder's lock) is left alone.
    busy = root / f".other-1-x{BUILDING}"
    busy.mkdir()
    fd = hold_lock(busy)
    try:
        logs: list[str] = []
        assert remove_abandoned_builds(root, logs.append) == left
        assert not left[0].exists() and busy.exists() and "1 unfinished" in logs[0]
    finally:
        os.close(fd)
    # And the next build of an entry cleans up as it starts.
    src_dir = tmp_path / "imgs" / "train"
    src_dir.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(src_dir / f"{i}.png")
    decoded = cached_images(image_folder(src_dir), root, log=lambda _m: None)
    assert decoded is not None and len(decoded) == 3
    assert not busy.exists() and not list(root.glob(f".*{BUILDING}"))


def test_sigterm_during_a_real_cache_build_leaves_nothing_a_later_run_keeps(
        tmp_path: Path) -> None:
    """A process decoding many images into the cache is stopped by SIGTERM mid-build; the
    next build in that cache folder removes what it left."""
    data = tmp_path / "imgs" / "train"
    data.mkdir(parents=True)
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(data / f"{i}.png")
    root = tmp_path / "cache"
    code = textwrap.dedent(f"""
        from moco.data.cache import cached_images
        from moco.data.folders import image_folder
        cached_images(image_folder(__import__("pathlib").Path({str(data)!r})), {str(root)!r},
                      workers=1, log=lambda m: print(m, flush=True))
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("decoding 300 images"), line
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGTERM
    if not list(root.glob(f".*{BUILDING}")):
        pytest.skip("the build finished before the signal arrived (a fast machine)")
    decoded = cached_images(image_folder(data), root, workers=1, log=lambda _m: None)
    assert decoded is not None and len(decoded) == 300
    assert not list(root.glob(f".*{BUILDING}"))
