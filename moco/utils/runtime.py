"""Where and how a run computes: the device, the autocast dtype, loader workers, backend flags.

One place for these choices, shared by pretraining, evaluation and the commands. Everything
that depends on the hardware takes it as an argument (CUDA present, the current GPU index,
whether the GPU has bf16 units), so the decisions are tested on machines without a GPU; the
``*_here`` defaults look the machine up.

* :func:`resolve_device`: ``auto``/``cpu``/``cuda``/``cuda:N`` -> an *indexed*
  ``torch.device`` (``cuda`` -> ``cuda:<current>``). A bare ``cuda`` compares unequal to the
  ``cuda:0`` every tensor reports, so devices are normalised once, here, and compared with
  :func:`moco.core.device.same_device`.
* :func:`resolve_precision`: ``auto`` -> bf16 autocast on GPUs with bf16 units (compute
  capability 8.0+: A100, H100, ...), fp16 + a grad scaler on older ones (V100, T4), fp32 on
  the CPU.
* :func:`configure_backends`: ``cudnn.benchmark`` on CUDA (the original sets it: fixed input
  shapes, so the fastest convolution algorithms are picked once).

Comparing devices and sending host tensors without blocking (``to_device``) are in
:mod:`moco.core.device`, which the paper's parts use too.
"""

from __future__ import annotations

import os

import torch

from moco.core.device import normalize_device
from moco.core.errors import DeviceError

DEVICE_HELP = "auto, cpu, cuda, cuda:1, ..."



def _cuda_here() -> tuple[bool, int, int]:
    """(CUDA available, number of GPUs, current GPU index) of this machine."""
    if not torch.cuda.is_available():
        return False, 0, 0
    return True, torch.cuda.device_count(), torch.cuda.current_device()


def resolve_device(name: str | torch.device, *, cuda: tuple[bool, int, int] | None = None) -> torch.device:
    """The device a ``--device`` value names, indexed (``cuda`` -> ``cuda:<current>``).

    ``cuda``: (CUDA available, GPU count, current GPU index), default this machine's. A name
    that is not a device, CUDA when there is none, or a GPU index past the last one is a
    :class:`DeviceError` with a one-line message.
    """
    available, count, current = cuda if cuda is not None else _cuda_here()
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        dev = torch.device("cuda" if available else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise DeviceError(f"--device {name!r} is not a device ({DEVICE_HELP})") from None
    if dev.type == "cuda":
        if not available:
            raise DeviceError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to "
                           f"cuda:{count - 1}; choose one of them")
        return normalize_device(dev, current)
    if dev.type not in ("cpu", "mps", "xpu"):
        raise DeviceError(f"--device {name}: {dev.type} is not supported ({DEVICE_HELP})")
    return dev


def native_bf16_here(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes bf16 natively (compute capability 8.0+), not by
    emulation. ``torch.cuda.is_bf16_supported()`` counts emulation by default."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the keyword (before 2.4)
            return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device,
                      native_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device``, or None for fp32.

    ``auto``: bf16 on a GPU with bf16 units (``native_bf16``, default looked up), fp16 on an
    older GPU (trained with a grad scaler), fp32 on the CPU. ``fp16`` needs CUDA.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        bf16 = native_bf16_here(device) if native_bf16 is None else native_bf16
        return torch.bfloat16 if bf16 else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs CUDA; on the CPU use bf16 or fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise DeviceError(f"--precision {precision!r}: choose auto, fp32, bf16 or fp16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 autocast trains with a loss scaler (its range is too small for raw gradients)."""
    return dtype == torch.float16


def default_workers(device: torch.device, processes_here: int = 1, cores: int | None = None) -> int:
    """Loader workers per process (``-j -1``): this machine's cores shared by its processes;
    up to 8 per GPU, cores - 1 on the CPU (the main process computes there too)."""
    cores = max(1, (cores if cores is not None else (os.cpu_count() or 1)) // processes_here)
    return min(8, cores) if device.type == "cuda" else max(1, cores - 1)


def configure_backends(device: torch.device) -> None:
    """Backend flags for training on ``device``: ``cudnn.benchmark`` on CUDA, as the original
    (every step has the same shapes, so the autotuned algorithms are reused)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


