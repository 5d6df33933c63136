"""The sections of ``scripts/gpu_check.py`` (what each one measures), the process-group runner
they share and the parsing of pytest's verbose output. Imported by gpu_check.py only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPILE_TEST = "tests/cuda/test_cuda.py::test_pretrain_compiled"
THROUGHPUT_TARGET = 15_000  # pairs/s, ResNet-18 CIFAR stem, H100/H200 bf16


# ----- processes -------------------------------------------------------------------------------

def run_group(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None,
              on_line: Callable[[str], None] | None = None,
              cwd: Path = ROOT) -> tuple[int | None, bool]:
    """``cmd`` in a session of its own, its output (text) appended to ``log`` line by line as
    it comes. Its whole process group is killed at ``timeout`` seconds, and again when it has
    ended (what it left behind, e.g. torchrun's workers). Returns (exit code, None when killed;
    whether it was killed)."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    with log.open("a", encoding="utf-8", errors="replace") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, cwd=cwd, start_new_session=True)
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                f.write(line)
                f.flush()
                if on_line is not None:
                    on_line(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        killed = False
        try:
            end = time.monotonic() + timeout
            while proc.poll() is None:
                if time.monotonic() > end:
                    killed = True
                    break
                time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(timeout=5)
        if killed:
            f.write(f"\n[gpu-check: killed the process group after {timeout:.0f} s]\n")
    return (None if killed else proc.returncode), killed


def sleeper(pid_file: Path) -> list[str]:
    """A command that starts a child and both sleep for ten minutes (an injected hang); the
    child's pid goes to ``pid_file``, so a test can check the whole group was killed."""
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    return [sys.executable, "-c", code]


# ----- the CUDA tier ---------------------------------------------------------------------------

_OUTCOME = re.compile(r"^(?P<id>\S+::\S+)\s+(?P<out>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_STARTED = re.compile(r"^(?P<id>\S+\.py::\S+)")
# the outcome on a line of its own (something was printed after the test's name)
_LONE = re.compile(r"^(?P<out>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*\[\s*\d+%\]\s*$")
_DURATION = re.compile(r"^\s*(?P<s>[\d.]+)s\s+(?P<phase>setup|call|teardown)\s+(?P<id>\S+::\S+)")
_SUMMARY = re.compile(r"^=+ .*\bin [\d.]+s( \([\d:]+\))? =+$")


def parse_verbose(text: str) -> tuple[dict[str, str], str | None, bool]:
    """pytest ``-v`` output -> (outcome of each test, the test that started without an
    outcome (it was running when the process died), whether pytest reached its summary)."""
    outcomes: dict[str, str] = {}
    running = None
    finished = False
    for line in text.splitlines():
        m = _OUTCOME.match(line)
        if m:
            outcomes[m["id"]] = m["out"]
            running = None
            continue
        lone = _LONE.match(line)
        if lone and running is not None:
            outcomes[running] = lone["out"]
            running = None
            continue
        m = _STARTED.match(line)
        if m:
            running = m["id"]
        finished = finished or bool(_SUMMARY.match(line.strip()))
    return outcomes, running, finished


def slowest(text: str, n: int = 8) -> list[tuple[float, str, str]]:
    """The ``--durations`` lines: (seconds, phase, test), slowest first."""
    out = [(float(m["s"]), m["phase"], m["id"]) for m in map(_DURATION.match, text.splitlines()) if m]
    return sorted(out, reverse=True)[:n]


def run_tier(targets: list[str], log: Path, budget: float, deadline: float,
             deselect: tuple[str, ...] = (), env: dict[str, str] | None = None,
             grace: float = 15.0, cwd: Path = ROOT) -> dict[str, Any]:
    """``pytest -m cuda`` on ``targets`` with a per-test ``deadline`` (scripts/pytest_deadline.py)
    within ``budget`` seconds, run in ``cwd`` (the rootdir: the test ids pytest prints are
    the ones --deselect takes). A test that ends the process (stuck past its deadline +
    grace, or a crash) is recorded as TIMEOUT and the remaining tests run again, deselecting
    the ones done, while the budget lasts."""
    outcomes: dict[str, str] = {}
    end = time.monotonic() + budget
    runs, rc, text_all = 0, None, ""
    while time.monotonic() < end - 3:
        runs += 1
        start = log.stat().st_size if log.exists() else 0
        cmd = [sys.executable, "-m", "pytest", *targets, "-m", "cuda", "-v", "--durations=15",
               "-rfEs", "-p", "no:cacheprovider", "-p", "pytest_deadline", "--deadline",
               f"{deadline:g}", "--deadline-grace", f"{grace:g}", "--continue-on-collection-errors",
               *[f"--deselect={t}" for t in (*deselect, *outcomes)]]
        rc, killed = run_group(cmd, log, end - time.monotonic(), env, cwd=cwd)
        with log.open(encoding="utf-8", errors="replace") as f:
            f.seek(start)
            text = f.read()
        text_all += text
        new, running, finished = parse_verbose(text)
        again = running is not None and running in outcomes  # deselecting it did not work
        outcomes.update(new)
        if running is not None:
            outcomes[running] = "TIMEOUT"
        if finished or killed or running is None or again:
            break
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    bad = sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR", "TIMEOUT"))
    ok = rc in (0, 5) and not bad
    return {"ok": ok, "returncode": rc, "runs": runs, "counts": counts, "problems":
            {t: outcomes[t] for t in bad}, "outcomes": outcomes, "slowest": slowest(text_all)}


def tier_env(pack: Path) -> dict[str, str]:
    """The environment of the pytest process: the checkout and scripts/ (the deadline plugin)
    on the path, and the pack's pytest when this Python has none."""
    import importlib.util

    paths = [str(ROOT), str(ROOT / "scripts")]
    if importlib.util.find_spec("pytest") is None:
        paths.append(str(pack / "site-packages"))
    old = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}


# ----- the machine and the data ----------------------------------------------------------------

def machine_info(dry: bool) -> dict[str, Any]:
    """Device, driver, torch, CUDA and the precision ``--precision auto`` picks."""
    import platform

    import torch
    import torchvision

    from moco.utils.machine import describe_machine
    from moco.utils.runtime import resolve_device, resolve_precision

    dev = resolve_device("cpu" if dry else "cuda")
    dtype = resolve_precision("auto", dev)
    info: dict[str, Any] = {
        "machine": describe_machine(dev), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda_runtime": torch.version.cuda, "device": str(dev),
        "precision": str(dtype).replace("torch.", "") if dtype else "fp32"}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), driver=_driver())
    return info


