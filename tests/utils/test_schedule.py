"""Learning-rate schedules, set once per epoch as the original (main_moco.py; the CIFAR-10
notebook: 1-based cosine); the optional warmup, per step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_FLAGS

import moco.engine.loop as loop
from moco.cli import build_parser
from moco.cli.pretrain import config_from_args
from moco.engine.build import epoch_lr, step_lr
from moco.engine.config import MocoConfig
from moco.engine.config_sources import build_config
from moco.engine.loop import Pretrainer
from moco.utils.schedule import learning_rate, warmup_factor


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


def test_warmup_ramps_per_step() -> None:
    # 2 warmup epochs of 5 steps: (done + 1) / 10 of the schedule's lr, then the schedule.
    f = [warmup_factor(e, t, 5, 2) for e in range(3) for t in range(5)]
    assert f == pytest.approx([(i + 1) / 10 for i in range(10)] + [1.0] * 5)
    # One warmup epoch ramps (a per-epoch ramp of one epoch would leave the lr unchanged).
    assert [warmup_factor(0, t, 4, 1) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warmup_factor(0, 0, 4, 0) == 1.0


def test_step_lr_is_the_schedule_times_the_ramp() -> None:
    cfg = MocoConfig(lr=0.4, epochs=10, cos=True, schedule=[], warmup_epochs=2)
    for e in range(10):
        for t in range(3):
            want = learning_rate(0.4, e, 10, cos=True) * min(1.0, (e * 3 + t + 1) / 6)
            assert step_lr(cfg, e, t, 3) == pytest.approx(want, rel=1e-12)
    # The demo's 1-based cosine: the ramp still counts 0-based epochs.
    one = MocoConfig(lr=0.06, epochs=200, cos=True, cos_one_based=True, schedule=[], warmup_epochs=1)
    assert step_lr(one, 0, 0, 2) == pytest.approx(epoch_lr(one, 0) / 2)
    assert step_lr(one, 1, 0, 2) == epoch_lr(one, 1)


def test_pretrain_sets_the_warmup_lr_every_step(tiny_data: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the loop: the optimizer's lr at every step of a run with one warmup epoch."""
    seen: list[float] = []
    real = loop.train_step

    def step(model: Any, optimizer: torch.optim.Optimizer, *a: Any, **k: Any) -> Any:
        seen.append(optimizer.param_groups[0]["lr"])
        return real(model, optimizer, *a, **k)

    monkeypatch.setattr(loop, "train_step", step)
    args = build_parser().parse_args(["pretrain", str(tiny_data), *TINY_FLAGS, "--output",
                                      str(tmp_path / "run"), "--warmup-epochs", "1", "--lr", "0.4",
                                      "--knn-every", "0"])
    Pretrainer(config_from_args(args), log=lambda _m: None, progress=False).run()
    # 32 images, batch 8: 4 steps per epoch; epoch 1 ramps, epoch 2 has the schedule's lr.
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4] + [0.4] * 4)


def test_no_warmup_by_default() -> None:
    assert learning_rate(0.03, 0, 200, cos=False, milestones=[120, 160]) == 0.03
    assert MocoConfig().warmup_epochs == 0
