"""Preemption, atomic checkpoints, no silent overwrite, the divergence guard and safe loading."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_FLAGS, fill_disk_after, run_cli

import moco.engine.loop as train_mod
import moco.utils.atomic as atomic_mod
import moco.utils.checkpoint as ckpt_mod
from moco.cli import build_parser
from moco.cli.pretrain import config_from_args
from moco.core.errors import RunError
from moco.engine.config import MocoConfig
from moco.engine.loop import Pretrainer
from moco.engine.rundir import list_checkpoints, newest_checkpoint
from moco.engine.training_step import StepResult
from moco.utils.checkpoint import CheckpointError, atomic_save, load_checkpoint
from moco.utils.signals import StopFlag

REPO = Path(__file__).resolve().parents[2]
_real_step = train_mod.train_step


pytestmark = pytest.mark.usefixtures("one_thread")




def make_cfg(data: Path, out: Path, *extra: str) -> MocoConfig:
    args = build_parser().parse_args(["pretrain", str(data), *TINY_FLAGS, "--output", str(out),
                                      "--knn-every", "0", *extra])
    return config_from_args(args)


def quiet(cfg: MocoConfig, **kw: Any) -> Pretrainer:
    return Pretrainer(cfg, log=lambda _m: None, progress=False, **kw)


def after_step(monkeypatch: pytest.MonkeyPatch, n: int, action: Any) -> None:
    """Call ``action(result)`` after the n-th training step (it may replace the result)."""
    count = {"n": 0}

    def step(*a: Any, **k: Any) -> StepResult:
        r = _real_step(*a, **k)
        count["n"] += 1
        if count["n"] == n:
            r = action(r) or r
        return r

    monkeypatch.setattr(train_mod, "train_step", step)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.update(extra)
    return env


# ----- signals ---------------------------------------------------------------------------------

def test_sigint_finishes_the_step_saves_and_says_how_to_resume(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs: list[str] = []
    after_step(monkeypatch, 3, lambda r: os.kill(os.getpid(), signal.SIGINT))
    cfg = make_cfg(tiny_data, tmp_path / "run", "--save-every-steps", "1", "--keep-last", "2")
    r = Pretrainer(cfg, log=logs.append, progress=False).run()
    assert r.stopped_early and r.checkpoint.name == "checkpoint_0000_step000003.pth.tar"
    assert load_checkpoint(r.checkpoint)["moco"]["global_step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [  # --keep-last 2
        "checkpoint_0000_step000002.pth.tar", "checkpoint_0000_step000003.pth.tar"]
    hint = next(line for line in "\n".join(logs).splitlines() if line.startswith("resume with:"))
    assert shlex.split(hint)[2:] == ["moco", "pretrain", str(tiny_data), "--output",
                                     str(tmp_path / "run"), "--resume", "auto"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_second_sigint_does_not_wait() -> None:
    flag = StopFlag()
    flag(signal.SIGTERM, None)
    assert flag.signal == signal.SIGTERM
    flag(signal.SIGTERM, None)  # a repeated SIGTERM still waits for the step
    with pytest.raises(KeyboardInterrupt):
        flag(signal.SIGINT, None)


@pytest.mark.slow
def test_sigterm_to_the_process_group_of_a_cli_run(tiny_data: Path, tmp_path: Path) -> None:
    """`python -m moco pretrain` with a DataLoader worker; SIGTERM to the whole process group
    (as a scheduler does): exit 0, a checkpoint saved, and the printed command resumes it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moco", "pretrain", str(tiny_data), *TINY_FLAGS, "--output",
           str(out), "--save-every-steps", "1", "--knn-every", "0", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), start_new_session=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoint_*.pth.tar")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal 15" in stdout, stdout
    ckpts = list_checkpoints(out)
    assert ckpts and load_checkpoint(ckpts[-1])["moco"]["global_step"] >= 1
    hint = next(line for line in stdout.splitlines() if line.startswith("resume with: "))
    argv = shlex.split(hint.removeprefix("resume with: "))
    assert argv[:2] == ["moco", "pretrain"]
    res = subprocess.run([sys.executable, "-m", "moco", *argv[1:], "--no-progress"],
                         capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "changed settings" not in res.stdout
    final = load_checkpoint(newest_checkpoint(out) or out)
    assert final["epoch"] == 2 and final["moco"]["global_step"] == 8


# ----- atomic saves ----------------------------------------------------------------------------

def test_failed_save_keeps_the_previous_file_and_leaves_no_partial_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint_0000.pth.tar"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600

    def broken_save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    with pytest.raises(OSError):
        atomic_save({"epoch": 1}, tmp_path / "checkpoint_0001.pth.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0000.pth.tar"]
    assert load_checkpoint(path)["epoch"] == 1


def test_a_full_disk_mid_save_is_an_oserror_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real torch.save whose file writes fail part-way (the disk fills up): torch reports only
    "unexpected pos"; atomic_save raises the write's own OSError and removes the partial file."""
    path = tmp_path / "checkpoint_0000.pth.tar"
    real_fdopen = os.fdopen

    def filling_fdopen(fd: int, mode: str) -> Any:
        return fill_disk_after(real_fdopen(fd, mode), 4096, monkeypatch)

    monkeypatch.setattr(atomic_mod.os, "fdopen", filling_fdopen)
    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_save({"w": torch.ones(100_000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_failed_save_during_training(tiny_data: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The 3rd save of a --save-every-steps 1 run fails: the run stops with the error, the
    checkpoint of step 2 is the newest and intact, and no partial file is left behind."""
    real_save = torch.save
    calls = {"n": 0}

    def flaky(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"garbage")
            raise OSError(5, "Input/output error")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", flaky)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="cannot save the checkpoint .*step000003.*Input/output "
                       "error; the previous checkpoint .*step000002.pth.tar is intact"):
        quiet(make_cfg(tiny_data, out, "--save-every-steps", "1", "--keep-last", "0")).run()
    names = sorted(p.name for p in out.glob("*checkpoint*"))
    assert names == ["checkpoint_0000_step000001.pth.tar", "checkpoint_0000_step000002.pth.tar"]
    newest = newest_checkpoint(out)
    assert newest is not None and load_checkpoint(newest)["moco"]["global_step"] == 2


def test_resume_auto_skips_a_truncated_newest_checkpoint(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    after_step(monkeypatch, 3, lambda r: os.kill(os.getpid(), signal.SIGTERM))
    quiet(make_cfg(tiny_data, out, "--save-every-steps", "1", "--keep-last", "0")).run()
    ckpts = list_checkpoints(out)
    assert [load_checkpoint(p)["moco"]["global_step"] for p in ckpts] == [1, 2, 3]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 3])  # as a crash of a non-atomic writer would
    (out / ".checkpoint_0000_step000004.pth.tar.x1y2.tmp").write_bytes(b"left by a kill")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(ckpts[-1])
    logs: list[str] = []
    p = Pretrainer(make_cfg(tiny_data, out, "--resume", "auto"), log=logs.append, progress=False)
    assert p.state.global_step == 2
    assert any("skipping" in m and ckpts[-1].name in m for m in logs)
    assert not list(out.glob(".*.tmp"))  # stale temporary removed
    p.runlog.close()


def test_keep_last_keeps_the_newest_by_training_position(tmp_path: Path) -> None:
    """Saves within one tick of a coarse file-system clock are ordered by their position."""
    names = ["checkpoint_0000.pth.tar", "checkpoint_0001_step000002.pth.tar",
             "checkpoint_0000_step000003.pth.tar", "checkpoint_0001.pth.tar"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
        os.utime(tmp_path / n, ns=(10**18, 10**18))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint_0000_step000003.pth.tar", "checkpoint_0000.pth.tar",
        "checkpoint_0001_step000002.pth.tar", "checkpoint_0001.pth.tar"]


# ----- no silent overwrite ---------------------------------------------------------------------

def test_no_silent_overwrite(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    old = out / "checkpoint_0005.pth.tar"
    atomic_save({"epoch": 6}, old)
    rc, _, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out)])
    assert rc == 2 and "already holds a run" in err and "--resume auto" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert old.is_file()
    # --overwrite replaces it (checked before any training: the constructor does it).
    p = quiet(make_cfg(tiny_data, out), overwrite=True)
    assert not old.exists() and (out / "config.yaml").is_file()
    p.runlog.close()


# ----- divergence guard ------------------------------------------------------------------------

def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    after_step(monkeypatch, 3, lambda r: StepResult(float("nan"), r.acc1))
    with pytest.raises(RunError) as e:
        quiet(make_cfg(tiny_data, out, "--save-every-steps", "1")).run()
    msg = str(e.value)
    assert "nan" in msg and "epoch 1, step 3" in msg and "global step 3" in msg
    good = out / "checkpoint_0000_step000002.pth.tar"
    assert str(good) in msg and "--lr" in msg
    assert load_checkpoint(good)["moco"]["global_step"] == 2
    assert newest_checkpoint(out) == good  # nothing was saved after the NaN


def test_huge_lr_diverges_with_a_clear_cli_error(tiny_data: Path, tmp_path: Path) -> None:
    rc, _, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(tmp_path / "r"),
                       "--knn-every", "0", "--lr", "1e30", "--epochs", "3"])
    assert rc == 2 and "training diverged" in err and "Traceback" not in err
    assert re.search(r"at epoch \d+, step \d+", err)


# ----- safe loading ----------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_checkpoint_is_refused_without_running_it(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint_0000.pth.tar"
    payload = {"epoch": 1, "state_dict": {}, "x": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="cannot be loaded safely|not a readable"):
        load_checkpoint(path)
    assert not marker.exists()
    assert newest_checkpoint(tmp_path) is None  # --resume auto passes over it too
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    calls = []
    for f in sorted((REPO / "moco").rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f.name, text[m.start():i]))
        assert "pickle.load(" not in text and "pickle.loads(" not in text, f
    assert calls, "no torch.load found: the test is looking in the wrong place"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


@pytest.mark.slow
def test_a_run_writes_only_into_its_run_folder_and_the_cache(tiny_data: Path,
                                                             tmp_path: Path) -> None:
    """HOME, the working directory and TMPDIR are empty temporary folders: after a run (kNN and
    plot included) only the run folder and moco's cache folder hold new files."""
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    env = subprocess_env(HOME=str(home), TMPDIR=str(tmp))
    for var in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MOCO_CACHE",
                "TORCH_HOME"):
        env.pop(var, None)
    flags = list(TINY_FLAGS)
    flags[flags.index("--epochs") + 1] = "1"
    res = subprocess.run([sys.executable, "-m", "moco", "pretrain", str(tiny_data), *flags,
                          "--output", "run"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (cwd / "run" / "checkpoint_0000.pth.tar").is_file()
    outside = [p for p in cwd.rglob("*") if not p.is_relative_to(cwd / "run")]
    outside += [p for p in home.rglob("*") if p.is_file()
                and not p.is_relative_to(home / ".cache" / "moco")]
    outside += list(tmp.rglob("*"))
    assert outside == []


# ----- what diverged, and never a NaN checkpoint called good --------------------------------------

def poison(path: Path) -> None:
    """Put a NaN in a checkpoint's query encoder, as a run that diverged before saving it."""
    ckpt = load_checkpoint(path)
    ckpt["state_dict"]["module.encoder_q.conv1.weight"][0, 0, 0, 0] = float("nan")
    atomic_save(ckpt, path)


def test_divergence_names_the_newest_checkpoint_with_finite_weights(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"

    def nan_and_poison(r: StepResult) -> StepResult:
        poison(out / "checkpoint_0000_step000002.pth.tar")  # saved after step 2, already bad
        return StepResult(float("nan"), r.acc1)

    after_step(monkeypatch, 3, nan_and_poison)
    with pytest.raises(RunError) as e:
        quiet(make_cfg(tiny_data, out, "--save-every-steps", "1", "--keep-last", "0")).run()
    msg = str(e.value)
    good, bad = out / "checkpoint_0000_step000001.pth.tar", out / "checkpoint_0000_step000002.pth.tar"
    assert "the training loss (InfoNCE) became nan at epoch 1, step 3 (global step 3)" in msg
    assert f"the newest checkpoint with finite weights is {good} ({bad} already holds NaN/Inf)" \
        in msg and f"continue with --resume {good}" in msg
    assert "the last good" not in msg and "--lr (now 0.03)" in msg


def test_resume_auto_refuses_a_newest_checkpoint_with_nan_weights(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    after_step(monkeypatch, 2, lambda r: os.kill(os.getpid(), signal.SIGTERM))
    quiet(make_cfg(tiny_data, out, "--save-every-steps", "1", "--keep-last", "0")).run()
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 2
    poison(ckpts[-1])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=rf"newest readable checkpoint {re.escape(str(ckpts[-1]))}"
                       rf" holds NaN/Inf weights \(module.encoder_q.conv1.weight\).*--resume "
                       rf"{re.escape(str(ckpts[0]))}"):
        quiet(make_cfg(tiny_data, out, "--resume", "auto"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # The one it names resumes.
    p = quiet(make_cfg(tiny_data, out, "--resume", str(ckpts[0])))
    assert p.state.global_step == 1
    p.close()


def test_resume_auto_starts_over_only_in_a_folder_without_checkpoints(
        tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')  # killed before a save
    logs: list[str] = []
    p = Pretrainer(make_cfg(tiny_data, out, "--resume", "auto"), log=logs.append, progress=False)
    assert any("no checkpoint in" in m and "starting from scratch" in m for m in logs)
    assert p.state.global_step == 0 and not (out / "metrics.jsonl").exists()
    p.close()
