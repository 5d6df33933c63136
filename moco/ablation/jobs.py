"""Several runs of a grid trained at once, each in a process of its own (``moco ablate
--jobs N``): each process trains one run with :func:`moco.ablation.runner.run_grid`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moco.ablation.grid import AblationError, AblationSpec, load_spec
from moco.ablation.runner import RunOutcome, plan_runs, run_grid
from moco.utils.logs import Log, show_on_stderr

_log = logging.getLogger(__name__)


JOB_OUTCOME = "RUN_OUTCOME "


def run_grid_jobs(
    spec: AblationSpec,
    output: Path,
    *,
    jobs: int,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    log: Log = _log.info,
) -> list[RunOutcome]:
    """:func:`run_grid` with up to ``jobs`` runs training at once, each in a process of its
    own. On a CPU each gets ``cpu_count // jobs`` torch threads (unless ``OMP_NUM_THREADS``
    is set): for models too small to use every core of one process (docs/ablations.md).

    The whole grid is checked first (:func:`~moco.ablation.runner.plan_runs`). Each process
    runs :func:`run_grid` for one run (finished runs skipped, interrupted ones resumed, as
    ever); its log lines are passed to ``log``. SIGTERM or SIGINT is passed on to the running processes, which checkpoint
    and stop; runs not started yet are reported as stopped, and re-running continues the grid.
    """
    if jobs < 1:
        raise AblationError(f"--jobs must be at least 1, got {jobs}")
    if spec.source is None:
        raise AblationError("running several runs at once needs the grid as a file (spec.source)")
    names = [p.run.name for p in plan_runs(spec, output, overrides, only, overwrite,
                                           retry_failed)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen[str], _JobReader]] = {}
    outcomes: dict[str, RunOutcome] = {}
    got: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        got.append(signum)
        for proc, _ in running.values():
            proc.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    try:
        while running or (pending and not got):
            while pending and len(running) < jobs and not got:
                name = pending.pop(0)
                running[name] = _start_job(spec, output, name, overrides, overwrite, retry_failed,
                                           env, log)
            for name in [n for n, (proc, _) in running.items() if proc.poll() is not None]:
                proc, reader = running.pop(name)
                reader.join()
                outcomes[name] = reader.outcome or RunOutcome(
                    name, "failed", f"its process ended with exit code {proc.returncode} "
                    f"({reader.last_line or 'no output'})")
            time.sleep(0.1)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return [outcomes.get(n, RunOutcome(n, "stopped")) for n in names]


class _JobReader(threading.Thread):
    """Passes a job's output lines to ``log`` and keeps its outcome line."""

    def __init__(self, proc: subprocess.Popen[str], log: Log) -> None:
        super().__init__(daemon=True)
        self.proc, self.log = proc, log
        self.outcome: RunOutcome | None = None
        self.last_line = ""

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(JOB_OUTCOME):
                self.outcome = RunOutcome(**json.loads(line[len(JOB_OUTCOME):]))
            elif line.strip():
                self.last_line = line
                self.log(line)


def _start_job(spec: AblationSpec, output: Path, name: str, overrides: dict[str, Any] | None,
               overwrite: bool, retry_failed: bool, env: dict[str, str],
               log: Log) -> tuple[subprocess.Popen[str], _JobReader]:
    payload = json.dumps({"grid": str(spec.source), "output": str(output), "run": name,
                          "overrides": overrides or {}, "overwrite": overwrite,
                          "retry_failed": retry_failed})
    # A session of its own: a Ctrl-C in the terminal reaches only this process, which passes
    # it on once (a second one to a run means "stop now, do not wait for the step").
    proc = subprocess.Popen([sys.executable, "-c", "from moco.ablation.jobs import job_main; job_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write(payload)
    proc.stdin.close()
    reader = _JobReader(proc, log)
    reader.start()
    return proc, reader


def job_main() -> None:
    """Entry of one job of :func:`run_grid_jobs`: JSON on stdin, log lines and one outcome
    line on stdout."""
    p = json.loads(sys.stdin.read())
    show_on_stderr()  # the library's records reach the grid's log (stderr joins stdout)
    try:
        spec = load_spec(p["grid"])
        outcome = run_grid(spec, Path(p["output"]), overrides=p["overrides"], only=[p["run"]],
                           overwrite=p["overwrite"], retry_failed=p["retry_failed"],
                           progress=False, log=lambda m: print(m, flush=True))[0]
    except Exception as e:  # e.g. unreadable data: not a diverged run, so no FAILED.txt
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"[{p['run']}] stopped by an error: {msg}", flush=True)
        outcome = RunOutcome(p["run"], "failed", msg)
    print(JOB_OUTCOME + json.dumps(dataclasses.asdict(outcome)), flush=True)
