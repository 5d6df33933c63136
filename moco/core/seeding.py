"""Every random stream of a run, derived from its one ``--seed`` here and nowhere else.

Three ways to derive a stream, each with fixed formulas (checkpoints, exact resumes and the
reference comparisons depend on their values, so they never change):

* :func:`stream_generator`: a generator for one of the run's long-lived streams, ``seed +
  offset`` (the :data:`QUEUE` init, the :data:`KEY_SHUFFLE` permutations, the
  :data:`BANK_SAMPLING` of the memory bank);
* :func:`epoch_generator`: the order of one epoch (and the staleness probe's shuffles),
  ``seed * 1000003 + epoch + offset``;
* :func:`keyed_generator`: a stream per (seed, epoch, step, ...) key through SHA-256 (the
  batched augmentation, redrawn crops, shard order), so that any step can be drawn on its own
  on any process (exact mid-epoch resumes, the same views for any process count).

All are CPU ``torch.Generator`` objects: the same numbers on every device. Code that draws
from torch's global generator (torchvision's transforms, weight initialisation) runs under
:func:`seeded` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

#: Offsets of the long-lived streams from ``--seed`` (the model's weights use ``seed`` itself).
QUEUE = 1  #: the queue's (or the memory bank's) random initial keys
KEY_SHUFFLE = 2  #: Shuffling BN's permutations of the key batch
BANK_SAMPLING = 3  #: the memory bank's draws of negatives
#: Offset of the staleness probe's key shuffles from the epoch's stream (no training stream
#: uses it).
STALENESS = 3

_EPOCH_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs of nearby seeds do not collide


def stream_generator(seed: int, offset: int = 0) -> torch.Generator:
    """The generator of a run's long-lived stream ``offset`` (:data:`QUEUE`, ...)."""
    return torch.Generator().manual_seed(seed + offset)


def epoch_seed(seed: int, epoch: int, offset: int = 0) -> int:
    """The seed of epoch ``epoch``'s stream: ``seed * 1000003 + epoch + offset``."""
    return seed * _EPOCH_STRIDE + epoch + offset


def epoch_generator(seed: int, epoch: int, offset: int = 0) -> torch.Generator:
    """The generator of epoch ``epoch``'s stream (:func:`epoch_seed`)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, offset))


def keyed_seed(*key: object) -> int:
    """A 63-bit seed from a key (``"moco-aug", seed, epoch, step``): the first 8 bytes, little
    endian, of the SHA-256 of the key's parts joined by ``/``."""
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def keyed_generator(*key: object) -> torch.Generator:
    """The generator of :func:`keyed_seed` ``(*key)``."""
    return torch.Generator().manual_seed(keyed_seed(*key))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded by ``seed``, restored
    afterwards: the draws inside depend on ``seed`` only, and the caller's stream is left as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
