"""Peak memory and time per training step of a mechanism at a batch size, on synthetic
batches (the analogue of MoCo v2 Table 3)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moco.engine.config import MocoConfig

if TYPE_CHECKING:
    from moco.core.shuffle_bn import KeyShuffle
    from moco.data.batches import Batch


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
        RSS before the timed steps. Peak RSS counts the PyTorch libraries too: compare
        ``step_bytes`` across mechanisms. RSS follows the tensors only if freed memory goes
        back to the OS, which :func:`measure_isolated` arranges.

    Time: median wall time of the timed steps (CUDA synchronised). Errors (out of memory, a
    batch SplitBatchNorm cannot split) are returned in ``error`` instead of raised.
    """
    from moco.utils.runtime import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    split = cfg.shuffle_bn in ("split", "auto", "ddp")
    cfg = dataclasses.replace(cfg, shuffle_bn="split" if split else "none")
    dtype = resolve_precision(cfg.precision, device)
    b = cfg.batch_size
    result: dict[str, Any] = {
        "mechanism": cfg.mechanism, "batch_size": b, "device": str(device),
        "dictionary_size": dictionary_size(cfg.mechanism, b, cfg.moco_k),
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)",
        "steps": steps, "threads": torch.get_num_threads(),
    }
    try:
        bench = _build_bench(cfg, device, dtype, max(num_samples, b))
        result.update(_timed_steps(bench, steps, warmup, result))
    except (torch.OutOfMemoryError, MemoryError) as e:
        result["error"] = f"out of memory: {str(e).splitlines()[0] if str(e) else ''}"
    except (RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        result["error"] = ("out of memory: " + msg) if "memory" in msg.lower() else msg
    return result


@dataclass
class _Bench:
    """What a measured step runs: the model and its optimizer on ``device``, one synthetic
    batch, the key shuffle and the autocast dtype (None: full precision)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: Batch
    shuffle: KeyShuffle
    device: torch.device
    dtype: torch.dtype | None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _build_bench(cfg: MocoConfig, device: torch.device, dtype: torch.dtype | None,
                 num_samples: int) -> _Bench:
    """``cfg``'s model and optimizer, and one batch of two views [B,3,S,S] of random images
    with ``num_samples`` possible indices (the memory bank's size)."""
    from moco.core.seeding import stream_generator
    from moco.core.shuffle_bn import LocalShuffle, NoShuffle
    from moco.data.batches import Batch
    from moco.engine.build import build_model, build_optimizer

    b, s = cfg.batch_size, cfg.image_size
    model = build_model(cfg, device, num_samples=num_samples).train()
    optimizer = build_optimizer(cfg, model)
    shuffle: KeyShuffle = (LocalShuffle(stream_generator(0)) if cfg.shuffle_bn == "split"
                           else NoShuffle())
    g = stream_generator(0)
    ims = [torch.randn(b, 3, s, s, generator=g).to(device) for _ in range(2)]
    if cfg.channels_last_on(device.type):
        ims = [x.contiguous(memory_format=torch.channels_last) for x in ims]
    batch = Batch(ims[0], ims[1], torch.randperm(num_samples, generator=g)[:b])
    return _Bench(model, optimizer, batch, shuffle, device, dtype)


def _timed_steps(bench: _Bench, steps: int, warmup: int, result: dict[str, Any]) -> dict[str, Any]:
    """Run ``warmup`` + ``steps`` training steps; the timed steps' times and memory."""
    if bench.cuda:
        torch.cuda.synchronize(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
    times = []
    base = step_peak_from = 0
    for i in range(warmup + steps):
        if i == warmup:  # steady state from here: weights, grads and SGD state exist
            base, step_peak_from = _start_memory(bench, result)
        t0 = time.perf_counter()
        _train_step(bench)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if bench.cuda:
        step_peak = torch.cuda.max_memory_allocated(bench.device)
        peak = max(step_peak, step_peak_from)
    else:
        step_peak = peak = _peak_rss_bytes()
    t = statistics.median(times)
    return {"time_per_step_s": t, "min_time_per_step_s": min(times),
            "images_per_s": bench.batch.im_q.shape[0] / t, "peak_bytes": int(peak),
            "step_bytes": int(max(0, step_peak - base))}


def _start_memory(bench: _Bench, result: dict[str, Any]) -> tuple[int, int]:
    """Before the timed steps: (the memory held between steps, the peak so far); the peak
    counters are reset (on the CPU where the kernel allows, else ``memory_kind`` says so)."""
    gc.collect()
    if bench.cuda:
        torch.cuda.synchronize(bench.device)
        base = torch.cuda.memory_allocated(bench.device)
        peak_so_far = torch.cuda.max_memory_allocated(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        return base, peak_so_far
    if not _reset_peak_rss():
        result["memory_kind"] = "peak RSS (ru_maxrss, not resettable: a lower bound)"
    return _rss_bytes(), 0


def _train_step(bench: _Bench) -> None:
    """One forward, backward and SGD step on the synthetic batch (CUDA: synchronised)."""
    batch, dtype = bench.batch, bench.dtype
    with torch.autocast(bench.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = bench.model(batch.im_q, batch.im_k, bench.shuffle, batch.index)
    bench.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    bench.optimizer.step()
    del out
    if bench.cuda:
        torch.cuda.synchronize(bench.device)


def child_main() -> None:
    """Entry of the isolated measurement process: JSON on stdin, one result line on stdout."""
    payload = json.loads(sys.stdin.read())
    cfg = MocoConfig(**payload["cfg"])
    r = measure_step_cost(cfg, payload["num_samples"], payload["steps"], payload["warmup"])
    print("COST_RESULT " + json.dumps(r), flush=True)


def measure_isolated(cfg: MocoConfig, num_samples: int, steps: int, warmup: int) -> dict[str, Any]:
    payload = json.dumps({"cfg": cfg.to_dict(), "num_samples": num_samples, "steps": steps,
                          "warmup": warmup})
    # A fixed mmap threshold disables glibc's dynamic one: tensors >= 128 KiB are mmapped and
    # returned to the OS when freed, so the RSS follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, "-c", "from moco.ablation.step_cost import child_main; child_main()"],
        input=payload, capture_output=True, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("COST_RESULT "):
            return dict(json.loads(line[len("COST_RESULT "):]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    why = "killed (out of memory?)" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return {"mechanism": cfg.mechanism, "batch_size": cfg.batch_size,
            "dictionary_size": dictionary_size(cfg.mechanism, cfg.batch_size, cfg.moco_k),
            "error": f"measurement process failed ({why}): {tail}"}

