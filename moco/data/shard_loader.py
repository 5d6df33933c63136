"""Training from tar shards (:mod:`moco.data.shards`): each reader reads its part of the shards
sequentially, shuffles with a buffer, and produces whole steps (original-size crops,
:mod:`moco.data.crop_loader`).

The sample order of an epoch is a function of (seed, epoch, processes R, readers W per
process, batch B, buffer K) and of the index only:

1. the shards are permuted by (seed, epoch) and their samples concatenated into one stream;
   an epoch has S = ⌊N / (R·B)⌋ steps, as the folder loaders, so the N - S·R·B samples left
   out (under one global batch) are a window of the stream at a position drawn from
   (seed, epoch): every sample is read each epoch but those, and they change every epoch,
   with one shard too;
2. the rest of the stream is cut into R·W contiguous parts, part r·W + w going to reader w
   of rank r and holding S_w·B samples, S_w the steps t < S with t mod W = w: every sample
   at most once per epoch, reads sequential within a part;
3. each part is shuffled with a buffer of K samples (take the first K; then each output is
   a uniform pick from the buffer, replaced by the next sample read) drawn from
   (seed, epoch, rank, reader);
4. step t of rank r is batch ⌊t / W⌋ of reader t mod W: the DataLoader's round-robin over
   its W workers gives the steps in order (a reader with one step fewer ends first).

A checkpoint saves the run's layout (R, W, K, B and the shards' fingerprint) beside the
step; ``--resume`` keeps W and K (W reader workers whatever ``-j`` says): each reader
recomputes its order, seeks to the first sample still to come and reads on, so the batches
are bit-identical to the uninterrupted run's on the CPU. Resuming mid-epoch with another
process count is refused (the parts would differ); at an epoch's end any count goes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moco.core.seeding import keyed_generator
from moco.data.batches import Batch
from moco.data.crop_loader import CropTrainLoader, CropWork, Meta, Work
from moco.data.input_settings import InputSettings
from moco.data.shards import HEIGHT, KIND, SHARD, WIDTH, ShardSource
from moco.data.source import DataError, ignore_stop_signals

_log = logging.getLogger(__name__)


ORDER = 2  # the version of the epoch order below, kept in checkpoints


def _generator(*key: object) -> torch.Generator:
    return keyed_generator("moco-shards", *key)


def buffer_shuffle(n: int, k: int, g: torch.Generator) -> np.ndarray:
    """The output order [n] of a shuffle buffer of ``k`` over inputs 0..n-1: an output is a
    uniform pick among the buffered inputs, replaced by the next input (drained at the end).
    Output t is an input read at most t + k - 1."""
    u = torch.rand(n, generator=g, dtype=torch.float64).numpy()
    buf = list(range(min(k, n)))
    nxt = len(buf)
    out = np.empty(n, dtype=np.int64)
    for t in range(n):
        j = int(u[t] * len(buf))
        out[t] = buf[j]
        if nxt < n:
            buf[j] = nxt
            nxt += 1
        else:
            buf[j] = buf[-1]
            buf.pop()
    return out


def epoch_stream(shard_of: np.ndarray, seed: int, epoch: int,
                 keep: int | None = None) -> np.ndarray:
    """The source indices in the epoch's stream order: shards permuted by (seed, epoch),
    each shard's samples in their order; with ``keep``, the ``N - keep`` samples of a window
    at a position drawn from (seed, epoch) left out."""
    shards = np.unique(shard_of)
    perm = torch.randperm(len(shards), generator=_generator(seed, epoch, "order")).numpy()
    rank_of = np.empty(int(shards.max()) + 1, dtype=np.int64)
    rank_of[shards[perm]] = np.arange(len(shards))
    stream = np.argsort(rank_of[shard_of], kind="stable")
    left = len(stream) - (len(stream) if keep is None else keep)
    if left <= 0:
        return stream
    at = int(torch.randint(len(stream) - left + 1, (1,),
                           generator=_generator(seed, epoch, "left out")))
    return np.concatenate([stream[:at], stream[at + left:]])


def epoch_steps(n: int, world_size: int, batch: int) -> int:
    """S: the global steps of an epoch (whole global batches, as the folder loaders)."""
    return n // (world_size * batch)


def reader_steps(steps: int, readers: int, reader: int) -> int:
    """S_w: the steps t < ``steps`` with t mod W = ``reader``."""
    return len(range(reader, steps, readers))


def reader_order(stream: np.ndarray, steps: int, batch: int, buffer: int,
                 where: tuple[int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(source indices of a reader's part in read order [S_w·B], its output order as
    positions in it): the epoch's ``stream`` cut as the module doc says; ``where`` is
    (seed, epoch, rank r, reader w, readers W)."""
    seed, epoch, rank, reader, readers = where
    before = rank * steps + sum(reader_steps(steps, readers, v) for v in range(reader))
    size = reader_steps(steps, readers, reader) * batch
    part = stream[before * batch:before * batch + size]
    return part, buffer_shuffle(size, buffer, _generator(seed, epoch, rank, reader, "buffer"))


class _BufferedReader:
    """Serves a reader's bytes from what it has read sequentially; anything else (a
    replacement of an unreadable image) is read directly."""

    def __init__(self, source: ShardSource) -> None:
        self.source = source
        self.held: dict[int, bytes] = {}

    def read(self, i: int) -> bytes:
        data = self.held.pop(i, None)
        return data if data is not None else self.source.read(i)

    def name(self, i: int) -> str:
        return self.source.sample_name(i)


