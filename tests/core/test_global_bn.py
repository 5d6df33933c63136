"""GlobalBatchNorm (moco.core.global_bn): BatchNorm over the batch of every process, on CPU
process groups too. Two processes with half of a batch each must compute what one BatchNorm
computes on the whole batch: outputs, gradients of inputs and parameters, running stats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import spawn
from torch import nn

from moco.core.errors import ConfigError
from moco.core.global_bn import GlobalBatchNorm, convert_global_bn, sync_batchnorm_for

SHAPES = {"2d": (8, 3, 5, 4), "1d": (8, 6)}


def _batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = SHAPES[kind]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    return x, torch.randn(shape, generator=g, dtype=torch.float64)  # inputs, loss weights


def _bn(kind: str) -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3) if kind == "2d" else nn.BatchNorm1d(6, affine=False)
    if kind == "2d":
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn.double()


def _run(bn: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    """Forward, loss Σ w·y, backward: output, input grad, parameter grads, running stats."""
    x = x.clone().requires_grad_()
    y = bn(x)
    (w * y).sum().backward()
    return {"y": y.detach(), "dx": x.grad,
            "grads": {n: p.grad for n, p in bn.named_parameters()},
            "buffers": {n: b.clone() for n, b in bn.named_buffers()}}


def test_outside_a_process_group_it_is_batchnorm() -> None:
    for kind in SHAPES:
        x, w = _batch(kind)
        ref = _run(_bn(kind), x, w)
        got = _run(convert_global_bn(_bn(kind)), x, w)
        for key in ("y", "dx"):
            torch.testing.assert_close(got[key], ref[key])
        for key in ("grads", "buffers"):
            for name, v in ref[key].items():
                torch.testing.assert_close(got[key][name], v)


def test_conversion_keeps_parameters_buffers_and_mode() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    net[1].eval()
    weight, mean = net[1].weight, net[1].running_mean
    out = convert_global_bn(net)
    assert out is net and isinstance(net[1], GlobalBatchNorm) and isinstance(net[2][0], GlobalBatchNorm)
    assert net[1].weight is weight and net[1].running_mean is mean and not net[1].training
    assert isinstance(convert_global_bn(nn.BatchNorm1d(3)), GlobalBatchNorm)
    assert sync_batchnorm_for(nn.Sequential(nn.BatchNorm2d(2)), "cpu")[0].__class__ is GlobalBatchNorm


def test_batchnorm_with_extra_behaviour_is_refused() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    with pytest.raises(ConfigError, match="BatchNormAct2d cannot be synchronised"):
        convert_global_bn(nn.Sequential(timm_layers.BatchNormAct2d(4)))


def _worker(ctx: Any) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for kind in SHAPES:
        x, w = _batch(kind)
        n = x.shape[0] // world
        mine = slice(rank * n, (rank + 1) * n)
        r = _run(convert_global_bn(_bn(kind)), x[mine], w[mine])
        for g in r["grads"].values():
            dist.all_reduce(g)  # Σ over processes: the gradient of Σ_r loss_r
        out[kind] = r
    return out


def test_two_processes_compute_the_whole_batch_statistics(tmp_path: Path) -> None:
    ranks = spawn(_worker, tmp_path)
    for kind in SHAPES:
        x, w = _batch(kind)
        ref = _run(_bn(kind), x, w)
        n = x.shape[0] // 2
        torch.testing.assert_close(torch.cat([r[kind]["y"] for r in ranks]), ref["y"])
        torch.testing.assert_close(torch.cat([r[kind]["dx"] for r in ranks]), ref["dx"])
        for r in ranks:
            for name, g in ref["grads"].items():
                torch.testing.assert_close(r[kind]["grads"][name], g)
            for name, b in ref["buffers"].items():
                torch.testing.assert_close(r[kind]["buffers"][name], b, msg=name)
        assert ranks[0][kind]["y"].shape[0] == n
