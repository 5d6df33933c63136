"""InfoNCE as a (K+1)-way classification with the positive in column 0 (MoCo v1 Eq. 1)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def fp32(device_type: str) -> contextlib.AbstractContextManager[object]:
    """A block computed in at least float32 even inside an autocast region: the logits and
    the loss.

    Under bf16 autocast a matmul rounds its output to 8 bits of mantissa: logits / T with
    T 0.07 would move by ~0.03-0.06, enough to tie the positive with a negative in the pretext
    accuracy and to blur the softmax. The embeddings are promoted to at least float32
    (:func:`at_least_fp32`: bf16/fp16 become float32, float64 stays float64) and so are the
    products here; the encoders before them keep the autocast dtype."""
    return torch.autocast(device_type, enabled=False)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when its dtype is narrower (bf16, fp16), else unchanged (float64 stays
    float64): what the logits and the loss are computed in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def moco_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """Logits [N, 1+K] in at least float32: column 0 is q·k₊, columns 1..K are q·queue, all / ``t``.

    Args:
        q: queries [N, C], unit length, with gradient.
        k: positive keys [N, C], unit length, no gradient.
        negatives: the queue [C, K], detached.
        t: softmax temperature τ.
    """
    with fp32(q.device.type):
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype),
                                    torch.promote_types(negatives.dtype, torch.float32))
        q, k = q.to(dtype), k.to(dtype)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = q @ negatives.to(dtype)
        return torch.cat([l_pos, l_neg], dim=1) / t


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (at least float32) of logits [N, 1+K] against target class 0 (the
    positive)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    with fp32(logits.device.type):
        return F.cross_entropy(at_least_fp32(logits), labels)


def pretext_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Pretext accuracy in % as a 0-d float64 tensor on the logits' device: how often the
    positive (column 0) has the largest logit. Reading it (``float()``) waits for the device,
    so the training loop keeps it there and reads it at log points."""
    return (logits.argmax(dim=1) == 0).to(torch.float64).mean() * 100.0


def top1_accuracy(logits: torch.Tensor) -> float:
    """:func:`pretext_accuracy` as a Python float."""
    return float(pretext_accuracy(logits))
