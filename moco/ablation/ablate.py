"""``moco ablate``: train the runs of a grid one after the other (resumable run by run),
measure the mechanisms' cost per step, then write the report (MoCo v1 §4.1 / App. A.9,
MoCo v2 Tables 1-3). The grid file format is in
:mod:`moco.ablation.grid`, the report in :mod:`moco.ablation.report`."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.ablation.grid import (
    FAILED_MARKER,
    IGNORED_WHEN_COMPARING,
    AblationError,
    AblationSpec,
    RunSpec,
    default_output,
    load_spec,
    run_config,
    run_status,
    settings_mismatch,
)
from moco.ablation.report import write_report
from moco.ablation.step_cost import measure_isolated, measure_step_cost
from moco.engine.config import MocoConfig
from moco.utils.atomic import atomic_write_text
from moco.utils.logs import Log, show_on_stderr

_log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    name: str
    status: str  # done | failed | partial | new | stopped
    message: str = ""


@dataclass
class RunPlan:
    """A run to train or skip, checked before the first run of the grid starts."""

    run: RunSpec
    run_dir: Path
    cfg: MocoConfig
    status: str
    changed: bool  # the folder holds a run with other settings (retrained with overwrite)


def plan_runs(spec: AblationSpec, output: Path, overrides: dict[str, Any] | None = None,
              only: Sequence[str] | None = None, overwrite: bool = False) -> list[RunPlan]:
    """Every selected run's settings validated and its folder's state read, so that a grid
    with a bad run fails at once rather than hours in."""
    runs = [r for r in spec.runs if not only or r.name in only]
    if only:
        missing = sorted(set(only) - {r.name for r in spec.runs})
        if missing:
            raise AblationError(f"--only: no run named {missing}; runs: {[r.name for r in spec.runs]}")
    plans = []
    for r in runs:
        run_dir = output / r.name
        cfg = run_config(spec, r, run_dir, overrides)
        try:
            cfg.validate()
        except ValueError as e:
            raise AblationError(f"run {r.name}: {e}") from None
        status = run_status(run_dir, cfg.epochs)
        diffs = settings_mismatch(run_dir, cfg) if status != "new" else []
        if diffs and not overwrite:
            raise AblationError(
                f"{run_dir} holds a run with other settings ({'; '.join(diffs)}); delete that "
                "folder, choose another --output, or pass --overwrite to retrain it")
        plans.append(RunPlan(r, run_dir, cfg, status, bool(diffs)))
    return plans


def run_grid(
    spec: AblationSpec,
    output: Path,
    *,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    log: Log = _log.info,
) -> list[RunOutcome]:
    """Train every run of ``spec`` that is not finished yet, one after the other.

    Every run's settings are validated before the first one starts. A finished run is
    skipped; an interrupted one resumed (``resume=auto``); a run whose folder holds a run
    with other settings is refused unless ``overwrite``. A run that stops with a
    :class:`~moco.core.errors.RunError` (e.g. the loss became NaN) is recorded in
    ``FAILED.txt`` and the grid goes on. A signal (Ctrl-C) stops the grid after the
    current run has checkpointed; re-running the same command continues it.
    """
    from moco.core.errors import RunError
    from moco.engine.loop import pretrain

    plans = plan_runs(spec, output, overrides, only, overwrite)
    outcomes = []
    for i, plan in enumerate(plans):
        r, run_dir, cfg, status, changed = plan.run, plan.run_dir, plan.cfg, plan.status, plan.changed
        head = f"[{spec.name} {i + 1}/{len(plans)} {r.name}]"
        fresh = changed or (status == "failed" and retry_failed)
        if status == "done" and not fresh:
            log(f"{head} finished earlier: skipped")
            outcomes.append(RunOutcome(r.name, "done"))
            continue
        if status == "failed" and not fresh:
            msg = (run_dir / FAILED_MARKER).read_text().strip()
            log(f"{head} failed earlier ({msg.splitlines()[0] if msg else ''}): skipped "
                "(--retry-failed to run it again)")
            outcomes.append(RunOutcome(r.name, "failed", msg))
            continue
        if fresh:
            (run_dir / FAILED_MARKER).unlink(missing_ok=True)
            log(f"{head} training from scratch")
        elif status == "partial":
            cfg = dataclasses.replace(cfg, resume="auto")
            log(f"{head} resuming")
        else:
            log(f"{head} training")
        def run_log(msg: str, head: str = head) -> None:
            log(f"{head} {msg}")

        try:
            result = pretrain(cfg, log=run_log, progress=progress, overwrite=fresh)
        except RunError as e:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / FAILED_MARKER, str(e) + "\n")
            log(f"{head} FAILED: {e}")
            outcomes.append(RunOutcome(r.name, "failed", str(e)))
            continue
        if result.stopped_early:
            log(f"{head} stopped; re-run the same command to continue the grid")
            outcomes.append(RunOutcome(r.name, "stopped"))
            return outcomes
        outcomes.append(RunOutcome(r.name, "done"))
    return outcomes



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
    is set): small models use two cores poorly, so two one-thread runs on a 2-core machine
    train 1.4x the images per second of one two-thread run (docs/ablations.md).

    The runs' settings are all validated first. Each process runs :func:`run_grid` for one
    run (finished runs skipped, interrupted ones resumed, as ever); its log lines are passed
    to ``log``. SIGTERM or SIGINT is passed on to the running processes, which checkpoint
    and stop; runs not started yet are reported as stopped, and re-running continues the grid.
    """
    if jobs < 1:
        raise AblationError(f"--jobs must be at least 1, got {jobs}")
    if spec.source is None:
        raise AblationError("running several runs at once needs the grid as a file (spec.source)")
    names = [p.run.name for p in plan_runs(spec, output, overrides, only, overwrite)]
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
    proc = subprocess.Popen([sys.executable, "-c", "from moco.ablation.ablate import job_main; job_main()"],
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


def _train_size(cfg: MocoConfig) -> int:
    from moco.data.splits import find_dataset

    if cfg.train_subset:
        return int(cfg.train_subset)
    try:
        return len(find_dataset(cfg.data).train)
    except ValueError:
        return 50000


def run_cost(spec: AblationSpec, output: Path, *, overrides: dict[str, Any] | None = None,
             log: Log = _log.info) -> list[dict[str, Any]]:
    """Measure every (mechanism, batch size) of ``spec.cost``; results cached in cost.json
    (a point is measured again only if its settings changed or it failed)."""
    assert spec.cost is not None
    c = spec.cost
    path = output / "cost.json"
    cached: dict[str, dict[str, Any]] = {}
    if path.is_file():
        try:
            cached = {p["key"]: p for p in json.loads(path.read_text()).get("points", [])}
        except (ValueError, KeyError, TypeError):
            cached = {}
    base_run = RunSpec("cost", dict(c.settings))
    points = []
    for mech in c.mechanisms:
        for b in c.batch_sizes:
            cfg = run_config(spec, base_run, output / "cost", {**(overrides or {}),
                             "mechanism": mech, "batch_size": b})
            if cfg.moco_k < b and mech == "moco":
                cfg = dataclasses.replace(cfg, moco_k=b)
            key = json.dumps({k: v for k, v in cfg.to_dict().items()
                              if k not in IGNORED_WHEN_COMPARING} | {"steps": c.steps,
                             "warmup": c.warmup}, sort_keys=True, default=str)
            if key in cached and "error" not in cached[key]:
                points.append(cached[key])
                continue
            n = _train_size(cfg)
            log(f"[{spec.name} cost] {mech}, batch {b}: {c.warmup} + {c.steps} steps")
            r = (measure_isolated(cfg, n, c.steps, c.warmup) if c.isolate
                 else measure_step_cost(cfg, n, c.steps, c.warmup))
            r["key"] = key
            if "error" in r:
                log(f"[{spec.name} cost] {mech}, batch {b}: {r['error']}")
            points.append(r)
            output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"points": points}, indent=1) + "\n")
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"points": points}, indent=1) + "\n")
    return points




