"""Which machine a figure was measured on: the CPU model, its cores, the torch threads and the
GPU, so that a run's images/s and times can be read against the hardware that produced them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device | str = "cpu") -> str:
    """``'AMD EPYC, 2 cores, 1 torch thread'``, or with the GPU for a CUDA device:
    ``'NVIDIA H100 80GB HBM3; AMD EPYC, 16 cores, 8 torch threads'``."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    cpu = (f"{cpu_model()}, {os.cpu_count()} cores, "
           f"{threads} torch thread{'s' if threads != 1 else ''}")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)}; {cpu}"
    return cpu
