"""Fault injection: a tiny CPU pretraining run is killed with SIGKILL at random points (during
start-up, mid-step, mid-save), resumed with ``--resume auto`` each time, and must end
bit-for-bit where an uninterrupted run ends.

    .venv/bin/pytest -m slow tests/e2e/test_fault_injection.py -s     # prints the table of kills

``MOCO_FAULT_KILLS`` (default 5), ``MOCO_FAULT_SEED`` (default 0) and ``MOCO_FAULT_EPOCHS``
(default 2, of 4 steps) change the number of kill points, where they fall and the run length.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_FLAGS, assert_same_final_state, metrics

from moco.engine.rundir import checkpoint_age, list_checkpoints, newest_checkpoint
from moco.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 4  # tiny_data: 32 images, batch 8
EPOCHS = int(os.environ.get("MOCO_FAULT_EPOCHS", "2"))
FLAGS = [*TINY_FLAGS, "--knn-every", "0", "--save-every-steps", "1", "--epochs", str(EPOCHS)]


def _env() -> dict[str, str]:
    # One thread: bit-exactness needs the same thread count in every attempt.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _position(run_dir: Path) -> int:
    """Global step of the newest checkpoint file in ``run_dir`` (0 if none)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return 0
    _, epoch, step = checkpoint_age(ckpts[-1])
    return epoch * STEPS_PER_EPOCH + step


def _start(data: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "moco", "pretrain", str(data), *FLAGS, "--output", str(out),
         *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(tiny_data: Path, tmp_path: Path) -> None:
    kills = int(os.environ.get("MOCO_FAULT_KILLS", "5"))
    rng = random.Random(int(os.environ.get("MOCO_FAULT_SEED", "0")))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _start(tiny_data, ref_dir)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    total = EPOCHS * STEPS_PER_EPOCH

    # Kill points: a random training position each (0 = during start-up), sorted; each attempt
    # is killed a random 0-0.3 s after the run has saved that position, so the kill lands in
    # start-up or resume, inside a step, or in the middle of a checkpoint write.
    targets = sorted(rng.randrange(0, total) for _ in range(kills))
    rows: list[str] = []
    attempts = 0
    for target in targets:
        attempts += 1
        proc = _start(tiny_data, run_dir, "--resume", "auto")
        before = _position(run_dir)
        delay = rng.uniform(0.0, 0.3)
        while proc.poll() is None and _position(run_dir) < target:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:  # finished before the kill landed
            assert proc.returncode == 0, proc.communicate()[1]
            rows.append(f"| {attempts} | - | {_position(run_dir)} | finished before the kill |")
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        after = _position(run_dir)
        mid_save = bool(list(run_dir.glob(".checkpoint_*.tmp")))
        where = ("mid-save (temporary file left)" if mid_save else
                 "after the last step (start-up, final save or exit)" if before == total else
                 "before its first step (start-up or resume)" if after == before else
                 "inside or between steps")
        rows.append(f"| {attempts} | step {target} saved + {delay:.2f} s | {after} | {where} |")
        # After every kill: every file under a checkpoint name loads; the newest is usable.
        for p in list_checkpoints(run_dir):
            load_checkpoint(p)
        assert after == 0 or newest_checkpoint(run_dir) is not None
    attempts += 1
    proc = _start(tiny_data, run_dir, "--resume", "auto")  # the last attempt runs to the end
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    print("\n| attempt | SIGKILL when | newest checkpoint then (global step) | the kill hit |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    assert_same_final_state(load_checkpoint(newest_checkpoint(ref_dir) or ref_dir),
                            load_checkpoint(newest_checkpoint(run_dir) or run_dir))
    assert metrics(run_dir) == metrics(ref_dir)
    assert not list(run_dir.glob(".*.tmp"))
    print(f"{sum('finished' not in r for r in rows)} SIGKILLs, {attempts} attempts: final state "
          "bit-exact, metrics.jsonl equal")
