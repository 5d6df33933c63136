"""The training monitor of a pretraining run (:class:`moco.eval.monitor.TrainingMonitor`:
the label-free health signals on a fixed sample and the online linear probe), as the run
uses it: its construction by :func:`~moco.engine.run.build_run` (:func:`build_run_monitor`)
and :class:`RunMonitor`, the few calls the loop and the checkpoints make. Its settings are
declared in :mod:`moco.engine.monitor_settings`.

What each signal means and what to change when one goes wrong: docs/monitoring.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moco.core.errors import ConfigError
from moco.core.method_base import PretrainingMethod
from moco.core.methods import method_spec
from moco.data.augment import pretrain_transform
from moco.data.batches import Batch
from moco.data.source import ImageSource
from moco.engine.monitor_settings import probe_wanted
from moco.eval.monitor import MonitorSettings, TrainingMonitor
from moco.utils.distributed import per_rank_batch
from moco.utils.logs import Log

#: Held-out features [M, D] and their labels [M] (the kNN monitor's queries).
Features = tuple[torch.Tensor, torch.Tensor]
#: The health report's forward batch, at most.
HEALTH_BATCH = 256


# ----- the monitor of a run ---------------------------------------------------------------------

class RunMonitor:
    """The training monitor of a run as the loop calls it; ``monitor`` None (ranks other than
    0 under torchrun: the monitor runs on one process) makes every call a no-op."""

    def __init__(self, monitor: TrainingMonitor | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.monitor, self.autocast_dtype = monitor, autocast_dtype

    def after_step(self, batch: Batch) -> None:
        """After each optimizer step: the online probe's step on the features of the step's
        forward pass (reads nothing back from the device)."""
        if self.monitor is not None:
            self.monitor.after_step(None, batch.index)

    def record(self, loss: float, held_out: Features | None) -> dict[str, Any]:
        """The epoch's monitor keys (``loss_chance``, ``health_*``, ``probe_*``; none on other
        ranks); ``held_out``: the kNN monitor's query features and labels, for the probe's
        top-1 (None: not evaluated this epoch)."""
        if self.monitor is None:
            return {}
        query, labels = held_out if held_out is not None else (None, None)
        return self.monitor.epoch_record(loss, query, labels, autocast_dtype=self.autocast_dtype)

    def warn(self, history: Sequence[dict[str, Any]], log: Log) -> None:
        """Log each problem the history shows (collapsed, stuck, ...) when it first appears."""
        if self.monitor is not None:
            for line in self.monitor.new_warnings(history):
                log(f"warning: {line}")

    def state_dict(self) -> dict[str, Any] | None:
        """The probe's state and the chance level, for the checkpoint (None on other ranks)."""
        return self.monitor.state_dict() if self.monitor is not None else None

    def load_state_dict(self, state: dict[str, Any] | None, log: Log) -> None:
        """Restore :meth:`state_dict`. A checkpoint without it, or whose probe was trained on
        other classes or features (resumed on other data), starts the probe afresh."""
        if self.monitor is None or not state:
            return
        chance = self.monitor.chance
        try:
            self.monitor.load_state_dict(state)
        except ConfigError:
            log("warning: the checkpoint's online probe was trained for other classes or "
                "features: the probe starts afresh (the pretraining resumes as saved)")
        if chance is not None:  # the method's rule, not the saved figure
            self.monitor.chance = chance

    def close(self) -> None:
        """Remove the probe's hook from the encoder."""
        if self.monitor is not None:
            self.monitor.close()


def build_run_monitor(cfg: Any, device: torch.device, world: tuple[int, int],
                      autocast_dtype: torch.dtype | None, train: ImageSource,
                      model: PretrainingMethod, log: Log) -> RunMonitor:
    """The monitor of the run ``cfg`` (a :class:`~moco.engine.config.MocoConfig`) on
    ``device``; ``world``: (this rank, the processes). Built after the model (a hook
    registered earlier would be copied into MoCo's key encoder), on rank 0 only. The chance
    level is the method's (:attr:`moco.core.methods.MethodSpec.chance`)."""
    rank, size = world
    if rank != 0:
        return RunMonitor()
    probe = probe_wanted(cfg, train.labeled)
    if cfg.probe is True and not train.labeled:
        log("--probe on: the training images are unlabeled (no class folders): no online probe")
    batch = per_rank_batch(cfg.batch_size, size)
    view = pretrain_transform(cfg.aug, cfg.image_size, cfg.crop_min_scale, cfg.mean, cfg.std)
    settings = MonitorSettings(
        health=cfg.health, sample_size=cfg.health_images, probe=probe, probe_lr=cfg.probe_lr,
        seed=cfg.seed, on_bad_image=cfg.on_bad_image, batch_size=min(batch, HEALTH_BATCH),
        channels_last=cfg.channels_last_on(device.type), epochs=cfg.epochs)
    monitor = TrainingMonitor(model.evaluation_encoder(), train, view, device, settings)
    monitor.chance = method_spec(cfg.mechanism).chance(cfg, batch, size)
    return RunMonitor(monitor, autocast_dtype)
