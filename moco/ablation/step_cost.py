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
from pathlib import Path
from typing import Any

import torch

from moco.engine.config import MocoConfig


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
    from moco.core.seeding import stream_generator
    from moco.core.shuffle_bn import KeyShuffle, LocalShuffle, NoShuffle
    from moco.data.batches import Batch
    from moco.engine.build import build_model, build_optimizer
    from moco.utils.runtime import resolve_device, resolve_precision

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
        shuffle: KeyShuffle = LocalShuffle(stream_generator(0)) if split else NoShuffle()
        g = stream_generator(0)
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

