"""Devices compared by what they are, and small host tensors sent without blocking.

A bare ``cuda`` compares unequal to the ``cuda:0`` every tensor reports: devices are
normalised with :func:`normalize_device` and compared with :func:`same_device`.
:func:`to_device` sends a host tensor to a GPU through pinned memory with a non-blocking copy;
:func:`packed_to_device` sends several small ones in one copy.
"""

from __future__ import annotations

import torch


def normalize_device(device: str | torch.device, current_index: int | None = None) -> torch.device:
    """``device`` with an index: ``cuda`` -> ``cuda:<current_index>`` (default: the current
    GPU); other devices as they are."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        idx = torch.cuda.current_device() if current_index is None else current_index
        return torch.device("cuda", idx)
    return dev


def same_device(a: str | torch.device, b: str | torch.device,
                current_index: int | None = None) -> bool:
    """Whether ``a`` and ``b`` are the same device: ``cuda`` is ``cuda:<current_index>``
    (default: the current GPU), ``cpu`` is ``cpu:0``."""
    da, db = torch.device(a), torch.device(b)
    if da.type != db.type:
        return False
    if da.type == "cuda" and (da.index is None or db.index is None):
        da, db = normalize_device(da, current_index), normalize_device(db, current_index)
    return (da.index or 0) == (db.index or 0)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host: a CPU tensor goes to a GPU through
    pinned memory with a non-blocking copy (a pageable copy waits for the GPU to drain its
    queue first). A no-op when ``t`` is already there."""
    if same_device(t.device, device):
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def packed_to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Small CPU tensors on ``device`` in ONE non-blocking copy: packed into one float64
    buffer (exact for flags, integers below 2^53, float32 and float64 values), sent through
    :func:`to_device`, unpacked and cast back on the device. On the CPU they are returned as
    they are."""
    if device.type == "cpu" or not tensors:
        return tensors
    flat = [t.reshape(-1).to(torch.float64) for t in tensors.values()]
    buf = to_device(torch.cat(flat), device)
    out, pos = {}, 0
    for (name, t), f in zip(tensors.items(), flat, strict=True):
        out[name] = buf[pos:pos + f.numel()].view(t.shape).to(t.dtype)
        pos += f.numel()
    return out
