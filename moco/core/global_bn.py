"""BatchNorm with the statistics of the global batch across processes, on any backend.

MoCo v3 converts the whole model to synchronised BatchNorm under data parallelism (MoCo v3
§5: the BN of the projector and predictor heads, and of a ResNet backbone, see the batch of
all processes; ``main_moco.py`` calls ``SyncBatchNorm.convert_sync_batchnorm``). torch's
``nn.SyncBatchNorm`` runs on GPUs only; :class:`GlobalBatchNorm` does the same computation
with two differentiable all-reduces, so a CPU process group (gloo) trains what one process on
the whole batch would train:

* mean = Σx / n and var = Σ(x - mean)² / n over the global batch (two passes: no
  cancellation), n the global count of values per channel;
* the gradient flows through both sums to every process's inputs (the backward of an
  all-reduce sum is the all-reduce sum of the gradients), as ``SyncBatchNorm``'s;
* the running statistics are updated with the global mean and the unbiased global variance.

Outside a process group (or in eval mode) it is plain BatchNorm. On CUDA prefer torch's
fused ``SyncBatchNorm`` (:func:`moco.core.timm_backbone.convert_sync_batchnorm`);
:func:`sync_batchnorm_for` picks by device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from moco.core.errors import ConfigError
from moco.core.timm_backbone import convert_sync_batchnorm


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over processes of ``t``, with the gradient of that sum."""
    out: torch.Tensor = dist_fn.all_reduce(  # type: ignore[no-untyped-call]
        t, op=dist.ReduceOp.SUM)
    return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over [B, C], [B, C, L], [B, C, H, W] or [B, C, D, H, W] whose training
    statistics are those of every process's batch together (see the module docstring)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _in_group()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = _global_sum(torch.cat([x.sum(dims), local]))
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _global_sum(centred.pow(2).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        self._update_running_stats(mean.detach(), var.detach(), float(n))
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as torch's BatchNorm
            tracked = self.num_batches_tracked
            f = 1.0 / max(float(tracked) if tracked is not None else 1.0, 1.0)
        else:
            f = self.momentum
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm of ``module`` (torch's BatchNorm1d/2d/3d, SyncBatchNorm) replaced by a
    :class:`GlobalBatchNorm` with the same parameters, buffers and mode; returns the module
    (a new one when ``module`` itself is a BatchNorm). Another BatchNorm subclass (timm's
    ``BatchNormAct2d`` adds an activation) is a :class:`ConfigError`: it would lose its extra
    behaviour."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        if type(module) not in _PLAIN_BN:
            raise ConfigError(
                f"{type(module).__name__} cannot be synchronised across CPU processes (only "
                "torch's BatchNorm layers can); train on CUDA (SyncBatchNorm) or on one process")
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        converted = convert_global_bn(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def sync_batchnorm_for(model: nn.Module, device_type: str) -> nn.Module:
    """``model`` with its BatchNorm synchronised across processes: torch's ``SyncBatchNorm``
    on CUDA (timm's converter, see :func:`convert_sync_batchnorm`), :class:`GlobalBatchNorm`
    elsewhere. Call it before wrapping the model in DistributedDataParallel."""
    if device_type == "cuda":
        return convert_sync_batchnorm(model)
    return convert_global_bn(model)
