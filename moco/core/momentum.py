"""Momentum (EMA) update of the key encoder (MoCo v1 Eq. 2; ``moco/builder.py``)."""

from __future__ import annotations

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
