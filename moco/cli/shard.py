"""``moco shard DATA OUT --shard-size 1GB``: write an ImageFolder tree as tar shards; the
flags are generated from :class:`ShardSettings`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco.cli.declared import Progress, add_declared, given_values, split_values
from moco.utils import common_settings as common
from moco.utils.settings import REQUIRED, check_fields, from_parameters, setting


@dataclass
class ShardSettings:
    """The settings of ``moco shard``."""

    data: str = setting(REQUIRED, "data", group="shards", metavar="DATA", role="data",
                        help="dataset folder with train/ (and val/ or test/)")
    out: str = setting(REQUIRED, "out", group="shards", metavar="OUT", role="runtime",
                       help="output folder (not inside DATA)")
    shard_size: str = setting("1GB", "--shard-size", group="shards",
                              help="largest shard: 100KB, 64MB, 1GB, ...")
    seed: int = common.seed(group="shards", help="seed of the sample order")
    overwrite: bool = setting(False, "--overwrite", group="shards", role="runtime",
                              help="replace shards already in OUT")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("ShardSettings"))


#: The declaration of every flag of ``moco shard``.
DECLARED = (ShardSettings, Progress)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "shard", help=COMMANDS["shard"],
        description="Write DATA/train, DATA/val and DATA/test (those present) as tar shards in "
        "OUT/train/, OUT/val/, OUT/test/: members KEY.jpg (the file's bytes, unchanged) and "
        "KEY.cls (the class index), samples in a shuffled order drawn from --seed (the same "
        "DATA and seed give the same shards), class names in classes.txt. Every command that "
        "takes DATA takes OUT as well; training reads the shards sequentially.",
    )
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.data.shard_writer import parse_size, write_shards

    values, flags = split_values(given_values(args, DECLARED), ShardSettings)
    cfg = ShardSettings(**values)
    done = write_shards(Path(cfg.data), Path(cfg.out), parse_size(cfg.shard_size),
                        seed=cfg.seed, overwrite=cfg.overwrite,
                        progress=not flags.get("no_progress", False))
    for s in done:
        print(s.describe(Path(cfg.out)))
    return 0
