"""The dictionary as a FIFO queue of keys (MoCo v1 §3.2; ``moco/builder.py``'s
``_dequeue_and_enqueue``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moco.core.errors import ConfigError


class KeyQueue(nn.Module):
    """A ring buffer of K unit-length keys of dimension ``dim``.

    Buffers (saved in the state dict):
        queue:     [dim, K] float, each column one L2-normalised key.
        queue_ptr: [1] long, the column the next key is written to.

    The original asserts ``K % N == 0``. Here any batch with ``N <= K`` is accepted: a block
    that runs past the end wraps around to column 0, so every key is kept and the oldest
    ones are always the ones overwritten.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, dim: int, size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ConfigError(f"queue needs dim >= 1 and K >= 1, got dim={dim}, K={size}")
        init = torch.randn(dim, size, generator=generator)
        self.register_buffer("queue", F.normalize(init, dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[1]

    def negatives(self) -> torch.Tensor:
        """The current keys, [dim, K], detached (no gradient reaches the queue)."""
        return self.queue.clone().detach()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` ([N, dim], N <= K) over the N oldest columns and advance the pointer."""
        n = keys.shape[0]
        if n > self.size:
            raise ConfigError(
                f"cannot enqueue {n} keys into a queue of K={self.size}: choose --moco-k >= the "
                "number of keys enqueued per step (global batch, x2 with --symmetric)"
            )
        # Pointer arithmetic on the device: reading the pointer into Python would make the
        # host wait for the GPU in the middle of every forward.
        cols = (torch.arange(n, device=self.queue.device) + self.queue_ptr) % self.size
        self.queue.index_copy_(1, cols, keys.detach().T.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.size)
