"""Momentum (EMA) key encoder: θ_k ← m·θ_k + (1−m)·θ_q on parameters only (REFERENCE.md §1.4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moco.core.model import MoCo
from moco.core.momentum import init_key_encoder, momentum_update
from moco.engine.build import build_optimizer
from moco.engine.config import MocoConfig


def toy_encoder(dim: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, dim),
    )


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    q = toy_encoder()
    k = toy_encoder()  # different random weights
    return q, k


def _randomise_buffers(m: nn.Module) -> None:
    for name, b in m.named_buffers():
        if b.dtype.is_floating_point:
            b.copy_(torch.rand_like(b) + 0.5)
        elif "num_batches_tracked" in name:
            b.fill_(7)


def test_init_copies_and_freezes() -> None:
    q, k = _pair()
    init_key_encoder(q, k)
    for p_q, p_k in zip(q.parameters(), k.parameters(), strict=True):
        assert torch.equal(p_q, p_k)
        assert p_k.data_ptr() != p_q.data_ptr()  # a copy, not shared storage
        assert not p_k.requires_grad
        assert p_q.requires_grad


def test_m_zero_copies_exactly() -> None:
    q, k = _pair()
    momentum_update(q, k, 0.0)
    for p_q, p_k in zip(q.parameters(), k.parameters(), strict=True):
        assert torch.equal(p_q, p_k)


def test_m_one_keeps_exactly() -> None:
    q, k = _pair()
    before = [p.clone() for p in k.parameters()]
    momentum_update(q, k, 1.0)
    for b, p_k in zip(before, k.parameters(), strict=True):
        assert torch.equal(b, p_k)


@pytest.mark.parametrize("m", [0.99, 0.999, 0.5])
def test_m_matches_formula(m: float) -> None:
    q, k = _pair(1)
    k_before = [p.detach().clone() for p in k.parameters()]
    q_before = [p.detach().clone() for p in q.parameters()]
    momentum_update(q, k, m)
    for kb, qb, p_k, p_q in zip(k_before, q_before, k.parameters(), q.parameters(), strict=True):
        torch.testing.assert_close(p_k, m * kb + (1 - m) * qb, rtol=1e-6, atol=1e-7)
        assert torch.equal(p_q, qb)  # θ_q untouched


def test_repeated_updates_converge_geometrically() -> None:
    q, k = _pair(2)
    k0 = [p.detach().clone() for p in k.parameters()]
    for _ in range(3):
        momentum_update(q, k, 0.9)
    for kb, p_q, p_k in zip(k0, q.parameters(), k.parameters(), strict=True):
        torch.testing.assert_close(p_k, 0.9**3 * kb + (1 - 0.9**3) * p_q.detach(),
                                   rtol=1e-5, atol=1e-6)


def test_buffers_not_touched() -> None:
    q, k = _pair(3)
    _randomise_buffers(q)
    _randomise_buffers(k)
    k_buffers = {n: b.clone() for n, b in k.named_buffers()}
    for m in (0.0, 0.99):
        momentum_update(q, k, m)
        for n, b in k.named_buffers():
            assert torch.equal(b, k_buffers[n]), f"buffer {n} changed by the momentum update"


def test_init_does_not_copy_buffers() -> None:
    q, k = _pair(4)
    _randomise_buffers(q)
    k_buffers = {n: b.clone() for n, b in k.named_buffers()}
    init_key_encoder(q, k)
    for n, b in k.named_buffers():
        assert torch.equal(b, k_buffers[n])


def test_no_gradient_tracking() -> None:
    q, k = _pair(5)
    init_key_encoder(q, k)
    momentum_update(q, k, 0.9)
    for p in k.parameters():
        assert p.grad_fn is None
        assert not p.requires_grad


def _moco(m: float = 0.99) -> MoCo:
    torch.manual_seed(0)
    return MoCo(toy_encoder(8), dim=8, k=16, m=m, t=0.2)


def test_key_encoder_gets_no_grad_after_forward_backward() -> None:
    model = _moco()
    model.train()
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    out = model(x1, x2)
    out.loss.backward()
    for name, p in model.encoder_k.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    assert not model.key_queue.queue.requires_grad


def test_key_encoder_not_in_optimizer() -> None:
    model = _moco()
    opt = build_optimizer(MocoConfig(lr=0.1, momentum=0.9, wd=1e-4), model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in in_opt for p in model.encoder_k.parameters())
    # Every query-encoder parameter is optimised, with weight decay on all of them (§4.4).
    assert {id(p) for p in model.encoder_q.parameters()} == in_opt
    assert all(g["weight_decay"] == 1e-4 and g["momentum"] == 0.9 for g in opt.param_groups)


def test_training_step_moves_key_encoder_only_by_momentum() -> None:
    """Step t's key encoder = m·θ_k + (1−m)·θ_q(after step t−1); SGD never touches θ_k."""
    model = _moco(m=0.9)
    opt = build_optimizer(MocoConfig(lr=0.5, momentum=0.0, wd=0.0), model)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    out = model(x1, x2)
    opt.zero_grad()
    out.loss.backward()
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    opt.step()
    for kb, p in zip(k_before, model.encoder_k.parameters(), strict=True):
        assert torch.equal(kb, p)  # the optimizer step leaves θ_k alone
    q_after = [p.detach().clone() for p in model.encoder_q.parameters()]
    model(x1, x2)  # next step: the EMA happens at its start, with θ_q after the SGD step
    for kb, qa, p in zip(k_before, q_after, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(p, 0.9 * kb + 0.1 * qa)


# ----- the momentum's schedule over training ------------------------------------------------------

def test_cosine_momentum_goes_from_m0_to_one_per_step() -> None:
    """m = 1 - 0.5 (1 + cos(pi t / T)) (1 - m0), t = epoch + step / steps (MoCo v3 §4), against
    the formula in float64 at every step of a 3-epoch, 4-step run."""
    import math

    from moco.core.momentum import ConstantMomentum, CosineMomentum

    sched, m0, epochs, steps = CosineMomentum(0.99), 0.99, 3, 4
    for e in range(epochs):
        for i in range(steps):
            t = e + i / steps
            want = 1 - 0.5 * (1 + math.cos(math.pi * t / epochs)) * (1 - m0)
            assert sched(t, epochs) == pytest.approx(want, rel=0, abs=1e-15)
    assert sched(0.0, epochs) == pytest.approx(m0) and sched(epochs, epochs) == 1.0
    assert sched(1.5, epochs) == pytest.approx(1 - 0.5 * (1 - m0))
    assert ConstantMomentum(0.999)(2.75, 200) == 0.999


def test_moco_keeps_its_constant_momentum_through_the_loops_hook() -> None:
    model = MoCo(toy_encoder(), dim=8, k=16, m=0.99)
    for t in (0.0, 0.25, 7.5):
        model.set_progress(t, 200)
        assert model.m == 0.99
