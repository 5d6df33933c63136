"""``moco cache list|clean``: what the cache folder holds (decoded images, folder and shard
indexes, builds a stopped run left) and its removal. Every entry is rebuilt when a run needs
it again; the data folders are never touched."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from moco.cli.declared import add_declared, given_values
from moco.utils.settings import REQUIRED, check_fields, from_parameters, setting

ACTIONS = ("list", "clean")
KINDS = {"images": "decoded images", "index": "index", "unfinished": "unfinished build"}


@dataclass
class CacheSettings:
    """The settings of ``moco cache``."""

    action: str = setting(REQUIRED, "action", group="cache", metavar="ACTION",
                          choices=ACTIONS, role="runtime", help="list: show the entries; "
                          "clean: remove them")
    cache_dir: str = setting("", "--cache-dir", group="cache", role="runtime",
                             default_text="$MOCO_CACHE, else ~/.cache/moco",
                             help="the cache folder")
    older_than: float = setting(0.0, "--older-than", group="cache", min=0, metavar="DAYS",
                                role="runtime", help="only the entries unused for more than "
                                "DAYS days (0: all)")
    dry_run: bool = setting(False, "--dry-run", group="cache", role="runtime",
                            help="clean: say what would be removed, remove nothing")

    def __post_init__(self) -> None:
        check_fields(self, from_parameters("CacheSettings"))


#: The declaration of every flag of ``moco cache``.
DECLARED = (CacheSettings,)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "cache", help=COMMANDS["cache"],
        description="The cache folder (--cache-dir of pretrain, $MOCO_CACHE, else "
        "~/.cache/moco) keeps the decoded images of small datasets and the index of every "
        "folder and shard set read. 'list' shows each entry (size, last use, source); 'clean' "
        "removes them (those unused for --older-than DAYS only, when given); a run rebuilds "
        "what it needs. A build in progress is left alone.",
    )
    add_declared(p, DECLARED)
    p.set_defaults(run=run)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def run(args: argparse.Namespace) -> int:
    from moco.data.cache_dir import cache_entries, remove_cache_entry, resolve_cache_dir

    cfg = CacheSettings(**given_values(args, DECLARED))
    root = resolve_cache_dir(cfg.cache_dir or None)
    now = time.time()
    entries = [e for e in cache_entries(root)
               if not cfg.older_than or now - e.last_used > cfg.older_than * 86400]
    total = sum(e.nbytes for e in entries)
    if cfg.action == "list":
        for e in entries:
            days = (now - e.last_used) / 86400
            source = f"  {e.source}" if e.source else ""
            print(f"{_size(e.nbytes):>9}  {days:6.1f} days  {KINDS[e.kind]:16s} {e.path}{source}")
        print(f"{len(entries)} entries, {_size(total)} in {root}")
        return 0
    removed = [e for e in entries if cfg.dry_run or remove_cache_entry(e)]
    freed = sum(e.nbytes for e in removed)
    verb = "would remove" if cfg.dry_run else "removed"
    print(f"{verb} {len(removed)} of {len(entries)} entries, {_size(freed)} in {root}")
    return 0
