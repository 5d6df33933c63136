"""moco.core.seeding: every stream's formula pinned (resumes and reference comparisons depend
on the values), and no other module mixing seeds of its own."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from moco.core import seeding
from moco.data.batches import step_generator
from moco.data.crop_loader import position_generator
from moco.data.datasets import epoch_order

PACKAGE = Path(__file__).resolve().parents[2] / "moco"


def _draw(g: torch.Generator) -> list[int]:
    return torch.randint(0, 2**31, (4,), generator=g).tolist()


def test_keyed_streams_are_sha256_of_the_key() -> None:
    digest = hashlib.sha256(b"moco-aug/7/3/11").digest()
    expected = int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert seeding.keyed_seed("moco-aug", 7, 3, 11) == expected
    assert _draw(step_generator(7, 3, 11)) == _draw(torch.Generator().manual_seed(expected))
    digest = hashlib.sha256(b"moco-crop/7/3/11/5").digest()
    crop = int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert _draw(position_generator(7, 3, 11, 5)) == _draw(torch.Generator().manual_seed(crop))


def test_epoch_and_long_lived_streams() -> None:
    assert seeding.epoch_seed(5, 2) == 5 * 1_000_003 + 2
    assert seeding.epoch_seed(5, 2, seeding.STALENESS) == 5 * 1_000_003 + 2 + 3
    order, seeds = epoch_order(10, 5, 2)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    assert torch.equal(order, torch.randperm(10, generator=g))
    assert torch.equal(seeds, torch.randint(0, 2**62, (10,), generator=g))
    assert (seeding.QUEUE, seeding.KEY_SHUFFLE, seeding.BANK_SAMPLING) == (1, 2, 3)
    assert _draw(seeding.stream_generator(9, seeding.KEY_SHUFFLE)) == _draw(
        torch.Generator().manual_seed(11))


def test_seeded_restores_the_global_stream() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with seeding.seeded(42):
        inside = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(42)
    assert torch.equal(inside, torch.rand(2))


def test_no_module_mixes_seeds_of_its_own() -> None:
    mixing = re.compile(r"manual_seed\(|fork_rng\(|1_000_003|seed \* |seed \+ \d|sha256\([^)]*seed")
    found = []
    for p in sorted(PACKAGE.rglob("*.py")):
        if p.name == "seeding.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if mixing.search(code) and "``" not in code:
                found.append(f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not found, "seeds derived outside moco.core.seeding:\n" + "\n".join(found)
