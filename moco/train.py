"""Compatibility module: ``moco.train`` as it was before the package was laid out by concern
(issue 17). The training loop now lives in :mod:`moco.engine` (:mod:`~moco.engine.loop`,
:mod:`~moco.engine.run`, :mod:`~moco.engine.build`, :mod:`~moco.engine.rundir`,
:mod:`~moco.engine.run_state`); this module only re-exports the engine's public names so that
``from moco.train import pretrain`` and ``moco.train.pretrain(cfg)`` keep working. New code
imports from :mod:`moco.engine` (or, for the public API, from :mod:`moco`).
"""

from __future__ import annotations

from moco.core.errors import ConfigError, RunError
from moco.engine.build import build_model, build_optimizer, epoch_lr
from moco.engine.loop import Pretrainer, pretrain
from moco.engine.run import TrainingRun
from moco.engine.run_state import CHECKPOINT_FORMAT, MocoEntry, PretrainResult, TrainState
from moco.engine.rundir import CHECKPOINT_GLOB, list_checkpoints, newest_checkpoint
from moco.engine.runtime import default_workers, resolve_device, resolve_precision
from moco.engine.training_step import EpochMeter, StepResult, train_step

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_GLOB",
    "ConfigError",
    "EpochMeter",
    "MocoEntry",
    "PretrainResult",
    "Pretrainer",
    "RunError",
    "StepResult",
    "TrainState",
    "TrainingRun",
    "build_model",
    "build_optimizer",
    "default_workers",
    "epoch_lr",
    "list_checkpoints",
    "newest_checkpoint",
    "pretrain",
    "resolve_device",
    "resolve_precision",
    "train_step",
]