def _driver() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "? (no nvidia-smi)"


def pack_status(pack: Path) -> dict[str, Any]:
    """What gpu-pack/ holds, and the command that makes it when it is missing."""
    tar = pack / "cifar10-subset.tar.gz"
    make = ("make gpu-pack   # = .venv/bin/python scripts/pack_cifar_subset.py: CIFAR-10 "
            "from $MOCO_DATA or ../shared/data/cifar10")
    if not tar.is_file():
        return {"found": False, "path": str(pack), "make_it": make}
    size = sum(f.stat().st_size for f in pack.rglob("*") if f.is_file())
    with tarfile.open(tar) as t:
        images = sum(1 for m in t.getmembers() if m.isfile())
    return {"found": True, "path": str(pack), "images": images, "mib": round(size / 2**20, 1),
            "pytest": (pack / "site-packages" / "pytest").is_dir(), "make_it": make}


def cifar_folder(tar: Path, work: Path) -> Path:
    """The packed CIFAR-10 subset, extracted into ``work`` once (by ``tar``, several times
    faster than Python's tarfile on 60,000 small files; tarfile where there is none)."""
    dest = work / "cifar10-subset"
    if not (dest / "train").is_dir():
        import shutil

        work.mkdir(parents=True, exist_ok=True)
        if shutil.which("tar"):
            subprocess.run(["tar", "-xzf", str(tar), "-C", str(work), "--no-same-owner"],
                           check=True, timeout=120)
        else:
            with tarfile.open(tar) as t:
                t.extractall(work, filter="data")
    return dest


def _jpeg(args: tuple[Path, int, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    path, w, h, seed, subsampling = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)[None, None] * (0.5 + 0.5 * np.sin(xx[..., None] / rng.uniform(5, 40)
                                                 + yy[..., None] / rng.uniform(5, 40)))
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90, subsampling=subsampling)


