"""InfoNCE as a (K+1)-way classification with the positive in column 0 (MoCo v1 Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moco_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """Logits [N, 1+K]: column 0 is q·k₊, columns 1..K are q·queue, all divided by ``t``.

    Args:
        q: queries [N, C], unit length, with gradient.
        k: positive keys [N, C], unit length, no gradient.
        negatives: the queue [C, K], detached.
        t: softmax temperature τ.
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = q @ negatives.to(q.dtype)
    return torch.cat([l_pos, l_neg], dim=1) / t


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [N, 1+K] against target class 0 (the positive)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels)


def top1_accuracy(logits: torch.Tensor) -> float:
    """Pretext accuracy in %: how often the positive (column 0) has the largest logit."""
    return float((logits.argmax(dim=1) == 0).float().mean()) * 100.0
