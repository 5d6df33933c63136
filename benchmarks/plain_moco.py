"""A plain hand-written MoCo step on the same encoders (MoCo v1 Algorithm 1, as the original
``moco/builder.py`` and ``main_moco.py`` write it), for the throughput benchmarks: its
model-only rate is what ``moco.engine.training_step.train_step`` should match.

It shares the model (the library's ``MoCo``: its two encoders, SplitBatchNorm, memory
format) and the optimizer, and writes the rest by hand, with no checks, logging or metrics:
momentum update (foreach), shuffle of the key batch (``randperm`` on the device), q and k
normalised in float32, logits ``[q·k, q·queue] / t`` in float32, cross-entropy against 0,
backward, SGD step, the keys written into a plain [dim, K] queue at a host-side pointer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PlainMoCoStep:
    """``step(im_q, im_k)``: one optimisation step of ``model.encoder_q`` (and the momentum
    update of ``model.encoder_k``) on a batch of two views [B,3,H,W] on the device."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 autocast_dtype: torch.dtype | None, scaler: Any = None) -> None:
        self.f_q, self.f_k = model.encoder_q, model.encoder_k
        self.m, self.t = float(model.m), float(model.t)  # type: ignore[arg-type]
        dim, k = model.key_queue.queue.shape  # type: ignore[union-attr]
        dev = next(self.f_q.parameters()).device
        self.queue = F.normalize(torch.randn(dim, k, device=dev), dim=0)
        self.ptr, self.k = 0, int(k)
        self.opt, self.dtype, self.scaler = optimizer, autocast_dtype, scaler
        self.q_params = [p for p in self.f_q.parameters()]
        self.k_params = [p for p in self.f_k.parameters()]

    def __call__(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        dev = im_q.device
        with torch.autocast(dev.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            q = F.normalize(self.f_q(im_q).float(), dim=1)
            with torch.no_grad():
                torch._foreach_mul_(self.k_params, self.m)
                torch._foreach_add_(self.k_params, self.q_params, alpha=1.0 - self.m)
                perm = torch.randperm(im_k.shape[0], device=dev)
                k = F.normalize(self.f_k(im_k[perm]).float(), dim=1)[torch.argsort(perm)]
        with torch.autocast(dev.type, enabled=False):
            logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ self.queue], dim=1) / self.t
            loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=dev))
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        with torch.no_grad():
            cols = (torch.arange(k.shape[0], device=dev) + self.ptr) % self.k
            self.queue[:, cols] = k.T
        self.ptr = (self.ptr + k.shape[0]) % self.k
        return loss.detach()