def ablate(
    spec: AblationSpec,
    output: Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    cost: bool = True,
    cost_only: bool = False,
    report_only: bool = False,
    jobs: int = 1,
    progress: bool = True,
    log: Log = _log.info,
) -> tuple[Path, list[RunOutcome]]:
    """Train the grid (skipping finished runs; ``jobs`` > 1: that many at once, see
    :func:`run_grid_jobs`), measure the cost points, write the report. ``cost_only``:
    measure the cost points without training; ``report_only``: neither. Returns
    results.md's path and what happened to each run."""
    if jobs < 1:
        raise AblationError(f"--jobs must be at least 1, got {jobs}")
    out = output if output is not None else default_output(spec)
    outcomes: list[RunOutcome] = []
    if cost_only and not report_only:
        if spec.cost is None:
            raise AblationError(f"grid {spec.name} has no 'cost:' section to measure")
        run_cost(spec, out, overrides=overrides, log=log)
    elif not report_only:
        if jobs > 1:
            outcomes = run_grid_jobs(spec, out, jobs=jobs, overrides=overrides, only=only,
                                     overwrite=overwrite, retry_failed=retry_failed, log=log)
        else:
            outcomes = run_grid(spec, out, overrides=overrides, only=only, overwrite=overwrite,
                                retry_failed=retry_failed, progress=progress, log=log)
        stopped = any(o.status == "stopped" for o in outcomes)
        if cost and spec.cost is not None and not stopped and not only:
            run_cost(spec, out, overrides=overrides, log=log)
    return write_report(spec, out, overrides=overrides), outcomes
