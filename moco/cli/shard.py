"""``moco shard DATA OUT --shard-size 1GB``: write an ImageFolder tree as tar shards."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "shard", help="write an ImageFolder tree as tar shards (WebDataset layout)",
        description="Write DATA/train, DATA/val and DATA/test (those present) as tar shards in "
        "OUT/train/, OUT/val/, OUT/test/: members KEY.jpg (the file's bytes, unchanged) and "
        "KEY.cls (the class index), samples in a shuffled order drawn from --seed (the same "
        "DATA and seed give the same shards), class names in classes.txt. Every command that "
        "takes DATA takes OUT as well; training reads the shards sequentially.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", help="dataset folder with train/ (and val/ or test/)")
    p.add_argument("out", metavar="OUT", help="output folder (not inside DATA)")
    p.add_argument("--shard-size", default="1GB", help="largest shard: 100KB, 64MB, 1GB, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moco.data.shard_writer import parse_size, write_shards

    done = write_shards(Path(args.data), Path(args.out), parse_size(args.shard_size),
                        seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress)
    for s in done:
        print(s.describe(Path(args.out)))
    return 0
