"""MoCo v3's LARS and schedules (moco.core.optim) against naive float64 loops over tensors
written from the definitions (MoCo v3 §4, LARS as the authors' ``moco/optimizer.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moco.core.optim import LARS, scaled_lr, warmup_cosine_lr


def naive_lars(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, wd: float,
               momentum: float, trust: float = 0.001) -> list[torch.Tensor]:
    """LARS, one tensor at a time, in float64: wd and the trust ratio for ndim > 1 only."""
    ps = [p.detach().double().clone() for p in params]
    mus = [torch.zeros_like(p) for p in ps]
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(ps, step_grads, strict=True)):
            g = g.double()
            if p.ndim > 1:
                g = g + wd * p
                pn, gn = math.sqrt(float((p * p).sum())), math.sqrt(float((g * g).sum()))
                g = g * (trust * pn / gn if pn > 0 and gn > 0 else 1.0)
            mus[i] = momentum * mus[i] + g
            ps[i] = p - lr * mus[i]
    return ps


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 4, generator=g, dtype=torch.float64),  # a Linear's weight
            torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64),  # a conv's weight
            torch.randn(5, generator=g, dtype=torch.float64),  # a bias / norm scale
            torch.zeros(4, 4, dtype=torch.float64),  # ||p|| = 0: ratio 1
            torch.randn(2, 2, generator=g, dtype=torch.float64)]  # ||g|| = 0 (with wd 0 below)


def _grads(steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in _params()]
        grads[4] = torch.zeros(2, 2, dtype=torch.float64)
        out.append(grads)
    return out


@pytest.mark.parametrize(("wd", "momentum"), [(1e-6, 0.9), (0.0, 0.9), (0.1, 0.0)])
def test_lars_matches_the_naive_loop(wd: float, momentum: float) -> None:
    params = [nn.Parameter(p.clone()) for p in _params()]
    steps = _grads(4)
    groups = [{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}]
    opt = LARS(groups, lr=0.3, weight_decay=wd, momentum=momentum)
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    want = naive_lars(_params()[:4], [g[:4] for g in steps], 0.3, wd, momentum)
    want += naive_lars(_params()[4:], [g[4:] for g in steps], 0.3, 0.0, momentum)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def test_lars_leaves_1d_tensors_without_decay_or_ratio() -> None:
    """A bias moves by lr·g exactly (plain SGD); a weight by lr·0.001·||p||/||g + wd·p||·(g + wd·p)."""
    bias = nn.Parameter(torch.ones(3, dtype=torch.float64))
    weight = nn.Parameter(torch.full((2, 2), 2.0, dtype=torch.float64))
    bias.grad = torch.full((3,), 0.5, dtype=torch.float64)
    weight.grad = torch.ones(2, 2, dtype=torch.float64)
    LARS([bias, weight], lr=0.1, weight_decay=0.5, momentum=0.9).step()
    torch.testing.assert_close(bias.detach(), torch.full((3,), 1 - 0.05, dtype=torch.float64))
    g = torch.full((2, 2), 1 + 0.5 * 2.0, dtype=torch.float64)  # 2 everywhere: ||g|| = 4, ||p|| = 4
    torch.testing.assert_close(weight.detach(), 2.0 - 0.1 * 0.001 * 4 / 4 * g)


def test_lars_skips_parameters_without_gradient_and_checks_its_arguments() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    opt = LARS([p], lr=1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(2, 2)) and not opt.state
    for bad in ({"lr": -1.0}, {"lr": 1.0, "momentum": 1.0}, {"lr": 1.0, "weight_decay": -1.0}):
        with pytest.raises(ValueError, match="LARS: invalid"):
            LARS([p], **bad)  # type: ignore[arg-type]


def test_lars_state_round_trips() -> None:
    """The momentum buffers travel in ``state_dict`` (exact resumes)."""
    p = nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    opt = LARS([p], lr=0.1, weight_decay=1e-6)
    p.grad = torch.ones(3, 3)
    opt.step()
    other = LARS([p], lr=0.1, weight_decay=1e-6)
    other.load_state_dict(opt.state_dict())
    assert torch.equal(other.state[p]["mu"], opt.state[p]["mu"])


def test_scaled_lr() -> None:
    assert scaled_lr(0.6, 4096) == pytest.approx(9.6)
    assert scaled_lr(1.5e-4, 1024) == pytest.approx(6e-4)
    assert scaled_lr(0.3, 256) == 0.3


def test_warmup_then_cosine_per_iteration() -> None:
    lr, epochs, warmup, iters = 2.0, 10, 2, 4
    got = [warmup_cosine_lr(lr, e + i / iters, epochs, warmup)
           for e in range(epochs) for i in range(iters)]
    for k, v in enumerate(got):
        t = k / iters
        want = (lr * t / warmup if t < warmup
                else lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup))))
        assert v == pytest.approx(want, rel=0, abs=1e-15)
    assert got[0] == 0.0 and got[warmup * iters] == pytest.approx(lr)
    assert all(b > a for a, b in zip(got[:warmup * iters], got[1:warmup * iters + 1], strict=True))
    assert all(b < a for a, b in zip(got[warmup * iters:], got[warmup * iters + 1:], strict=False))
    assert warmup_cosine_lr(lr, epochs, epochs, warmup) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine_lr(lr, 3.5, epochs, 0) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 0.35)))
