"""``moco`` command line: a thin layer over the library. Each subcommand lives in
``moco/cli/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``; the numeric
flags of the evaluation commands are checked by :mod:`moco.eval.arguments`.

A :class:`~moco.core.errors.MocoError` (a problem the user can fix) and an ``OSError`` (a disk,
a permission) are printed as one line, exit status 2; any other exception is a bug and keeps
its traceback. The library's log records (:mod:`moco.utils.logs`) go to stderr as bare lines;
the commands' own narrative (one line per epoch, results) to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from moco.core.errors import MocoError

COMMANDS = ("pretrain", "lincls", "knn", "export", "embed", "ablate", "detectron2_config", "shard",
            "neighbours", "zoo", "hub")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ("moco knn: error: ...; see --help")
    instead of the usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="moco",
        description="Momentum Contrast (MoCo v1/v2) self-supervised pretraining and evaluation.",
        epilog="Run 'moco COMMAND --help' for the flags of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"moco.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from moco.utils.logs import show_on_stderr

    show_on_stderr()  # the library's log records, as bare lines
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # named by the command they were given to
        print(f"moco {args.command}: error: unrecognized arguments: {' '.join(extra)}; see "
              f"'moco {args.command} --help'", file=sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except MocoError as e:
        print(f"moco {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a folder removed under a run
        print(f"moco {args.command}: error: {one_line(e)}; free space or fix the folder, then "
              "run the command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moco {args.command}: interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException, limit: int = 1000) -> str:
    """The message of ``e`` on one line, at most ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
