"""Optimizers and learning-rate schedules, registered by name (``--optimizer``,
``--lr-schedule``): a new one is a function registered here, the loop is not touched.

* An optimizer factory takes the method's trainable parameter groups
  (:meth:`~moco.core.method_base.PretrainingMethod.trainable_parameters`) and the run's
  config, and returns a ``torch.optim.Optimizer`` whose lr the loop then sets every step.
* An lr schedule gives the lr of one step: ``schedule(cfg, epoch, step, steps)`` for the
  0-based ``step`` of ``steps`` in the 0-based ``epoch``. The loop sets it before every step,
  so a schedule may change the lr per step (a warmup, a per-iteration cosine) or per epoch.

Built in: ``sgd`` (``main_moco.py``'s: momentum, weight decay on every tensor), ``lars``
(MoCo v3's for ResNets, :class:`moco.core.optim.LARS`: no weight decay and no trust ratio
for biases and norm parameters) and ``adamw`` (MoCo v3's for ViTs: torch's ``AdamW``, its
decoupled weight decay ``--wd`` on every tensor); ``step`` (x0.1 at the ``--schedule``
milestones, MoCo v1) and ``cosine`` (half cosine per epoch, MoCo v2), both ramped per step
over ``--warmup-epochs``, and ``warmup-cosine`` (MoCo v3: a linear warmup over
``--warmup-epochs``, then a half cosine, both per step); ``auto`` is ``cosine`` with
``--cos``, else ``step``. Every one is available to every method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moco.core.errors import ConfigError
from moco.utils.schedule import learning_rate, warmup_factor

if TYPE_CHECKING:
    import torch

#: The run's :class:`~moco.engine.config.MocoConfig` (not imported here: the config's
#: ``--optimizer`` and ``--lr-schedule`` choices are read from this module).
MocoConfig = Any
OptimizerFactory = Callable[[list[dict[str, Any]], MocoConfig], "torch.optim.Optimizer"]
LrSchedule = Callable[[MocoConfig, int, int, int], float]

_OPTIMIZERS: dict[str, OptimizerFactory] = {}
_LR_SCHEDULES: dict[str, LrSchedule] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: register an optimizer factory as ``--optimizer name``."""
    def add(factory: OptimizerFactory) -> OptimizerFactory:
        _OPTIMIZERS[name] = factory
        return factory
    return add


def register_lr_schedule(name: str) -> Callable[[LrSchedule], LrSchedule]:
    """Decorator: register a per-step lr function as ``--lr-schedule name``."""
    def add(schedule: LrSchedule) -> LrSchedule:
        _LR_SCHEDULES[name] = schedule
        return schedule
    return add


def optimizer_names() -> tuple[str, ...]:
    return tuple(_OPTIMIZERS)


def lr_schedule_names() -> tuple[str, ...]:
    return ("auto", *_LR_SCHEDULES)


def make_optimizer(cfg: MocoConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The ``cfg.optimizer`` optimizer over the parameter ``groups``."""
    factory = _OPTIMIZERS.get(cfg.optimizer)
    if factory is None:
        raise ConfigError(f"expected --optimizer to be one of {', '.join(_OPTIMIZERS)}, got "
                          f"{cfg.optimizer!r}")
    return factory(groups, cfg)


def lr_schedule(cfg: MocoConfig) -> LrSchedule:
    """The per-step lr function ``cfg.lr_schedule`` names (``auto``: ``cosine`` with
    ``--cos``, else ``step``)."""
    name = cfg.lr_schedule if cfg.lr_schedule != "auto" else ("cosine" if cfg.cos else "step")
    schedule = _LR_SCHEDULES.get(name)
    if schedule is None:
        raise ConfigError(f"expected --lr-schedule to be one of {', '.join(lr_schedule_names())}, "
                          f"got {name!r}")
    return schedule


@register_optimizer("sgd")
def sgd(groups: list[dict[str, Any]], cfg: MocoConfig) -> torch.optim.Optimizer:
    """SGD with ``--momentum``, weight decay ``--wd`` on every tensor (``main_moco.py``)."""
    import torch

    return torch.optim.SGD(groups, lr=cfg.effective_lr, momentum=cfg.momentum, weight_decay=cfg.wd)


def _epoch_lr(cfg: MocoConfig, epoch: int, cos: bool) -> float:
    e = epoch + 1 if cfg.cos_one_based else epoch
    return learning_rate(cfg.effective_lr, e, cfg.epochs, cos=cos, milestones=cfg.schedule)


@register_lr_schedule("step")
def step_schedule(cfg: MocoConfig, epoch: int, step: int, steps: int) -> float:
    """x0.1 at each ``--schedule`` milestone, per epoch (MoCo v1), ramped over the warmup."""
    return _epoch_lr(cfg, epoch, False) * warmup_factor(epoch, step, steps, cfg.warmup_epochs)


@register_lr_schedule("cosine")
def cosine_schedule(cfg: MocoConfig, epoch: int, step: int, steps: int) -> float:
    """Half cosine per epoch (MoCo v2; 1-based with ``--cos-one-based``), ramped over the
    warmup."""
    return _epoch_lr(cfg, epoch, True) * warmup_factor(epoch, step, steps, cfg.warmup_epochs)


@register_optimizer("lars")
def lars(groups: list[dict[str, Any]], cfg: MocoConfig) -> torch.optim.Optimizer:
    """LARS with ``--momentum`` and ``--wd`` (MoCo v3's for ResNets: trust coefficient 0.001;
    tensors of one dimension get neither the weight decay nor the trust ratio)."""
    from moco.core.optim import LARS

    return LARS(groups, lr=cfg.effective_lr, weight_decay=cfg.wd, momentum=cfg.momentum)


@register_optimizer("adamw")
def adamw(groups: list[dict[str, Any]], cfg: MocoConfig) -> torch.optim.Optimizer:
    """torch's AdamW with weight decay ``--wd`` (MoCo v3's for ViTs; its presets: 0.1),
    betas (0.9, 0.999)."""
    import torch

    return torch.optim.AdamW(groups, lr=cfg.effective_lr, weight_decay=cfg.wd)


@register_lr_schedule("warmup-cosine")
def warmup_cosine_schedule(cfg: MocoConfig, epoch: int, step: int, steps: int) -> float:
    """MoCo v3's, per step: lr x t / ``--warmup-epochs`` during the warmup, then a half
    cosine over the remaining epochs (t = epoch + step / steps;
    :func:`moco.core.optim.warmup_cosine_lr`)."""
    from moco.core.optim import warmup_cosine_lr

    return warmup_cosine_lr(cfg.effective_lr, epoch + step / steps, cfg.epochs, cfg.warmup_epochs)
