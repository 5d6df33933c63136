"""Stopping a run cleanly on SIGTERM / SIGINT: the step finishes, the run saves and exits."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes the current step, saves and exits. A second
    SIGINT (Ctrl-C twice) does not wait: it raises KeyboardInterrupt at once (saves are atomic,
    so the newest checkpoint stays whole)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


@contextmanager
def stop_on_signals(stop: StopFlag) -> Iterator[StopFlag]:
    """``stop`` handles SIGTERM and SIGINT inside the block; the previous handlers come back
    after it. Signal handlers can only be set from the main thread: a run in another thread
    has none."""
    old = ({sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
           if threading.current_thread() is threading.main_thread() else {})
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
