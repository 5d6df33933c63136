"""How much memory this machine has free, how to say a number of bytes, and the refusal of
something that cannot fit."""

from __future__ import annotations

import os
from pathlib import Path

from moco.core.errors import ConfigError


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``; total physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units up to EiB, then powers of ten of EiB."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{int(value)} bytes"
    return f"{value:.3g} {units[i]}" if value < 1e6 else f"{value:.2e} {units[i]}"


FLOAT_BYTES = 4


def refuse_if_too_big(what: str, nbytes: int, fix: str, available: int | None = None) -> None:
    """:class:`ConfigError` when ``nbytes`` is more than the memory available now."""
    free = available_memory() if available is None else available
    if nbytes > free:
        raise ConfigError(f"{what} would take {format_bytes(nbytes)}, more than the "
                          f"{format_bytes(free)} of memory available on this machine; {fix}")
