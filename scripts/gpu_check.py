"""make gpu-check: the prepared check of one GPU machine, under 7 minutes on one H100.

Sections, in this order, each in its own guard and time budget (a section that fails, raises
or runs out of time is recorded and the next one runs); results.json and a one-page
report.md are rewritten after every section, so a run killed from outside still returns
what was done:

  machine     device, driver, torch, CUDA, the precision --precision auto picks; gpu-pack/
  prepare     the CIFAR-10 subset from gpu-pack/ extracted, ~500x375 JPEGs generated
  tests       the CUDA tier (pytest -m cuda), each test limited (--deadline), -v
              --durations=15, the process group killed on a timeout; a test that hangs past
              its limit is recorded and the rest run again
  decode      nvJPEG against libjpeg, 4:2:0 and 4:4:4 JPEGs
  throughput  pairs/s end to end and model only, the plain hand-written step, GPU memory
              peak: R18 CIFAR stem b512 (--bn-splits 8, plain BN, NCHW), R50 224px from JPEGs
              with --decode gpu and cpu, MoCo v3 ViT-S/16 when -a vit_small exists
  learning    moco pretrain --preset cifar10 for the minutes budgeted, each epoch's kNN next
              to the authors' log at the same number of pairs seen
  compile     the --compile test, last (it takes the longest)

ONE WAY TO RUN IT on a lent GPU machine (it receives the tracked files plus the ignored
paths a call names, and returns only the files written under $OUT):

  here, once:        make gpu-pack        # gpu-pack/ (ignored, ~33 MiB): CIFAR-10 + pytest,
                                          # made with the venv's Python
  the device call:   command  "make gpu-check"
                     carry    ["gpu-pack"]
                     timeout  480 s (the check budgets 6.75 min; the rest is start-up)
  what comes back:   $OUT/report.md, results.json, tests.log, compile.log, throughput.log,
                     learn.log, learn_metrics.jsonl (7 files; a call returns 8 at most)

--out defaults to $OUT when it is set, else runs/gpu-check/; --work (generated JPEGs,
checkpoints, caches: never under --out) defaults to <tmp>/moco-gpu-check-work. The machine
needs only python3 with torch, torchvision, numpy, PIL and yaml (the Makefile uses
PYTHONPATH=. without a venv); pytest comes with it or from gpu-pack/. Everything the check
reads is tracked or in gpu-pack/.

  make gpu-check DRY_RUN=1      # the same sections on the CPU, tiny sizes (CI runs it);
                                # checks gpu-pack/ or prints the command that makes it

Exit status 0 when every section passed (a failure injected on purpose counts as passed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from gpu_check_report import render  # noqa: E402

SECTIONS = ("machine", "prepare", "tests", "decode", "throughput", "learning", "compile")
IN_PROCESS = ("machine", "prepare", "decode")  # the others run in process groups of their own
# seconds on one H100 (405 s = 6.75 min in all); compile also gets whatever the others left
BUDGETS = {"machine": 10, "prepare": 30, "tests": 130, "decode": 10, "throughput": 95,
           "learning": 70, "compile": 60}
DRY_BUDGETS = {"machine": 60, "prepare": 60, "tests": 300, "decode": 60, "throughput": 240,
               "learning": 180, "compile": 120}
TEST_DEADLINE = {False: 75.0, True: 120.0}  # seconds per test (GPU, dry run)


class SectionTimeout(Exception):
    pass


@dataclass
class Section:
    name: str
    budget: float
    status: str = "not run"  # ok, failed, timeout, skipped, not run
    seconds: float = 0.0
    error: str = ""
    injected: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Check:
    args: argparse.Namespace
    out: Path
    work: Path
    pack: Path
    sections: dict[str, Section]
    started: float = field(default_factory=time.time)
    paths: dict[str, str] = field(default_factory=dict)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-check"),
                   help="records: report.md, results.json, logs (default $OUT, else runs/gpu-check)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "moco-gpu-check-work"),
                   help="generated JPEGs, extracted CIFAR, checkpoints, caches (never under --out)")
    p.add_argument("--pack", default=str(ROOT / "gpu-pack"), help="the folder make gpu-pack fills")
    p.add_argument("--only", default="", help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    p.add_argument("--skip", default="", help="comma-separated sections not to run")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="another time budget for a section")
    p.add_argument("--inject-failure", action="append", default=[], metavar="SECTION",
                   help="make SECTION raise (tests the guards)")
    p.add_argument("--inject-hang", action="append", default=[], metavar="SECTION",
                   help="make SECTION hang past its budget (tests the time limits)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # the throughput child
    p.add_argument("--cifar-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in (*args.inject_failure, *args.inject_hang, *_names(args.only), *_names(args.skip)):
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; the sections are {', '.join(SECTIONS)}")
    return args


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def budgets(args: argparse.Namespace) -> dict[str, float]:
    b = dict(DRY_BUDGETS if args.dry_run else BUDGETS)
    for item in args.budget:
        name, _, sec = item.partition("=")
        if name not in b or not sec:
            raise SystemExit(f"gpu-check: --budget {item}: expected SECTION=SECONDS, SECTION of {', '.join(b)}")
        b[name] = float(sec)
    return {k: float(v) for k, v in b.items()}


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in this (main) thread after ``seconds``."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"ran past its budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def write_records(check: Check) -> None:
    """results.json and report.md, each written whole then renamed."""
    results = {"dry_run": check.args.dry_run, "started": time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(check.started)), "seconds": round(time.time() - check.started, 1),
        "sections": {k: asdict(s) for k, s in check.sections.items()}}
    for name, text in (("results.json", json.dumps(results, indent=1, default=str)),
                       ("report.md", render(results))):
        tmp = check.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, check.out / name)


def run_section(check: Check, name: str, body: Callable[[Check, Section], dict[str, Any]]) -> None:
    """``body`` in a guard: any exception, or running past the section's budget (SIGALRM for
    work in this process; subprocess sections also kill their process group), is recorded;
    the records are written whatever happened."""
    sec = check.sections[name]
    t0 = time.monotonic()
    print(f"== {name} (budget {sec.budget:.0f} s)", flush=True)
    try:
        # subprocess sections stop themselves at the budget: the alarm is their backstop
        with alarm(sec.budget + (0 if name in IN_PROCESS else 10)):
            if name in IN_PROCESS and name in check.args.inject_failure:
                sec.injected = "failure"
                raise RuntimeError(f"injected failure (--inject-failure {name})")
            if name in IN_PROCESS and name in check.args.inject_hang:
                sec.injected = "hang"
                time.sleep(sec.budget + 60)
            sec.data.update(body(check, sec))
            if sec.status == "not run":
                sec.status = "ok"
    except SectionTimeout as e:
        sec.status, sec.error = "timeout", str(e)
    except Exception as e:  # every other failure: recorded, the next section runs
        sec.status = "failed"
        sec.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2500:]}"
    finally:
        sec.seconds = round(time.monotonic() - t0, 1)
        print(f"   {name}: {sec.status} in {sec.seconds} s{' (' + sec.injected + ' injected)' if sec.injected else ''}"
              f"{': ' + sec.error.splitlines()[0] if sec.error else ''}", flush=True)
        write_records(check)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.section == "throughput":  # the child process of the throughput section
        from gpu_check_throughput import run_rows

        return run_rows(args, Path(args.work) / "throughput_rows.jsonl")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu-check: no CUDA GPU here; run it on the GPU machine, or pass "
                             "--dry-run (make gpu-check DRY_RUN=1)")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    if work == out or out in work.parents:
        raise SystemExit(f"gpu-check: --work {work} must not be inside --out {out}: only the records go back")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for f in ("tests.log", "compile.log", "throughput.log", "learn.log", "learn_metrics.jsonl"):
        (out / f).unlink(missing_ok=True)
    os.environ["MOCO_CACHE"] = str(work / "cache")  # decoded caches and indexes
    chosen = _names(args.only) or list(SECTIONS)
    b = budgets(args)
    check = Check(args, out, work, Path(args.pack), {n: Section(n, b[n]) for n in SECTIONS})
    for n in SECTIONS:
        if n not in chosen or n in _names(args.skip):
            check.sections[n].status = "skipped"
    print(f"gpu-check{' (DRY RUN: CPU, tiny sizes)' if args.dry_run else ''}: records in {out}, "
          f"work in {work}\n   budgets (s): " + ", ".join(f"{n} {b[n]:.0f}" for n in SECTIONS)
          + f"; {sum(b.values()) / 60:.2f} min in all", flush=True)
    if args.dry_run:
        print("   the GPU run's budgets (s): " + ", ".join(f"{n} {BUDGETS[n]}" for n in SECTIONS)
              + f"; {sum(BUDGETS.values()) / 60:.2f} min in all, per test {TEST_DEADLINE[False]:.0f} s",
              flush=True)
    from gpu_check_sections import BODIES

    for n in SECTIONS:
        if check.sections[n].status == "skipped":
            continue
        if n == "compile" and not args.dry_run:  # last: whatever the others left, 45 s at least
            spent = time.time() - check.started
            check.sections[n].budget = max(b[n], min(sum(b.values()) - spent, 240.0), 45.0)
        run_section(check, n, BODIES[n])
    write_records(check)
    bad = [s.name for s in check.sections.values()
           if s.status not in ("ok", "skipped") and not s.injected]
    print(f"gpu-check done in {(time.time() - check.started) / 60:.1f} min: "
          f"{'every section passed' if not bad else 'NOT passed: ' + ', '.join(bad)}; "
          f"{out / 'report.md'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
