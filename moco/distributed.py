"""Process-group context. Without torchrun everything is a single process (rank 0 of 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    """Who this process is. ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Single process for now; the torchrun path is added behind this function."""
    return DistContext()
