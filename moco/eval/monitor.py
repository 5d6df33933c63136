"""The health report and the online probe of a pretraining run behind three calls, for a
training loop: :meth:`TrainingMonitor.after_step` after each optimizer step,
:meth:`TrainingMonitor.epoch_record` at the end of each epoch (its keys go into the epoch's
metrics.jsonl record), :meth:`TrainingMonitor.warnings` on the history. Nothing it does
changes the training (see :mod:`moco.eval.probe` and :mod:`moco.eval.health.sample`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from moco.core.backbones import feature_dim_of
from moco.core.device import to_device
from moco.core.errors import ConfigError
from moco.data.source import ImageSource
from moco.eval.feature_tap import HeadInputTap
from moco.eval.health import (
    HealthSample,
    Thresholds,
    chance_of_logits,
    default_sample_size,
    diagnose,
    encoder_health,
)
from moco.eval.probe import OnlineProbe, label_table

_log = logging.getLogger(__name__)

#: The keys :meth:`TrainingMonitor.epoch_record` may add to an epoch's record, each mirrored to
#: TensorBoard as ``epoch/<key>``.
SCALAR_KEYS = ("loss_chance", "health_rank", "health_rank_features", "health_std_ratio",
               "health_alignment", "health_uniformity", "probe_top1", "probe_train_top1",
               "probe_loss")


@dataclass
class MonitorSettings:
    """What to monitor. ``sample_size`` 0: :func:`~moco.eval.health.default_sample_size` of
    the training set. ``terms`` / ``scale``: the method's chance rule
    (:func:`~moco.eval.health.chance_loss`: 2 for ``--symmetric``; MoCo v3: 2 and 2τ), read
    off the first step's logits unless :attr:`TrainingMonitor.chance` is set. ``on_bad_image``:
    an unreadable sample image (``stop`` or ``skip``); ``batch_size`` and ``channels_last``:
    the health report's forward passes; ``epochs``: the run's planned epochs."""

    health: bool = True
    sample_size: int = 0
    probe: bool = True
    probe_lr: float = 0.01
    probe_momentum: float = 0.9
    probe_weight_decay: float = 0.0
    seed: int = 0
    terms: int = 1
    scale: float = 1.0
    on_bad_image: str = "stop"
    batch_size: int = 256
    channels_last: bool = False
    epochs: int = 0  #: the run's planned epochs, for the warnings' patience (0: unknown)


class TrainingMonitor:
    """The monitor of one run: ``encoder_q`` (the query encoder, with its head; not a DDP
    wrapper's copy), the training images ``source`` with their labels (the probe runs only
    when they are labeled), one view's training transform ``view``, the ``device``.

    Build it after the model (a tap registered before ``MoCo`` copies f_q into f_k would be
    copied too), on one process under torchrun."""

    def __init__(self, encoder_q: nn.Module, source: ImageSource,
                 view: Callable[[Image.Image], torch.Tensor], device: torch.device,
                 settings: MonitorSettings | None = None) -> None:
        s = settings or MonitorSettings()
        self.settings, self.device, self.encoder_q = s, device, encoder_q
        size = s.sample_size or default_sample_size(len(source))
        self.sample = (HealthSample(source, view, size=size, seed=s.seed,
                                    on_bad_image=s.on_bad_image)
                       if s.health and len(source) >= 2 else None)
        self.labels = label_table(source.labels, device) if s.probe else None
        # every image labeled: the probe selects no rows (which would wait for the device)
        self.all_labeled = self.labels is not None and bool((self.labels >= 0).all())
        self.tap: HeadInputTap | None = None
        self.probe: OnlineProbe | None = None
        if self.labels is not None:
            classes = len(source.classes) or int(self.labels.max()) + 1
            try:
                self.tap = HeadInputTap(encoder_q, training_only=True)
                self.probe = OnlineProbe(feature_dim_of(encoder_q), classes, lr=s.probe_lr,
                                         momentum=s.probe_momentum,
                                         weight_decay=s.probe_weight_decay, seed=s.seed,
                                         device=device)
            except ConfigError as e:  # no recognisable head, or one class only
                _log.info(f"online probe off: {e}")
                self.close()
                self.tap = self.probe = None
        self.chance: float | None = None
        self._warned: set[str] = set()  # the kinds of the last warnings (new_warnings)

    def after_step(self, logits: torch.Tensor | None, index: torch.Tensor) -> None:
        """After the optimizer step of a batch: ``logits`` [N, C] of the step (its
        ``StepOutput.logits``: the chance level is read off its width unless
        :attr:`chance` is set; None: not known) and the batch's dataset ``index`` [N] (the
        probe's labels; a pinned CPU tensor goes to the device without blocking). Reads
        nothing back from the device when every training image is labeled."""
        if self.chance is None and logits is not None:
            s = self.settings
            self.chance = chance_of_logits(logits, terms=s.terms, scale=s.scale)
        if self.probe is None or self.tap is None or self.labels is None:
            return
        features = self.tap.take()
        if features is not None:
            labels = self.labels[to_device(index, self.labels.device)]
            self.probe.step(features, labels, all_labeled=self.all_labeled)

    def skip_step(self) -> None:
        """Forget the features of a training-mode forward of ``encoder_q`` that is not a
        step's (the probe would take it for the next step's): call it after such a forward.
        Eval-mode forwards (kNN monitor, health report) are never recorded."""
        if self.tap is not None:
            self.tap.take()

    def epoch_record(self, loss: float | None = None, query_features: torch.Tensor | None = None,
                     query_labels: torch.Tensor | None = None, *, batch_size: int | None = None,
                     autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The epoch's monitor keys: ``loss_chance``, the health report
        (:meth:`~moco.eval.health.HealthReport.to_record`), ``probe_loss``,
        ``probe_train_top1`` and, with held-out backbone features [M, D] (the kNN monitor's
        query features with ``--knn-features backbone``) and their labels,
        ``probe_top1``. ``batch_size``: of the health report's forward passes (default: the
        settings')."""
        rec: dict[str, Any] = {"loss_chance": self.chance}
        if self.sample is not None:  # eval-mode forwards: the probe's tap ignores them
            report = encoder_health(self.encoder_q, self.sample, self.device,
                                    batch_size=batch_size or self.settings.batch_size,
                                    autocast_dtype=autocast_dtype,
                                    channels_last=self.settings.channels_last,
                                    loss=loss, chance=self.chance)
            rec.update(report.to_record())
        if self.probe is not None:
            rec.update(self.probe.epoch_metrics())
            rec["probe_top1"] = None
            if (query_features is not None and query_labels is not None
                    and query_features.shape[1] == self.probe.feature_dim):
                rec["probe_top1"] = self.probe.evaluate(query_features, query_labels)
        return rec

    def warnings(self, history: Sequence[dict[str, Any]],
                 thresholds: Thresholds | None = None) -> list[str]:
        """:func:`~moco.eval.health.diagnose` of the run's records so far."""
        return diagnose(history, thresholds, epochs=self.settings.epochs or None)

    def new_warnings(self, history: Sequence[dict[str, Any]],
                     thresholds: Thresholds | None = None) -> list[str]:
        """:meth:`warnings` less those of a kind (``collapsed``, ``stuck``, ...) already
        returned by the previous call: a problem is named when it appears (again), not at
        every epoch while it lasts."""
        lines = self.warnings(history, thresholds)
        kinds = [warning_kind(line) for line in lines]
        fresh = [line for line, kind in zip(lines, kinds, strict=True)
                 if kind not in self._warned]
        self._warned = set(kinds)
        return fresh

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint (tensors and numbers: ``torch.load(weights_only=True)``)."""
        return {"chance": self.chance,
                "probe": self.probe.state_dict() if self.probe is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chance = state.get("chance")
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])

    def close(self) -> None:
        """Remove the tap from the encoder."""
        if self.tap is not None:
            self.tap.close()


def warning_kind(line: str) -> str:
    """What a :func:`~moco.eval.health.diagnose` line says is wrong, without its epoch and
    figures: ``"stuck"``, ``"collapsed to a few dimensions"``, ..."""
    return re.sub(r" at epoch \d+", "", line).split(":", 1)[0]


def summary(record: dict[str, Any]) -> str:
    """The monitor's keys of an epoch record in a few words, for the epoch's log line (those
    present): effective rank, std x sqrt(d), the online probe's held-out top-1."""
    words = []
    if record.get("health_rank") is not None:
        words.append(f"rank {record['health_rank']:.1f}")
    if record.get("health_std_ratio") is not None:
        words.append(f"std ratio {record['health_std_ratio']:.2f}")
    if record.get("probe_top1") is not None:
        words.append(f"probe top-1 {record['probe_top1']:.2f}%")
    return ", ".join(words)