class _ReaderSteps(IterableDataset[Work]):
    """Worker i of the DataLoader makes the steps start + i, start + i + W, ... of the
    epoch, from reader (start + i) mod W's part."""

    def __init__(self, work: CropWork, source: ShardSource, epoch: int, start: int, readers: int,
                 buffer: int, world_size: int) -> None:
        self.work, self.source, self.epoch, self.start = work, source, epoch, start
        self.readers, self.buffer, self.world_size = readers, buffer, world_size

    def __iter__(self) -> Iterator[Work]:
        info = get_worker_info()
        i = info.id if info is not None else 0
        w, cfg_b = (self.start + i) % self.readers, self.work.batch
        steps = epoch_steps(len(self.source), self.world_size, cfg_b)
        stream = epoch_stream(self.source.table[:, SHARD], self.work.seed, self.epoch,
                              keep=steps * self.world_size * cfg_b)
        part, out = reader_order(stream, steps, cfg_b, self.buffer,
                                 (self.work.seed, self.epoch, self.work.rank, w, self.readers))
        p = len(part)
        first = (self.start + i) // self.readers  # this reader's first batch
        todo = out[first * cfg_b:]
        wanted = np.zeros(p, dtype=bool)
        wanted[todo] = True
        reader = _BufferedReader(self.source)
        self.work.reader = reader
        pos = int(todo.min()) if len(todo) else p  # the first sample still to come
        for m in range(first, p // cfg_b):
            batch = out[m * cfg_b:(m + 1) * cfg_b]
            last = int(batch.max())
            while pos <= last:  # read on, keeping what later batches take
                if wanted[pos]:  # an unreadable one is read again (and judged) in its batch
                    with contextlib.suppress(DataError):
                        reader.held[int(part[pos])] = self.source.read(int(part[pos]), True)
                pos += 1
            yield self.work(self.epoch, m * self.readers + w, part[batch].tolist())


class ShardTrainLoader(CropTrainLoader):
    """Original-size crops of tar shards, streamed (see the module doc). ``readers`` and
    ``buffer`` are the run's layout: from ``-j`` and ``--shuffle-buffer`` at its start, from
    the checkpoint when it resumes (so a resumed run reads what the uninterrupted one would)."""

    def __init__(self, cfg: InputSettings, source: ShardSource, device: torch.device, workers: int,
                 rank: int = 0, world_size: int = 1,
                 decode_device: torch.device | None = None) -> None:
        t = source.table
        meta = Meta(t[:, HEIGHT], t[:, WIDTH], t[:, KIND])
        super().__init__(cfg, _BufferedReader(source), meta, device, workers, rank, world_size,
                         decode_device)
        self.source = source
        self.readers, self.buffer = max(1, workers), cfg.shuffle_buffer
        if self.steps() < 1:
            raise DataError(
                f"the shards hold {len(source)} samples, fewer than one batch of "
                f"{world_size * cfg.batch_size} ({world_size} process(es) x {cfg.batch_size}): "
                "lower --batch-size or add samples")

    def steps(self) -> int:
        return epoch_steps(len(self.source), self.world_size, self.cfg.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The run's layout (saved in checkpoints); ``order`` names the module doc's order."""
        return {"kind": "shards", "readers": self.readers, "buffer": self.buffer,
                "world_size": self.world_size, "batch": self.cfg.batch_size,
                "shards": self.source.index.fingerprint, "samples": len(self.source),
                "order": ORDER}

    def load_state_dict(self, state: dict[str, Any], epoch_step: int) -> None:
        """Take a checkpoint's layout. Mid-epoch, the rest of the epoch depends on the
        processes, batch and data too: another value of those is refused."""
        if state.get("kind") != "shards":
            return
        mine = self.state_dict()
        for key, what in (("world_size", "process count"), ("batch", "per-process batch"),
                          ("shards", "shards"), ("samples", "sample count")):
            if epoch_step and state.get(key) != mine[key]:
                raise DataError(
                    f"the checkpoint stopped mid-epoch reading the shards with another {what} "
                    f"({state.get(key)} then, {mine[key]} now): the rest of the epoch depends "
                    "on it. Resume with the same data and process count, or from a checkpoint "
                    "saved at the end of an epoch")
        if epoch_step and state.get("order") != ORDER:
            _log.warning("shards: the checkpoint stopped mid-epoch under an earlier sample "
                         "order of the shards: the rest of this epoch reads in today's order "
                         "(some of its samples twice, others not); the next epochs are whole")
        if (state["readers"], state["buffer"]) != (self.readers, self.buffer):
            _log.info(f"shards: this run reads with {state['readers']} reader(s) per process "
                      f"and a shuffle buffer of {state['buffer']}, as it started (not -j "
                      f"{self.workers} / --shuffle-buffer {self.buffer}): its batches stay "
                      "those of an uninterrupted run")
        self.readers, self.buffer = int(state["readers"]), int(state["buffer"])

    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        data = _ReaderSteps(self.work, self.source, epoch, start_step, self.readers, self.buffer,
                            self.world_size)
        nw = self.readers if (self.workers > 0 or self.readers > 1) else 0
        loader = DataLoader(data, batch_size=None, num_workers=nw,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=2 if nw else None,
                            worker_init_fn=ignore_stop_signals if nw else None)
        for work in loader:
            yield self.finish(work)
