"""Learning-rate schedules, set once per epoch (REFERENCE.md §4.3, §6.1, pitfall 10)."""

from __future__ import annotations

import math

import pytest

from moco.engine.build import epoch_lr
from moco.engine.config import MocoConfig
from moco.engine.config_sources import build_config
from moco.engine.schedule import learning_rate


@pytest.mark.parametrize(("epoch", "lr"), [(0, 0.03), (1, 0.03), (119, 0.03), (120, 0.003),
                                           (159, 0.003), (160, 0.0003), (199, 0.0003)])
def test_step_schedule(epoch: int, lr: float) -> None:
    assert learning_rate(0.03, epoch, 200, cos=False, milestones=[120, 160]) == pytest.approx(lr, rel=1e-12)


def test_step_schedule_no_milestones_is_constant() -> None:
    assert all(learning_rate(0.1, e, 10, cos=False, milestones=[]) == 0.1 for e in range(10))


def test_step_schedule_unsorted_milestones() -> None:
    assert learning_rate(1.0, 170, 200, cos=False, milestones=[160, 120]) == pytest.approx(0.01)


@pytest.mark.parametrize(("epoch", "lr"), [(0, 0.03), (100, 0.015), (50, 0.03 * 0.5 * (1 + math.sqrt(0.5))),
                                           (199, 1.85e-6)])
def test_cosine_zero_based(epoch: int, lr: float) -> None:
    got = learning_rate(0.03, epoch, 200, cos=True, milestones=[120, 160])  # cos overrides schedule
    assert got == pytest.approx(lr, rel=1e-2 if epoch == 199 else 1e-12)


def test_cosine_last_epoch_not_zero_and_monotone() -> None:
    lrs = [learning_rate(0.03, e, 200, cos=True) for e in range(200)]
    assert lrs[-1] > 0
    assert lrs[-1] == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 199 / 200)), rel=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_demo_one_based_cosine_via_epoch_lr() -> None:
    cfg = MocoConfig(lr=0.06, epochs=200, cos=True, cos_one_based=True, schedule=[])
    # epoch_lr takes the 0-based epoch index; the demo numbers epochs 1..200.
    assert epoch_lr(cfg, 0) == pytest.approx(0.059996, abs=5e-7)
    assert epoch_lr(cfg, 0) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi / 200)), rel=1e-12)
    assert epoch_lr(cfg, 199) == 0.0
    assert epoch_lr(cfg, 99) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * 100 / 200)))


def test_cifar10_preset_uses_one_based_cosine() -> None:
    cfg = build_config(preset="cifar10")
    assert epoch_lr(cfg, 0) == pytest.approx(0.059996, abs=5e-7)
    assert epoch_lr(cfg, cfg.epochs - 1) == 0.0


def test_epoch_lr_zero_based_by_default() -> None:
    cfg = MocoConfig(lr=0.03, epochs=200, cos=True)
    assert epoch_lr(cfg, 0) == 0.03
    assert epoch_lr(cfg, 100) == pytest.approx(0.015)
    cfg = MocoConfig(lr=0.03, epochs=200)  # v1: step at 120, 160
    assert [epoch_lr(cfg, e) for e in (119, 120, 160)] == pytest.approx([0.03, 0.003, 0.0003])


def test_warmup() -> None:
    lrs = [learning_rate(0.4, e, 10, cos=True, warmup_epochs=4) for e in range(10)]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # After the warmup the main schedule takes over.
    for e in range(4, 10):
        assert lrs[e] == pytest.approx(learning_rate(0.4, e, 10, cos=True))
    steps = [learning_rate(0.4, e, 10, cos=False, milestones=[6], warmup_epochs=2) for e in range(10)]
    assert steps == pytest.approx([0.2, 0.4, 0.4, 0.4, 0.4, 0.4, 0.04, 0.04, 0.04, 0.04])


def test_no_warmup_by_default() -> None:
    assert learning_rate(0.03, 0, 200, cos=False, milestones=[120, 160]) == 0.03
    assert MocoConfig().warmup_epochs == 0
