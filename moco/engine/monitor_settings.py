"""The settings of the training monitor (:mod:`moco.engine.monitoring`), declared once and
listed among :class:`~moco.engine.config.MocoConfig`'s fields: ``--health``,
``--health-images``, ``--probe``, ``--probe-lr``. No torch here (``moco pretrain --help``
does not import it)."""

from __future__ import annotations

from typing import Any

from moco.utils.settings import setting


def health_setting(*, group: str) -> Any:
    """``--health``: the health report each epoch."""
    return setting(True, "--health", group=group, role="evaluation", help="label-free health "
                   "signals each epoch on a fixed sample of training images (effective rank, "
                   "std of the normalised embeddings, alignment, uniformity) in the log, "
                   "metrics.jsonl, TensorBoard and plot.png, and a warning when the run looks "
                   "collapsed (the loss's chance level and the stuck warnings stay without "
                   "them; docs/monitoring.md)")


def health_images_setting(*, group: str) -> Any:
    """``--health-images``: the health sample's size."""
    return setting(0, "--health-images", group=group, min=0, metavar="N", role="evaluation",
                   help="training images of the health sample (two fixed views each); 0 = 2% "
                   "of the training set, at least 128 and at most 512")


def probe_setting(*, group: str) -> Any:
    """``--probe``: the online linear probe."""
    return setting("auto", "--probe", group=group, metavar="auto|on|off", role="evaluation",
                   help="online linear probe: a linear classifier trained on the detached "
                   "backbone features of the training steps (nothing in the pretraining "
                   "changes), its top-1 on the kNN monitor's queries each epoch; auto = on when "
                   "the training images are labeled")


def probe_lr_setting(*, group: str) -> Any:
    """``--probe-lr``: the probe's learning rate."""
    return setting(0.01, "--probe-lr", group=group, min=0, min_open=True, role="evaluation",
                   help="the online probe's SGD learning rate (constant, momentum 0.9)")


def probe_wanted(cfg: Any, labeled: bool) -> bool:
    """Whether the run trains the online probe: ``--probe on`` or ``auto``, with ``labeled``
    training images (the probe needs their labels)."""
    return labeled and cfg.probe in (True, "auto")
