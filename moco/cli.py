"""``moco`` command line: a thin layer over the library. Each subcommand lives in
``moco/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("pretrain", "lincls", "knn", "export", "embed", "ablate", "detectron2_config", "shard")


class UserError(Exception):
    """Raised for problems the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco",
        description="Momentum Contrast (MoCo v1/v2) self-supervised pretraining and evaluation.",
        epilog="Run 'moco COMMAND --help' for the flags of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"moco.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moco.checkpoint import CheckpointError
    from moco.data import DataError
    from moco.train import RunError

    try:
        return int(args.run(args))
    except (UserError, ValueError, CheckpointError, DataError, RunError, FileNotFoundError) as e:
        print(f"moco {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a folder removed under a run
        print(f"moco {args.command}: error: {e}; free space or fix the folder, then run the "
              "command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moco {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
