"""A per-test time limit for pytest, for the GPU check's CUDA tier (pytest-timeout is not a
dependency of this project): ``pytest -p pytest_deadline --deadline SECONDS`` with
``scripts/`` on the import path.

Each test (setup, call and teardown together) gets SECONDS:

* at SECONDS a SIGALRM handler fails the test (``pytest.fail``, so the run goes on with the
  next test); Python code and waits that Python interrupts (``subprocess`` waits, sleeps,
  reads) stop there;
* at SECONDS + ``--deadline-grace`` (default 15 s), if the test is still stuck (inside a
  CUDA call, say, where no Python handler runs), ``faulthandler`` prints every thread's
  stack and ends the process (exit code 1). The caller sees the test's name printed without
  an outcome (``-v``) and can run the remaining tests again (``scripts/gpu_check.py`` does).
"""

from __future__ import annotations

import faulthandler
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

# The process's real stderr, kept before pytest captures file descriptor 2 (this module is
# imported by -p before capturing starts): the stacks of a stuck test go there, not into a
# capture file that dies with the process.
_STDERR = os.fdopen(os.dup(2), "w", closefd=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("deadline")
    group.addoption("--deadline", type=float, default=0.0,
                    help="seconds per test (setup + call + teardown); 0: no limit")
    group.addoption("--deadline-grace", type=float, default=15.0,
                    help="seconds after the deadline before a stuck process is ended")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    limit = float(item.config.getoption("deadline"))
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return
    grace = float(item.config.getoption("deadline_grace"))

    def on_alarm(signum: int, frame: Any) -> None:
        msg = f"{item.nodeid} ran past its --deadline of {limit:g} s"
        _STDERR.write(f"\n[deadline] {msg}\n")  # now: a later crash would lose the summary
        _STDERR.flush()
        pytest.fail(msg, pytrace=True)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + grace, exit=True, file=_STDERR)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
