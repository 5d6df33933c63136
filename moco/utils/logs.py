"""Logging in moco. Library code never prints: each module logs with :mod:`logging` under the
``moco`` logger, and the long operations (:func:`moco.engine.loop.pretrain`, linear
classification, ablation grids) also take a :data:`Log` callback for their narrative lines
(one per epoch, resumes, stops), by default the ``moco`` logger at INFO. A program that
uses the library sees these lines once it configures logging, e.g.
``logging.basicConfig(level=logging.INFO)``.

The ``moco`` command shows the records on stderr as bare lines (:func:`show_on_stderr`) and
prints its narrative on stdout, as it always has.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

#: A callback that takes one log line.
Log = Callable[[str], None]

LOGGER = "moco"


def quiet(_msg: str) -> None:
    """A :data:`Log` that drops every line."""


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (a redirected or
    captured stderr included), as ``logging.lastResort`` does."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def show_on_stderr(level: int = logging.INFO) -> None:
    """Show the ``moco`` logger's records of ``level`` and above on stderr, one bare line
    each (what the command line does; calling it again adds nothing)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        logger.addHandler(_CurrentStderr())
    logger.setLevel(level)


def on_terminal() -> bool:
    """Whether stderr (where progress bars and the command's records go) is a terminal: the
    library shows a progress bar only then, or when asked."""
    return sys.stderr.isatty()
