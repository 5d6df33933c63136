"""The body of each section of ``scripts/gpu_check.py``: ``BODIES[name](check, section)``
returns the section's data (and may set its status); the guard around it is gpu_check's."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import gpu_check_parts as parts

ROOT = parts.ROOT


def _command(check: Any, sec: Any, cmd: list[str]) -> list[str]:
    """``cmd``, or what an injected failure or hang runs instead (a subprocess section)."""
    name = sec.name
    if name in check.args.inject_hang:
        sec.injected = "hang"
        return parts.sleeper(check.work / f"{name}-sleeper.pid")
    if name in check.args.inject_failure:
        sec.injected = "failure"
        return [sys.executable, "-c", f"raise SystemExit('injected failure (--inject-failure {name})')"]
    return cmd


def machine(check: Any, sec: Any) -> dict[str, Any]:
    info = parts.machine_info(check.args.dry_run)
    pack = parts.pack_status(check.pack)
    if not pack["found"]:
        print(f"   gpu-pack/ not found at {pack['path']}: the GPU run needs it; make it here with\n"
              f"      {pack['make_it']}\n   and name it in the device call's carry: [\"gpu-pack\"]",
              flush=True)
        if not check.args.dry_run:
            sec.status = "failed"
            sec.error = f"no gpu-pack/ at {pack['path']}: {pack['make_it']}"
    else:
        print(f"   gpu-pack/: {pack['images']} CIFAR-10 JPEGs, {pack['mib']} MiB"
              f"{', pytest' if pack['pytest'] else ''}", flush=True)
    print(f"   {info['machine']}; torch {info['torch']}, precision {info['precision']}", flush=True)
    return {"info": info, "pack": pack}


def prepare(check: Any, sec: Any) -> dict[str, Any]:
    """The CIFAR folder (the pack's, or tiny synthetic ones in a dry run) and the JPEGs of the
    ResNet-50 rows (enough for one epoch of the timed steps, so no epoch restarts them)."""
    dry, work = check.args.dry_run, check.work
    # 18 batches: the ResNet-50 rows take 1 + 4 warm-up + 12 timed batches from one epoch
    jpegs = parts.synthetic_jpegs(work / "jpegs-500x375", 24 if dry else 256 * 18,
                                  (80, 60) if dry else (500, 375))
    check.paths["jpegs"] = str(jpegs)
    if dry:
        cifar = parts.synthetic_jpegs(work / "tiny-cifar", 64, (32, 32), classes=4, test=16)
    else:
        tar = check.pack / "cifar10-subset.tar.gz"
        if not tar.is_file():
            raise FileNotFoundError(f"{tar}: make it with make gpu-pack and carry gpu-pack")
        cifar = parts.cifar_folder(tar, work)
    check.paths["cifar"] = str(cifar)
    return {"cifar": str(cifar), "jpegs": str(jpegs),
            "cifar_train": sum(1 for _ in (cifar / "train").rglob("*.jpg"))}


def tests(check: Any, sec: Any) -> dict[str, Any]:
    return _tier(check, sec, ["tests"], (parts.COMPILE_TEST,), "tests.log")


def compile_test(check: Any, sec: Any) -> dict[str, Any]:
    return _tier(check, sec, [parts.COMPILE_TEST], (), "compile.log")


def _tier(check: Any, sec: Any, targets: list[str], deselect: tuple[str, ...], log_name: str) -> dict[str, Any]:
    log = check.out / log_name
    log.write_text("")
    env = parts.tier_env(check.pack)
    if sec.name in check.args.inject_hang or sec.name in check.args.inject_failure:
        rc, killed = parts.run_group(_command(check, sec, []), log, sec.budget, env)
        sec.status = "timeout" if killed else ("ok" if rc == 0 else "failed")
        return {"returncode": rc, "killed": killed}
    from gpu_check import TEST_DEADLINE

    r = parts.run_tier(targets, log, sec.budget, TEST_DEADLINE[check.args.dry_run], deselect, env)
    if not r["ok"]:
        sec.status = "timeout" if "TIMEOUT" in r["problems"].values() else "failed"
        sec.error = f"{len(r['problems'])} test(s) not passed, exit {r['returncode']}: see {log_name}"
    return r


def decode(check: Any, sec: Any) -> dict[str, Any]:
    return parts.decode_differences(check.work, check.args.dry_run)


def throughput(check: Any, sec: Any) -> dict[str, Any]:
    rows_file = check.work / "throughput_rows.jsonl"
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--section", "throughput",
           "--out", str(check.out), "--work", str(check.work), "--cifar-dir",
           check.paths.get("cifar", ""), "--deadline-at", f"{time.time() + sec.budget:.0f}",
           *(["--dry-run"] if check.args.dry_run else []),
           *[f"--inject-failure={n}" for n in check.args.inject_failure if n == "throughput"]]
    if "throughput" in check.args.inject_failure:
        sec.injected = "failure"
    cmd = _command(check, sec, cmd) if "throughput" in check.args.inject_hang else cmd
    rc, killed = parts.run_group(cmd, check.out / "throughput.log", sec.budget)
    rows = ([json.loads(x) for x in rows_file.read_text().splitlines() if x.strip()]
            if rows_file.exists() else [])
    if killed:
        sec.status, sec.error = "timeout", f"killed after {sec.budget:.0f} s ({len(rows)} rows done)"
    elif rc:
        sec.status = "failed"
        sec.error = f"exit {rc}: " + "; ".join(
            f"{r['setup']}: {r.get('error', '')}" for r in rows if r.get("status") == "failed")
        if not rows:
            sec.error += _tail(check.out / "throughput.log")
    return {"rows": rows, "returncode": rc}


def learning(check: Any, sec: Any) -> dict[str, Any]:
    """moco pretrain --preset cifar10 exactly, stopped by --time-limit inside the budget."""
    cifar = check.paths.get("cifar")
    if not cifar:
        raise RuntimeError("no CIFAR-10 folder: the prepare section did not finish")
    dry, run = check.args.dry_run, check.work / "learn"
    # outside --time-limit: start-up, the decoded cache, the first kNN, the last save
    minutes = max(0.2, (sec.budget - (25 if dry else 35)) / 60)
    cmd = [sys.executable, "-m", "moco", "pretrain", cifar, "--preset", "cifar10", "--output",
           str(run), "--overwrite", "--no-progress", "--time-limit", f"{minutes:.2f}"]
    if dry:  # the tiny folder holds fewer images than one batch of 512
        cmd += ["-b", "16", "--moco-k", "64", "--bn-splits", "2", "--device", "cpu",
                "--stop-after-epochs", "1", "--workers", "0"]
    env = {**parts.tier_env(check.pack)}
    rc, killed = parts.run_group(_command(check, sec, cmd), check.out / "learn.log", sec.budget, env)
    data = {"returncode": rc, "killed": killed, "time_limit_min": round(minutes, 2),
            **parts.learning_records(run, check.out)}
    if killed:
        sec.status, sec.error = "timeout", f"killed after {sec.budget:.0f} s"
    elif rc:
        sec.status, sec.error = "failed", f"exit {rc}" + _tail(check.out / "learn.log")
    return data


def _tail(log: Path, n: int = 6) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return ("\n" + "\n".join(lines[-n:])) if lines else ""


BODIES = {"machine": machine, "prepare": prepare, "tests": tests, "decode": decode,
          "throughput": throughput, "learning": learning, "compile": compile_test}
