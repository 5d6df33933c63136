"""``moco`` command line: a thin layer over the library. Each subcommand lives in
``moco/cli/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``; its flags are
generated from the declaration of its settings (``DECLARED``, :mod:`moco.cli.declared`).
Only the module of the command given is imported: ``moco --help`` and ``moco --version``
load neither torch nor the commands.

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

from moco import __version__
from moco.core.errors import MocoError

#: Each command's module (``moco/cli/<name>.py``; the command is the name with dashes) and the
#: one line ``moco --help`` shows for it.
COMMANDS: dict[str, str] = {
    "pretrain": "pretrain a ResNet or a ViT with MoCo v1, v2 or v3 on a folder of images",
    "lincls": "linear classification on frozen features (the paper's protocol)",
    "knn": "weighted kNN accuracy of a pretrained encoder",
    "export": "export a pretrained encoder for torchvision, detectron2, safetensors or timm",
    "embed": "features of every image in a folder, as .npy or .safetensors",
    "ablate": "train a grid of runs (ablations, mechanisms) and tabulate/plot them",
    "detectron2_config": "the detectron2 fine-tuning command for a checkpoint (VOC, COCO)",
    "shard": "write an ImageFolder tree as tar shards (WebDataset layout)",
    "cache": "list or clean the cache folder (decoded images, folder indexes)",
    "neighbours": "a grid of query images and their nearest neighbours",
    "zoo": "the authors' released MoCo v1/v2/v3 weights: list, describe, download",
    "hub": "the Hugging Face Hub: push a folder written by export --format hf",
}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ("moco knn: error: ...; see --help")
    instead of the usage block followed by the error, and whose true/false flags may be
    followed by a positional argument (:func:`moco.cli.declared.expand_switches`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        switches = getattr(self, "moco_switches", None)
        if switches:
            from moco.cli.declared import expand_switches

            args = expand_switches(sys.argv[1:] if args is None else args, switches)
        return super().parse_known_args(args, namespace)


def command_of(argv: Sequence[str]) -> str | None:
    """The module name of the command ``argv`` names (its first word), or None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    name = word.replace("-", "_") if word else None
    return name if name in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``moco`` parser: with ``command``, only that command's module is imported and the
    others are listed by name and help; without, every command is built."""
    parser = OneLineParser(
        prog="moco",
        description="Momentum Contrast (MoCo v1, v2, v3) self-supervised pretraining and evaluation.",
        epilog="Run 'moco COMMAND --help' for the flags of each command.",
    )
    parser.add_argument("--version", action="version", version=f"moco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"moco.cli.{name}").add_parser(sub)
        else:
            sub.add_parser(name.replace("_", "-"), help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_of(argv) or "")
    from moco.utils.logs import show_on_stderr

    show_on_stderr()  # the library's log records, as bare lines
    args, extra = parser.parse_known_args(argv)
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
