"""What every training loader is and yields, and the helpers they share.

A :class:`TrainLoader` yields :class:`Batch` es of two views already on the device, and
carries what a run saves and reports of its input: the replaced unreadable images
(``bad_images``), the samples read in the current epoch (``samples_read``) and a streaming
position (``state_dict``). :class:`LoaderState` gives every loader these members with their
defaults. The per-step generator, the CPU thread count of a batch's work and the CUDA
side-stream prefetch are the same for every loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moco.core.seeding import keyed_generator


@dataclass
class Batch:
    """Two views [B,3,S,S] on the device and the dataset indices [B] of their images."""

    im_q: torch.Tensor
    im_k: torch.Tensor
    index: torch.Tensor


class TrainLoader(Protocol):
    """A training loader: what the training loop calls (see :class:`LoaderState`)."""

    #: Dataset indices replaced under ``--on-bad-image skip`` so far (a run saves them in its
    #: checkpoints and sets them back when it resumes).
    bad_images: set[int]
    #: Samples of the current epoch this process has read (the steps before a resumed
    #: ``start_step`` count as read); ``steps() x batch`` once an epoch is through.
    samples_read: int

    def steps(self) -> int:
        """Full batches per epoch (the last partial batch is dropped, as the original)."""
        ...

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The epoch's batches from ``start_step`` on."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the loader beside the step (empty when the position
        is a function of (seed, epoch, step) alone)."""
        ...

    def load_state_dict(self, state: dict[str, Any], epoch_step: int) -> None:
        """Take a checkpoint's :meth:`state_dict` before resuming at ``epoch_step``."""
        ...


class LoaderState:
    """The defaults of :class:`TrainLoader`'s members other than ``steps`` and ``batches``:
    no bad image, nothing read, no state. A loader counts what it yields with
    :meth:`counted`."""

    def __init__(self) -> None:
        self.bad_images: set[int] = set()
        self.samples_read = 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], epoch_step: int) -> None:
        """Nothing to take: the position is (seed, epoch, step)."""

    def counted(self, batches: Iterator[Batch], already: int) -> Iterator[Batch]:
        """``batches``, with :attr:`samples_read` starting at ``already`` (the samples of
        the steps before a resumed start) and counting each batch handed out."""
        self.samples_read = already
        for b in batches:
            self.samples_read += len(b.index)
            yield b


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The augmentation generator of one global step: a hash of (seed, epoch, step)."""
    return keyed_generator("moco-aug", seed, epoch, step)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: as they are), then restore them.

    The CPU augmentation runs single-threaded: its ~100 small ops per batch gain little from
    a second OpenMP thread, and every op ends at a barrier that waits for a thread another
    process has descheduled (docs/benchmarks.md, "One thread for the CPU augmentation")."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def stream_prefetch(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches`` with batch t+1's work queued on a side CUDA stream before batch t is handed
    out: its copies and augmentation kernels overlap step t on the main stream. The main
    stream waits for a batch's work before using it (``wait_stream``), and the batch's tensors
    are marked as used there (``record_stream``) so the allocator does not hand their memory
    back to the side stream while the step still reads them."""
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def produce() -> Batch | None:
        side.wait_stream(main)  # what the main stream queued so far (e.g. the cache copy)
        with torch.cuda.stream(side):
            return next(batches, None)

    cur = produce()
    while cur is not None:
        main.wait_stream(side)
        for t in (cur.im_q, cur.im_k, cur.index):
            if t.is_cuda:
                t.record_stream(main)
        following = produce()
        yield cur
        cur = following


def images_to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``x`` on ``device`` (a non-blocking copy), channels-last when asked."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