def synthetic_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 4, test: int = 0,
                    subsampling: int = 2) -> Path:
    """ImageFolder of ``n`` random-content JPEGs of ``size`` (w, h) in ``classes`` classes
    (and ``test`` test images), made with every core; 4:2:0 chroma unless ``subsampling``."""
    from multiprocessing import Pool

    if sum(1 for _ in root.rglob("*.jpg")) == n + test:  # made by an earlier run
        return root
    jobs = []
    for split, count in (("train", n), ("test", test)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            jobs.append((d / f"{i:05d}.jpg", size[0], size[1],
                         i + (10**6 if split == "test" else 0), subsampling))
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_jpeg, jobs, chunksize=16)
    return root


# ----- nvJPEG against libjpeg --------------------------------------------------------------------

def decode_differences(work: Path, dry: bool) -> dict[str, Any]:
    """Mean and largest |nvJPEG - libjpeg| (levels of 255) over a few 4:2:0 and 4:4:4 JPEGs:
    4:4:4 shows the IDCTs alone, 4:2:0 adds the chroma upsampling (libjpeg's is smooth, its
    "fancy upsampling"; nvJPEG's may differ)."""
    import torch

    from moco.data.decode import KIND_JPEG, decode_full, decode_on_device
    from moco.utils.runtime import resolve_device

    dev = resolve_device("cpu" if dry else "cuda")
    out: dict[str, Any] = {"device": str(dev)}
    for name, sub in (("4:2:0", 2), ("4:4:4", 0)):
        folder = synthetic_jpegs(work / f"decode-{sub}", 4 if dry else 32, (96, 64) if dry else (500, 375),
                                 subsampling=sub)
        files = sorted((folder / "train").rglob("*.jpg"))
        datas = [f.read_bytes() for f in files]
        fallbacks: list[int] = []
        got = decode_on_device(datas, [KIND_JPEG] * len(datas), [f.name for f in files], dev,
                               fallbacks=fallbacks)
        diffs = [(x.cpu().float() - decode_full(d, KIND_JPEG, "ref").float()).abs()  # type: ignore[union-attr]
                 for x, d in zip(got, datas, strict=True)]
        allp = torch.cat([d.flatten() for d in diffs])
        out[name] = {"files": len(datas), "mean": round(float(allp.mean()), 3),
                     "max": int(allp.max()), "fell_back": len(fallbacks)}
    return out


# ----- learning ------------------------------------------------------------------------------

def compare_with_authors(history: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Each epoch's kNN next to the authors' at the same number of pairs seen (global steps x
    batch), the difference, and whether it is within 2 points of theirs or above."""
    from moco.eval.authors_log import authors_knn_at

    rows = []
    for h in history:
        pairs = h["step"] * batch
        theirs = authors_knn_at(pairs)
        ours = h.get("knn_top1")
        diff = None if theirs is None or ours is None else ours - theirs
        rows.append({"epoch": h["epoch"], "pairs": pairs, "knn_top1": ours, "authors": theirs,
                     "diff": diff, "ok": None if diff is None else diff >= -2.0})
    return rows


def learning_records(run: Path, out: Path) -> dict[str, Any]:
    """The run's metrics (copied to OUT/learn_metrics.jsonl) next to the authors' log;
    whatever epochs exist, also after a kill."""
    import shutil

    import yaml

    from moco.utils.runlog import read_metrics

    if (run / "metrics.jsonl").is_file():
        shutil.copy(run / "metrics.jsonl", out / "learn_metrics.jsonl")
    if not (run / "metrics.jsonl").is_file() or not (run / "config.yaml").is_file():
        return {"epochs": [], "verdict": "no epoch finished"}
    batch = int(dict(yaml.safe_load((run / "config.yaml").read_text()))["batch_size"])
    rows = compare_with_authors(read_metrics(run / "metrics.jsonl"), batch)
    judged = [r for r in rows if r["ok"] is not None]
    verdict = ("no epoch reached the authors' first epoch in pairs seen" if not judged else
               f"{sum(r['ok'] for r in judged)} of {len(judged)} epochs within 2 points of the "
               "authors' log or above")
    return {"epochs": rows, "verdict": verdict, "batch": batch}


def write_json_line(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
