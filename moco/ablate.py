"""Ablation grids: train runs that differ in one or two settings, then tabulate and plot them
(the comparisons of MoCo v1 §4.1 / App. A.9 and MoCo v2 Tables 1-3; REFERENCE.md §3.1, §10).

A grid is a YAML file::

    name: momentum                       # optional; default: the file's stem
    title: Key-encoder momentum m        # optional, heads results.md
    expect: |                            # optional: what the papers say it must show
      m = 0 fails (loss oscillates) ...
    budget: about 40 min on 2 CPU cores  # optional, copied into results.md
    output: runs/ablations/momentum      # optional; --output overrides
    base:                                # any pretrain settings (keys as the long flags)
      preset: cifar10                    # optional preset, applied first
      config: ../demo.yaml               # optional pretrain YAML, relative to this file
      data: ../shared/data/cifar10
      epochs: 20
      train_subset: 5000
    grid:                                # every combination of these values ...
      moco_m: [0.0, 0.9, 0.99, 0.999]
    runs:                                # ... and/or explicit runs (name + settings)
      - {name: v1, mlp: false}
    sweep: [moco_m]                      # optional: x axis of sweep.png (default: grid keys)
    cost:                                # optional: peak memory and time per step
      mechanisms: [moco, end-to-end, memory-bank]
      batch_sizes: [32, 64, 128]
      steps: 3

Each run trains with :func:`moco.train.pretrain` in ``OUTPUT/<run name>/``. The grid is
resumable run by run: a finished run is skipped, an interrupted one is continued with
``resume=auto``, a run that diverged is recorded as failed (and skipped on re-runs unless
asked). Then ``OUTPUT`` gets ``results.md`` and ``results.json`` (table), ``knn.png``,
``pretext.png``, ``loss.png``, ``step_loss.png``, ``sweep.png`` and, with ``cost:``,
``cost.json`` and ``cost.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moco.config import MocoConfig, build_config
from moco.runlog import read_metrics

Log = Callable[[str], None]

#: Settings a re-run may change without invalidating a finished run.
IGNORED_WHEN_COMPARING = frozenset({
    "resume", "output", "workers", "print_freq", "keep_last", "save_every_steps", "knn_every",
    "device", "dist_timeout",
})
FAILED_MARKER = "FAILED.txt"
RUNNER_KEYS = frozenset({"output", "resume"})


class AblationError(ValueError):
    """A grid file or run folder that cannot be used, with what to change."""


# ----- the grid file ------------------------------------------------------------------------

@dataclass
class RunSpec:
    """One run of a grid: its folder name and the settings it overrides over the base."""

    name: str
    settings: dict[str, Any]


@dataclass
class CostSpec:
    """Peak memory and time per step at several batch sizes (the MoCo v2 Table 3 analogue)."""

    mechanisms: list[str] = field(default_factory=lambda: ["moco", "end-to-end", "memory-bank"])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    steps: int = 3
    warmup: int = 1
    isolate: bool = True
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class AblationSpec:
    """A parsed grid file."""

    name: str
    base: dict[str, Any]
    runs: list[RunSpec]
    sweep: list[str]
    title: str = ""
    expect: str = ""
    budget: str = ""
    output: str = ""
    preset: str = ""
    config_path: Path | None = None
    cost: CostSpec | None = None
    source: Path | None = None


def _norm_keys(d: dict[str, Any], where: str) -> dict[str, Any]:
    out = {str(k).replace("-", "_"): v for k, v in d.items()}
    bad = sorted(set(out) & RUNNER_KEYS)
    if bad:
        raise AblationError(f"{where}: {bad} are set by the runner (use the grid's 'output:' or "
                            "--output for the folder); remove them")
    known = {f.name for f in dataclasses.fields(MocoConfig)} | {"config"}
    unknown = sorted(set(out) - known)
    if unknown:
        raise AblationError(f"{where}: unknown setting(s) {unknown}; use the long pretrain flags' "
                            "names (moco_m or moco-m, train_subset, ...)")
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "-".join(_fmt_value(x) for x in v)
    return str(v)


def run_name(settings: dict[str, Any]) -> str:
    """Folder name of a grid point: ``moco_t=0.07_mlp=true``."""
    return "_".join(f"{k}={_fmt_value(v)}" for k, v in settings.items()) or "base"


def parse_spec(raw: dict[str, Any], name: str = "ablation", source: Path | None = None) -> AblationSpec:
    """Validate a grid mapping (as loaded from YAML) into an :class:`AblationSpec`."""
    allowed = {"name", "title", "expect", "budget", "output", "base", "grid", "runs", "sweep", "cost"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise AblationError(f"unknown top-level key(s) {unknown}; allowed: {sorted(allowed)}")
    base = _norm_keys(dict(raw.get("base") or {}), "base")
    config_path = None
    if "config" in base:
        config_path = Path(str(base.pop("config")))
        if not config_path.is_absolute() and source is not None:
            config_path = source.parent / config_path
    preset = str(base.pop("preset", "") or "")
    runs: list[RunSpec] = []
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise AblationError("'grid' must map setting names to lists of values")
    grid = _norm_keys(grid, "grid")
    if grid:
        values = []
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise AblationError(f"grid: {k} needs a non-empty list of values, got {v!r}")
            values.append(v)
        for combo in itertools.product(*values):
            settings = dict(zip(grid, combo, strict=True))
            runs.append(RunSpec(run_name(settings), settings))
    for i, item in enumerate(raw.get("runs") or []):
        if not isinstance(item, dict):
            raise AblationError(f"runs[{i}] must be a mapping with 'name' and settings")
        item = dict(item)
        rname = str(item.pop("name", "") or "")
        settings = _norm_keys(item, f"runs[{i}]")
        runs.append(RunSpec(rname or run_name(settings), settings))
    if not runs:
        raise AblationError("the grid has no runs: give 'grid:' and/or 'runs:'")
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AblationError(f"run names must be unique; repeated: {dup}")
    for r in runs:
        if "/" in r.name or r.name in (".", ".."):
            raise AblationError(f"run name {r.name!r} cannot be a folder name")
    sweep = [str(s).replace("-", "_") for s in (raw.get("sweep") or list(grid))]
    cost = None
    if raw.get("cost"):
        c = dict(raw["cost"])
        settings = _norm_keys(dict(c.pop("settings", {}) or {}), "cost.settings")
        try:
            cost = CostSpec(**c, settings=settings)
        except TypeError as e:
            raise AblationError(f"cost: {e}; allowed keys: mechanisms, batch_sizes, steps, warmup, "
                                "isolate, settings") from None
        if not cost.batch_sizes or not cost.mechanisms or cost.steps < 1:
            raise AblationError("cost needs mechanisms, batch_sizes and steps >= 1")
    return AblationSpec(
        name=str(raw.get("name") or name), base=base, runs=runs, sweep=sweep,
        title=str(raw.get("title") or ""), expect=str(raw.get("expect") or "").strip(),
        budget=str(raw.get("budget") or "").strip(), output=str(raw.get("output") or ""),
        preset=preset, config_path=config_path, cost=cost, source=source)


def load_spec(path: str | Path) -> AblationSpec:
    """Read a grid YAML file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise AblationError(f"grid file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise AblationError(f"grid file {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise AblationError(f"grid file {p} must hold a mapping (base, grid/runs, ...)")
    return parse_spec(raw, name=p.stem, source=p)


def run_config(spec: AblationSpec, run: RunSpec, run_dir: Path,
               overrides: dict[str, Any] | None = None, resume: str = "") -> MocoConfig:
    """The run's :class:`MocoConfig`: defaults <- preset <- base config file <- base <- the
    run's settings <- ``overrides`` (command-line ``--set``), in ``run_dir``."""
    values = {**spec.base, **run.settings, **(overrides or {}),
              "output": str(run_dir), "resume": resume}
    if spec.preset and "preset" not in values:
        values["preset"] = spec.preset
    if spec.config_path is not None and not spec.config_path.is_file():
        raise AblationError(f"base config {spec.config_path} does not exist")
    return build_config(yaml_path=spec.config_path, overrides=values)


# ----- running ------------------------------------------------------------------------------

def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*.pth.tar"))


def run_status(run_dir: Path, epochs: int) -> str:
    """``done`` (all epochs in metrics.jsonl and a checkpoint), ``failed`` (diverged earlier),
    ``partial`` (a started run to resume) or ``new``."""
    if (run_dir / FAILED_MARKER).is_file():
        return "failed"
    history = read_metrics(run_dir / "metrics.jsonl")
    if history and int(history[-1]["epoch"]) >= epochs and _checkpoints(run_dir):
        return "done"
    if any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl")) or _checkpoints(run_dir):
        return "partial"
    return "new"


def settings_mismatch(run_dir: Path, cfg: MocoConfig) -> list[str]:
    """Settings in ``run_dir/config.yaml`` that differ from ``cfg`` (ignoring those in
    :data:`IGNORED_WHEN_COMPARING`): ``['moco_m: 0.9 -> 0.99', ...]``."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return ["config.yaml: unreadable"]
    now = cfg.to_dict()
    diffs = []
    for k, v in now.items():
        if k in IGNORED_WHEN_COMPARING or k not in saved:
            continue
        old = saved[k]
        if isinstance(v, tuple):
            v = list(v)
        if old != v:
            diffs.append(f"{k}: {old!r} -> {v!r}")
    return diffs


@dataclass
class RunOutcome:
    name: str
    status: str  # done | failed | partial | new | stopped
    message: str = ""


def run_grid(
    spec: AblationSpec,
    output: Path,
    *,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    log: Log = print,
) -> list[RunOutcome]:
    """Train every run of ``spec`` that is not finished yet, one after the other.

    Every run's settings are validated before the first one starts. A finished run is
    skipped; an interrupted one resumed (``resume=auto``); a run whose folder holds a run
    with other settings is refused unless ``overwrite``. A run that stops with a
    :class:`~moco.train.RunError` (e.g. the loss became NaN) is recorded in
    ``FAILED.txt`` and the grid goes on. A signal (Ctrl-C) stops the grid after the
    current run has checkpointed; re-running the same command continues it.
    """
    from moco.train import RunError, pretrain

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
        plans.append((r, run_dir, cfg, status, bool(diffs)))
    outcomes = []
    for i, (r, run_dir, cfg, status, changed) in enumerate(plans):
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
            (run_dir / FAILED_MARKER).write_text(str(e) + "\n")
            log(f"{head} FAILED: {e}")
            outcomes.append(RunOutcome(r.name, "failed", str(e)))
            continue
        if result.stopped_early:
            log(f"{head} stopped; re-run the same command to continue the grid")
            outcomes.append(RunOutcome(r.name, "stopped"))
            return outcomes
        outcomes.append(RunOutcome(r.name, "done"))
    return outcomes


# ----- cost per step: peak memory and time (MoCo v2 Table 3 analogue) -----------------------

def _peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM (Linux, resettable), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def dictionary_size(mechanism: str, batch_size: int, k: int) -> int:
    """Negatives per query: K for MoCo and the memory bank, batch - 1 for end-to-end."""
    return batch_size - 1 if mechanism == "end-to-end" else k


def measure_step_cost(cfg: MocoConfig, num_samples: int, steps: int = 3,
                      warmup: int = 1) -> dict[str, Any]:
    """Peak memory and time per training step of ``cfg.mechanism`` at ``cfg.batch_size``, on
    synthetic images [B,3,S,S] (no data loading): ``warmup`` untimed steps, then ``steps``
    timed ones.

    Memory (``peak_bytes``, ``step_bytes``):
      * CUDA: ``torch.cuda.max_memory_allocated`` over all steps (weights, gradients and SGD
        state included, as the paper's "memory / GPU"), and the rise of the allocated memory
        during the timed steps over what was allocated before them (activations and
        temporaries of one step).
      * CPU: the process's peak RSS during the timed steps (VmHWM, reset just before them by
        writing 5 to ``/proc/self/clear_refs``; where that is impossible, ``getrusage``'s
        ru_maxrss, which cannot be reset, so a lower bound of the rise), and its rise over the
        RSS before the timed steps. Peak RSS counts the PyTorch libraries too (several hundred
        MB): compare ``step_bytes`` across mechanisms. RSS follows the tensors only if freed
        memory goes back to the OS: the isolated measurement (:func:`run_cost`) runs in a
        fresh process with ``MALLOC_MMAP_THRESHOLD_`` fixed, so glibc serves every large
        tensor by mmap and unmaps it when freed. ``tracemalloc`` is not used: it sees only
        Python's own allocations, not tensor memory.

    Time: median wall time of the timed steps (CUDA synchronised). Errors (out of memory, a
    batch SplitBatchNorm cannot split) are returned in ``error`` instead of raised.
    """
    from moco.loader import Batch
    from moco.shuffle_bn import KeyShuffle, LocalShuffle, NoShuffle
    from moco.train import build_model, build_optimizer, resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    split = cfg.shuffle_bn in ("split", "auto", "ddp")
    cfg = dataclasses.replace(cfg, shuffle_bn="split" if split else "none")
    dtype = resolve_precision(cfg.precision, device)
    b = cfg.batch_size
    num_samples = max(num_samples, b)
    cuda = device.type == "cuda"
    result: dict[str, Any] = {
        "mechanism": cfg.mechanism, "batch_size": b, "device": str(device),
        "dictionary_size": dictionary_size(cfg.mechanism, b, cfg.moco_k),
        "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "steps": steps, "threads": torch.get_num_threads(),
    }
    try:
        model = build_model(cfg, device, num_samples=num_samples).train()
        optimizer = build_optimizer(cfg, model)
        shuffle: KeyShuffle = LocalShuffle(torch.Generator().manual_seed(0)) if split else NoShuffle()
        g = torch.Generator().manual_seed(0)
        s = cfg.image_size
        ims = [torch.randn(b, 3, s, s, generator=g).to(device) for _ in range(2)]
        if cfg.channels_last_on(device.type):
            ims = [x.contiguous(memory_format=torch.channels_last) for x in ims]
        batch = Batch(ims[0], ims[1], torch.randperm(num_samples, generator=g)[:b])
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        base = step_peak_from = 0
        for i in range(warmup + steps):
            if i == warmup:  # steady state from here: weights, grads and SGD state exist
                gc.collect()
                if cuda:
                    torch.cuda.synchronize(device)
                    base = torch.cuda.memory_allocated(device)
                    step_peak_from = torch.cuda.max_memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                else:
                    if not _reset_peak_rss():
                        result["memory_kind"] = "peak RSS (ru_maxrss, not resettable: a lower bound)"
                    base = _rss_bytes()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(batch.im_q, batch.im_k, shuffle, batch.index)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            del out
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if cuda:
            step_peak = torch.cuda.max_memory_allocated(device)
            peak = max(step_peak, step_peak_from)
        else:
            step_peak = peak = _peak_rss_bytes()
        t = statistics.median(times)
        result.update(time_per_step_s=t, min_time_per_step_s=min(times), images_per_s=b / t,
                      peak_bytes=int(peak),
                      step_bytes=int(max(0, step_peak - base)))
    except (torch.OutOfMemoryError, MemoryError) as e:
        result["error"] = f"out of memory: {str(e).splitlines()[0] if str(e) else ''}"
    except (RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        result["error"] = ("out of memory: " + msg) if "memory" in msg.lower() else msg
    return result


def _cost_child() -> None:
    """Entry of the isolated measurement process: JSON on stdin, one result line on stdout."""
    payload = json.loads(sys.stdin.read())
    cfg = MocoConfig(**payload["cfg"])
    r = measure_step_cost(cfg, payload["num_samples"], payload["steps"], payload["warmup"])
    print("COST_RESULT " + json.dumps(r), flush=True)


def _measure_isolated(cfg: MocoConfig, num_samples: int, steps: int, warmup: int) -> dict[str, Any]:
    payload = json.dumps({"cfg": cfg.to_dict(), "num_samples": num_samples, "steps": steps,
                          "warmup": warmup})
    # A fixed mmap threshold disables glibc's dynamic one: tensors >= 128 KiB are mmapped and
    # returned to the OS when freed, so the RSS follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, "-c", "from moco.ablate import _cost_child; _cost_child()"],
        input=payload, capture_output=True, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("COST_RESULT "):
            return dict(json.loads(line[len("COST_RESULT "):]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    why = "killed (out of memory?)" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return {"mechanism": cfg.mechanism, "batch_size": cfg.batch_size,
            "dictionary_size": dictionary_size(cfg.mechanism, cfg.batch_size, cfg.moco_k),
            "error": f"measurement process failed ({why}): {tail}"}


def _train_size(cfg: MocoConfig) -> int:
    from moco.data import find_dataset

    if cfg.train_subset:
        return int(cfg.train_subset)
    try:
        return len(find_dataset(cfg.data).train)
    except ValueError:
        return 50000


def run_cost(spec: AblationSpec, output: Path, *, overrides: dict[str, Any] | None = None,
             log: Log = print) -> list[dict[str, Any]]:
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
            r = (_measure_isolated(cfg, n, c.steps, c.warmup) if c.isolate
                 else measure_step_cost(cfg, n, c.steps, c.warmup))
            r["key"] = key
            if "error" in r:
                log(f"[{spec.name} cost] {mech}, batch {b}: {r['error']}")
            points.append(r)
            output.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"points": points}, indent=1) + "\n")
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"points": points}, indent=1) + "\n")
    return points


# ----- report -------------------------------------------------------------------------------

@dataclass
class RunSummary:
    """What the table and plots need from one run folder."""

    name: str
    settings: dict[str, Any]
    status: str
    epochs: int
    history: list[dict[str, Any]]
    knn_random_init: float | None = None
    message: str = ""

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def final_knn(self) -> float | None:
        vals = [h["knn_top1"] for h in self.history if h.get("knn_top1") is not None]
        return float(vals[-1]) if vals else None

    @property
    def best_knn(self) -> float | None:
        vals = [h["knn_top1"] for h in self.history if h.get("knn_top1") is not None]
        return float(max(vals)) if vals else None

    @property
    def max_acc1(self) -> float | None:
        return max(float(h["acc1"]) for h in self.history) if self.history else None

    @property
    def images_per_s(self) -> float | None:
        vals = [float(h["images_per_s"]) for h in self.history if h.get("images_per_s")]
        return statistics.mean(vals) if vals else None

    @property
    def train_seconds(self) -> float:
        return float(sum(float(h.get("seconds") or 0.0) for h in self.history))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "status": self.status,
                "epochs_done": len(self.history), "epochs": self.epochs,
                "final_loss": self.last.get("loss"), "final_acc1": self.last.get("acc1"),
                "max_acc1": self.max_acc1, "final_knn_top1": self.final_knn,
                "best_knn_top1": self.best_knn, "knn_random_init": self.knn_random_init,
                "images_per_s": self.images_per_s, "train_seconds": self.train_seconds,
                "message": self.message}


def collect(spec: AblationSpec, output: Path,
            overrides: dict[str, Any] | None = None) -> list[RunSummary]:
    """Read every run's metrics.jsonl (runs never started are listed with no history)."""
    out = []
    for r in spec.runs:
        run_dir = output / r.name
        cfg = run_config(spec, r, run_dir, overrides)
        history = read_metrics(run_dir / "metrics.jsonl")
        status = run_status(run_dir, cfg.epochs)
        base = next((h.get("knn_random_init") for h in history
                     if h.get("knn_random_init") is not None), None)
        msg = (run_dir / FAILED_MARKER).read_text().strip() if status == "failed" else ""
        out.append(RunSummary(r.name, r.settings, status, cfg.epochs, history, base, msg))
    return out


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _mb(v: Any) -> str:
    return "–" if v is None else f"{float(v) / 2**20:.0f} MB"


def results_table(summaries: list[RunSummary]) -> str:
    """The markdown table of results.md."""
    head = ("| run | settings | status | final loss | pretext acc@1 (final / max) | kNN top-1 "
            "(final / best) | img/s | train time |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        settings = ", ".join(f"{k}={_fmt_value(v)}" for k, v in s.settings.items()) or "(base)"
        status = s.status if s.status != "partial" else f"partial ({len(s.history)}/{s.epochs} ep)"
        if s.status == "failed":
            status = f"failed: {s.message.splitlines()[0][:80] if s.message else ''}"
        lines.append(
            f"| {s.name} | {settings} | {status} | {_f(s.last.get('loss'), '{:.3f}')} | "
            f"{_f(s.last.get('acc1'), '{:.1f}')} / {_f(s.max_acc1, '{:.1f}')} | "
            f"{_f(s.final_knn)} / {_f(s.best_knn)} | {_f(s.images_per_s, '{:.0f}')} | "
            f"{_duration(s.train_seconds)} |")
    return "\n".join(lines)


def cost_table(points: list[dict[str, Any]]) -> str:
    lines = ["| mechanism | batch | negatives per query | peak memory | memory of the step | "
             "time / step (median, fastest) | img/s | memory measured as |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['mechanism']} | {p['batch_size']} | {p.get('dictionary_size', '–')} "
                         f"| {p['error'][:60]} | | | | |")
            continue
        lines.append(
            f"| {p['mechanism']} | {p['batch_size']} | {p['dictionary_size']} | "
            f"{_mb(p['peak_bytes'])} | {_mb(p['step_bytes'])} | "
            f"{p['time_per_step_s'] * 1000:.0f} ms, "
            f"{p.get('min_time_per_step_s', p['time_per_step_s']) * 1000:.0f} ms | "
            f"{p['images_per_s']:.0f} | {p['memory_kind']} |")
    return "\n".join(lines)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summaries: list[RunSummary], key: str, ylabel: str, title: str, path: Path,
                baseline: bool = False) -> bool:
    """One line per run of ``key`` per epoch (kNN curves start at epoch 0 = random init)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for s in summaries:
        pts = [(h["epoch"], h[key]) for h in s.history if h.get(key) is not None]
        if baseline and pts and s.knn_random_init is not None:
            pts = [(0, s.knn_random_init)] + pts
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], "o-", ms=3, label=s.name)
            drawn = True
    inits = [s.knn_random_init for s in summaries if s.knn_random_init is not None]
    if baseline and inits:
        ax.axhline(statistics.mean(inits), color="gray", ls=":",
                   label=f"random init ({statistics.mean(inits):.1f}%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_step_loss(summaries: list[RunSummary], output: Path, path: Path) -> bool:
    """Per-step loss from each run's TensorBoard scalars (``step/loss``): the m = 0 "loss
    oscillates" signature is visible here rather than in epoch means."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for s in summaries:
        tb = output / s.name / "tb"
        if not tb.is_dir():
            continue
        try:
            acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
            acc.Reload()
            events = acc.Scalars("step/loss") if "step/loss" in acc.Tags().get("scalars", []) else []
        except Exception:  # a half-written event file: skip the run's curve
            continue
        if events:
            ax.plot([e.step for e in events], [e.value for e in events], lw=0.8, label=s.name)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("loss per step")
    if drawn:
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_sweep(summaries: list[RunSummary], sweep: list[str], path: Path) -> bool:
    """Final kNN top-1 (left) and final pretext acc@1 (right) against the swept value. With
    two swept settings: x = the first, one line per value of the second. Runs without a
    swept setting are placed by name."""
    done = [s for s in summaries if s.history]
    if not done:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    x_key = sweep[0] if sweep else None
    group_key = sweep[1] if len(sweep) > 1 else None

    def xlabel(s: RunSummary) -> str:
        return _fmt_value(s.settings[x_key]) if x_key and x_key in s.settings else s.name

    xs: list[str] = []
    for s in done:
        if xlabel(s) not in xs:
            xs.append(xlabel(s))
    groups: dict[str, list[RunSummary]] = {}
    for s in done:
        if x_key and x_key not in s.settings:
            g = "other runs"
        else:
            g = (f"{group_key}={_fmt_value(s.settings[group_key])}"
                 if group_key and group_key in s.settings else "")
        groups.setdefault(g, []).append(s)
    for ax, metric, label in ((axes[0], "knn", "final kNN top-1 (%)"),
                              (axes[1], "acc1", "final pretext acc@1 (%)")):
        for g, members in groups.items():
            pts = []
            for s in members:
                v = s.final_knn if metric == "knn" else s.last.get("acc1")
                if v is not None:
                    pts.append((xs.index(xlabel(s)), float(v)))
            if pts:
                ax.plot([p for p, _ in pts], [v for _, v in pts], "o" if g == "other runs" else "o-",
                        label=g or None)
        if metric == "knn":
            inits = [s.knn_random_init for s in done if s.knn_random_init is not None]
            if inits:
                ax.axhline(statistics.mean(inits), color="gray", ls=":", label="random init")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=20 if max(len(x) for x in xs) > 6 else 0, fontsize=8)
        ax.set_xlabel(x_key or "run")
        ax.set_ylabel(label)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    fig.suptitle("final values against the swept setting")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_cost(points: list[dict[str, Any]], path: Path) -> bool:
    """Memory of the step (left) and time per step (right) against the batch size, one line
    per mechanism."""
    ok = [p for p in points if "error" not in p]
    if not ok:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    cuda = any(str(p.get("device", "")).startswith("cuda") for p in ok)
    for mech in dict.fromkeys(p["mechanism"] for p in ok):
        pts = sorted((p["batch_size"], p) for p in ok if p["mechanism"] == mech)
        bs = [b for b, _ in pts]
        mem_key = "peak_bytes" if cuda else "step_bytes"
        a1.plot(bs, [p[mem_key] / 2**20 for _, p in pts], "o-", label=mech)
        a2.plot(bs, [p.get("min_time_per_step_s", p["time_per_step_s"]) * 1000 for _, p in pts],
                "o-", label=mech)
    sizes = sorted({p["batch_size"] for p in ok})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    a1.set_ylabel("peak GPU memory (MB)" if cuda else "peak RSS rise during the steps (MB)")
    a2.set_ylabel("time per step (ms, fastest of the timed steps)")
    fig.suptitle("cost per training step by mechanism (cf. MoCo v2 Table 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(spec: AblationSpec, output: Path, *,
                 overrides: dict[str, Any] | None = None) -> Path:
    """results.md, results.json and the PNG plots from whatever the run folders hold."""
    output.mkdir(parents=True, exist_ok=True)
    summaries = collect(spec, output, overrides)
    plots = []
    if plot_curves(summaries, "knn_top1", "kNN top-1 (%)", "kNN accuracy per epoch",
                   output / "knn.png", baseline=True):
        plots.append(("kNN top-1 per epoch", "knn.png"))
    if plot_curves(summaries, "acc1", "pretext acc@1 (%)",
                   "pretext accuracy per epoch (near 100%: BN 'cheating')",
                   output / "pretext.png"):
        plots.append(("pretext accuracy per epoch", "pretext.png"))
    if plot_curves(summaries, "loss", "InfoNCE loss (epoch mean)", "loss per epoch",
                   output / "loss.png"):
        plots.append(("loss per epoch", "loss.png"))
    if plot_step_loss(summaries, output, output / "step_loss.png"):
        plots.append(("loss per step", "step_loss.png"))
    if plot_sweep(summaries, spec.sweep, output / "sweep.png"):
        plots.append(("final values against the swept setting", "sweep.png"))
    cost_points: list[dict[str, Any]] = []
    if (output / "cost.json").is_file():
        try:
            cost_points = list(json.loads((output / "cost.json").read_text()).get("points", []))
        except ValueError:
            cost_points = []
    if cost_points and plot_cost(cost_points, output / "cost.png"):
        plots.append(("cost per step by mechanism", "cost.png"))

    base_cfg = run_config(spec, RunSpec("base", {}), output / "base", overrides)
    shown = {k: v for k, v in {**spec.base, **(overrides or {})}.items() if k != "data"}
    lines = [f"# {spec.title or spec.name}", ""]
    if spec.source is not None:
        lines += [f"Grid file: `{spec.source}`. Re-run `moco ablate {spec.source}` to continue "
                  "or refresh this report.", ""]
    if spec.expect:
        lines += ["## What the papers say it should show", "", spec.expect, ""]
    if spec.budget:
        lines += [f"Budget: {spec.budget}", ""]
    lines += ["## Setup", "",
              f"Data: `{base_cfg.data}`"
              + (f", {base_cfg.train_subset}-image class-balanced subset" if base_cfg.train_subset
                 else "") + f"; {base_cfg.epochs} epochs; {base_cfg.arch} at "
              f"{base_cfg.image_size} px; preset `{spec.preset or base_cfg.preset or 'none'}`.",
              "", "Base settings: " + (", ".join(f"`{k}={_fmt_value(v)}`" for k, v in shown.items())
                                       or "(preset defaults)"),
              "", f"Device: {base_cfg.device}; torch {torch.__version__}; "
              f"{os.cpu_count()} CPU cores; report written {time.strftime('%Y-%m-%d %H:%M')}.",
              "", "## Results", "",
              "kNN: weighted kNN (k, t as configured) of the test split against the full train "
              "split, on the encoder's features. Pretext acc@1: how often the positive wins among "
              "1 + K (end-to-end: among the batch). img/s and train time: training steps only, "
              "without kNN evaluation.", "", results_table(summaries), ""]
    inits = [s.knn_random_init for s in summaries if s.knn_random_init is not None]
    if inits:
        lines += [f"kNN top-1 of the randomly initialised network: {statistics.mean(inits):.2f}% "
                  "(a run has learned something only above this).", ""]
    if cost_points:
        lines += ["## Cost per step (analogue of MoCo v2 Table 3)", "",
                  "Synthetic batches, no data loading, after a warm-up step. 'memory of the "
                  "step': rise of the allocated memory (GPU) or of the peak RSS (CPU) during a "
                  "steady-state step over the memory held between steps (weights, gradients, "
                  "SGD state, bank): activations and temporaries. 'peak memory': CUDA peak "
                  "allocated over all steps, or the process's peak RSS including the PyTorch "
                  "libraries. On a shared CPU the median time follows the machine's load; the "
                  "fastest step is closer to the mechanism's own cost.", "",
                  cost_table(cost_points), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{t}]({p})" for t, p in plots] + [""]
    path = output / "results.md"
    path.write_text("\n".join(lines))
    (output / "results.json").write_text(json.dumps(
        {"name": spec.name, "runs": [s.to_dict() for s in summaries], "cost": cost_points},
        indent=1) + "\n")
    return path


def default_output(spec: AblationSpec) -> Path:
    return Path(spec.output) if spec.output else Path("runs/ablations") / spec.name


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
    progress: bool = True,
    log: Log = print,
) -> tuple[Path, list[RunOutcome]]:
    """Train the grid (skipping finished runs), measure the cost points, write the report.
    ``cost_only``: measure the cost points without training; ``report_only``: neither.
    Returns results.md's path and what happened to each run."""
    out = output if output is not None else default_output(spec)
    outcomes: list[RunOutcome] = []
    if cost_only and not report_only:
        if spec.cost is None:
            raise AblationError(f"grid {spec.name} has no 'cost:' section to measure")
        run_cost(spec, out, overrides=overrides, log=log)
    elif not report_only:
        outcomes = run_grid(spec, out, overrides=overrides, only=only, overwrite=overwrite,
                            retry_failed=retry_failed, progress=progress, log=log)
        stopped = any(o.status == "stopped" for o in outcomes)
        if cost and spec.cost is not None and not stopped and not only:
            run_cost(spec, out, overrides=overrides, log=log)
    return write_report(spec, out, overrides=overrides), outcomes
