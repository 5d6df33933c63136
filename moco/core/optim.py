"""MoCo v3's optimiser and schedules (MoCo v3 §5 and Appendix A; ``moco/optimizer.py`` and
``main_moco.py``'s ``adjust_learning_rate`` of the authors' code).

* :class:`LARS` (You et al. 2017) as MoCo v3 uses it for ResNets: the layer-wise trust ratio
  and the weight decay apply to tensors of two or more dimensions only;
* :func:`scaled_lr`: the lr rule lr = base_lr x total batch / 256;
* :func:`warmup_cosine_lr`: linear warmup, then a half-cycle cosine, set every iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """SGD with heavy-ball momentum and LARS's layer-wise trust ratio.

    For each parameter p with gradient g, per step:

    * if p has two or more dimensions (weights of Linear and convolution layers):
      g ← g + wd·p, then g ← g · η·‖p‖/‖g‖ (η = ``trust_coefficient``, 0.001); the ratio is 1
      when ‖p‖ or ‖g‖ is 0;
    * tensors of one dimension or none (biases, norm layers' scales and shifts) get neither
      the weight decay nor the ratio;
    * then μ ← momentum·μ + g (μ starts at 0) and p ← p - lr·μ.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum} or trust_coefficient={trust_coefficient}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        g = p.grad
        assert g is not None
        if p.ndim > 1:
            g = g.add(p, alpha=group["weight_decay"])
            p_norm, g_norm = torch.norm(p), torch.norm(g)
            one = torch.ones_like(p_norm)
            ratio = torch.where((p_norm > 0) & (g_norm > 0),
                                group["trust_coefficient"] * p_norm / g_norm, one)
            g = g.mul(ratio)
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        mu = state["mu"]
        mu.mul_(group["momentum"]).add_(g)
        p.add_(mu, alpha=-group["lr"])


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """MoCo v3's lr rule (following Goyal et al. 2017): base_lr x total_batch / 256, with
    ``total_batch`` the batch of all processes together."""
    return base_lr * total_batch / 256


def warmup_cosine_lr(lr: float, t: float, epochs: float, warmup_epochs: float) -> float:
    """The lr at training progress ``t`` (epochs, fractional: epoch + i / iters_per_epoch):
    lr·t / warmup_epochs during the warmup, then the half-cycle cosine
    lr·½(1 + cos(π (t - warmup) / (epochs - warmup))) over the remaining epochs, set every
    iteration (MoCo v3's ``adjust_learning_rate``)."""
    if t < warmup_epochs:
        return lr * t / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (t - warmup_epochs) / (epochs - warmup_epochs)))
