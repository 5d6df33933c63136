"""Momentum (EMA) update of the key encoder (MoCo v1 Eq. 2; ``moco/builder.py``) and the
schedules of its momentum m over training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@torch.no_grad()
def init_key_encoder(encoder_q: nn.Module, encoder_k: nn.Module) -> None:
    """Copy θ_q into θ_k parameter by parameter and freeze θ_k (no gradients, ever)."""
    for p_q, p_k in zip(encoder_q.parameters(), encoder_k.parameters(), strict=True):
        p_k.copy_(p_q)
        p_k.requires_grad_(False)


@torch.no_grad()
def momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """θ_k ← m·θ_k + (1−m)·θ_q for parameters only.

    Buffers (BN running statistics) are left alone, as in the original: the key encoder's
    running stats come from its own train-mode forwards and are never used.
    """
    k_params: list[torch.Tensor] = list(encoder_k.parameters())
    q_params = [p.detach() for p in encoder_q.parameters()]
    torch._foreach_mul_(k_params, m)
    torch._foreach_add_(k_params, q_params, alpha=1.0 - m)


class MomentumSchedule(Protocol):
    """The EMA momentum of a step: ``schedule(epochs, total_epochs) -> m``, where ``epochs``
    is the training progress t = epoch + step / steps per epoch (0 at the first step) and
    ``total_epochs`` the run's T. Schedules are objects, not functions, so that a method may
    hold one as a class attribute."""

    def __call__(self, epochs: float, total_epochs: int) -> float: ...


@dataclass(frozen=True)
class ConstantMomentum:
    """m at every step (MoCo v1/v2: 0.999)."""

    m: float

    def __call__(self, epochs: float, total_epochs: int) -> float:
        return self.m


@dataclass(frozen=True)
class CosineMomentum:
    """m0 -> 1 along a half cosine over training, per step (MoCo v3 §4, after BYOL):
    m = 1 - 0.5 (1 + cos(π t / T)) (1 - m0), t = epoch + step / steps, T = epochs."""

    m0: float

    def __call__(self, epochs: float, total_epochs: int) -> float:
        return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epochs / total_epochs)) * (1.0 - self.m0)
