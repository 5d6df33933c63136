"""Warnings from the health signals and the loss: is the training collapsed, or stuck?

:func:`diagnose` reads a :class:`~moco.eval.health.report.HealthReport`, one metrics.jsonl record or
a run's whole history (the records of ``metrics.jsonl``, oldest first) and returns one line
per problem it sees, each naming the figures and what commonly causes it. No line means
nothing looks wrong, not that the features are good: kNN or the online probe says that.

Two kinds of failure, with their signatures:

* **collapsed**: every image gets (nearly) the same embedding: the std of the normalised
  embeddings near 0 (healthy: near 1/sqrt(D)), an effective rank near 1, a uniformity near
  0. A contrastive loss cannot stay low when this happens (the positive looks like every
  negative), so the loss sits at chance too.
* **stuck**: the loss stays at its chance level (:func:`~moco.eval.health.signals.chance_loss`) after
  the first epochs, sits above it (the positive scores below the negatives), or does not move
  near it; or the kNN monitor stays at or below the untrained network's.

A third pattern is a shortcut, not a failure of the loss: a pretext accuracy near 100 % means
the task is solved without learning features (MoCo v1 §3.3: BN statistics leak the positive).

The thresholds (:class:`Thresholds`) are set so that a randomly initialised ResNet-18 on
natural images (std x sqrt(D) about 0.26, effective rank about 35 of 128, uniformity about
-0.3) is not called collapsed, and the authors' CIFAR-10 log (loss 6.96 -> 7.29 over the first
three epochs against a chance level of 8.32, then falling) is not called stuck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moco.eval.health.report import HealthReport


@dataclass(frozen=True)
class Thresholds:
    """When :func:`diagnose` warns (see the module docstring for the calibration)."""

    collapsed_std_ratio: float = 0.05  #: std x sqrt(D) below this: collapsed
    collapsed_rank: float = 1.5  #: effective rank below this: collapsed
    collapsed_uniformity: float = -0.01  #: uniformity above this: collapsed
    low_rank_fraction: float = 0.02  #: rank below this share of min(N, D): dimensional collapse
    falling_fraction: float = 0.25  #: rank or std x sqrt(D) below this share of its best
    patience_epochs: int = 3  #: no "stuck" warning before this epoch
    at_chance: float = 0.97  #: loss at or above this share of chance: at chance
    above_chance: float = 1.02  #: loss above this share of chance: above chance
    flat_window: int = 5  #: epochs over which a loss that does not move is stuck ...
    flat_tolerance: float = 0.01  #: ... moving less than this share of chance ...
    flat_near_chance: float = 0.9  #: ... while at least this share of chance
    easy_acc1: float = 99.5  #: pretext acc@1 (%) at or above this: a shortcut
    #: the kNN monitor is judged from epoch 2 x ``patience_epochs``, or later in runs of
    #: short epochs: from this share of the planned epochs, but no later than the epoch of
    #: ``knn_patience_steps`` steps (the README's small-data recipe, 15 steps an epoch, reads
    #: under the untrained network until epoch 7 of 40, then gains 12 points; ImageNet's
    #: 5,000-step epochs are judged from epoch 6 all the same)
    knn_patience_fraction: float = 0.25
    knn_patience_steps: int = 2000


COLLAPSE_CAUSES = (
    "common causes: a learning rate too high (the weights blow up and the ReLUs die: lower "
    "--lr or add --warmup-epochs), a temperature too high for the negatives to push the "
    "embeddings apart (--moco-t: the papers use 0.07-0.2), too few negatives (--moco-k, or the "
    "batch with end-to-end), weight decay too strong (--wd), or an encoder whose output does "
    "not depend on its input (a frozen, zeroed or disconnected layer)")
STUCK_CAUSES = (
    "common causes: a learning rate too low (nothing moves) or too high (the loss oscillates "
    "around chance), a momentum too low for the queue (--moco-m: MoCo v1 §4.1 fails at 0; "
    "0.99-0.999 work), a temperature too high (--moco-t 1 bounds the logits to [-1, 1], so "
    "the loss cannot go far below chance), BN sub-batches too small (--bn-splits: the "
    "original keeps about 32 images per BN group; the batch must be a multiple), or a queue "
    "as large as the training set (--moco-k >= images: older keys of the same images are "
    "negatives)")
ABOVE_CHANCE_CAUSES = (
    "the positive scores below the negatives on average; common causes: a memory bank's "
    "first epochs (its entries are random until each is refreshed, MoCo v1 §3.2), a queue "
    "as large as the training set (--moco-k >= images: older keys of the same image are "
    "negatives), or keys gone stale under a learning rate too high for the momentum "
    "(lower --lr, raise --moco-m)")
EASY_CAUSES = (
    "the pretext task is solved by a shortcut instead of by the features: without Shuffling "
    "BN the batch statistics leak which key is the positive (MoCo v1 §3.3): keep --shuffle-bn "
    "on (split with --bn-splits on one device, ddp under torchrun); too few negatives for "
    "the data (--moco-k, the batch with end-to-end) also make the task too easy")


def _collapse(r: HealthReport, th: Thresholds, where: str) -> list[str]:
    out = []
    signs = []
    if r.std_ratio < th.collapsed_std_ratio:
        signs.append(f"std x sqrt(d) {r.std_ratio:.3f} (spread: ~1)")
    if r.rank < th.collapsed_rank:
        signs.append(f"effective rank {r.rank:.2f} of {r.dim}")
    if r.uniformity > th.collapsed_uniformity:
        signs.append(f"uniformity {r.uniformity:.3f} (spread: below -1)")
    if signs:
        out.append(f"collapsed{where}: the embeddings of different images are (nearly) the "
                   f"same: {', '.join(signs)}; {COLLAPSE_CAUSES}")
        return out
    low = th.low_rank_fraction * min(r.images or r.dim, r.dim)
    feats_low = r.rank_features is None or r.rank_features < th.low_rank_fraction * min(
        r.images or r.feature_dim or 1, r.feature_dim or 1)
    if r.rank < low and feats_low:
        feats = (f" (features: {r.rank_features:.1f} of {r.feature_dim})"
                 if r.rank_features is not None else "")
        out.append(f"collapsed{where} to a few dimensions: effective rank {r.rank:.1f} of "
                   f"{r.dim}{feats}; {COLLAPSE_CAUSES}")
    return out


def _loss_line(loss: float, chance: float, th: Thresholds, where: str) -> list[str]:
    if loss > th.above_chance * chance:
        return [f"stuck{where}: loss {loss:.3f} is above its chance level {chance:.3f}: "
                f"{ABOVE_CHANCE_CAUSES}"]
    if loss >= th.at_chance * chance:
        return [f"stuck{where}: loss {loss:.3f} is at its chance level {chance:.3f} (an "
                f"encoder that has learned nothing); {STUCK_CAUSES}"]
    return []


def _epoch_of(record: dict[str, Any]) -> int:
    return int(record.get("epoch") or 0)


def _flat(history: Sequence[dict[str, Any]], th: Thresholds) -> list[str]:
    """The loss of the last ``flat_window`` epochs does not move, near chance."""
    tail = [h for h in history if h.get("loss") is not None][-th.flat_window:]
    if len(tail) < th.flat_window:
        return []
    losses = [float(h["loss"]) for h in tail]
    chance = tail[-1].get("loss_chance")
    scale = float(chance) if chance else abs(losses[-1])
    if max(losses) - min(losses) > th.flat_tolerance * scale:
        return []
    if chance and losses[-1] < th.flat_near_chance * float(chance):
        return []
    near = f", {losses[-1] / float(chance):.0%} of its chance level" if chance else ""
    return [f"stuck: the loss has not moved for {len(tail)} epochs ({min(losses):.3f} to "
            f"{max(losses):.3f}{near}); {STUCK_CAUSES}"]


def _falling(history: Sequence[dict[str, Any]], th: Thresholds) -> list[str]:
    """Effective rank or std x sqrt(D) fell far below its best of the run."""
    out = []
    for key, name in (("health_rank", "effective rank"), ("health_std_ratio", "std x sqrt(d)")):
        seen = [(_epoch_of(h), float(h[key])) for h in history if h.get(key) is not None]
        if len(seen) < 2:
            continue
        best_epoch, best = max(seen, key=lambda e: e[1])
        epoch, now = seen[-1]
        if epoch > best_epoch and now < th.falling_fraction * best:
            out.append(f"collapsing: {name} fell from {best:.2f} (epoch {best_epoch}) to "
                       f"{now:.2f} (epoch {epoch}); {COLLAPSE_CAUSES}")
    return out


def _knn_patience(last: dict[str, Any], th: Thresholds, epochs: int | None) -> int:
    """The first epoch the kNN monitor is judged at (see :class:`Thresholds`)."""
    share = math.ceil(th.knn_patience_fraction * (epochs or 0))
    step, epoch = last.get("step"), _epoch_of(last)
    if step and epoch:  # the epoch at which knn_patience_steps steps are done
        share = min(share, math.ceil(th.knn_patience_steps * epoch / float(step)))
    return max(2 * th.patience_epochs, share)


def _knn_floor(last: dict[str, Any], th: Thresholds, epochs: int | None) -> list[str]:
    knn, floor = last.get("knn_top1"), last.get("knn_random_init")
    if knn is None or floor is None or _epoch_of(last) < _knn_patience(last, th, epochs):
        return []
    if float(knn) > float(floor):
        return []
    return [f"stuck: kNN top-1 {float(knn):.2f}% at epoch {_epoch_of(last)} is not above the "
            f"untrained network's {float(floor):.2f}% (the first epochs may dip below it; "
            f"later it means the features are not learning); {STUCK_CAUSES}"]


def _history(history: Sequence[dict[str, Any]], th: Thresholds,
             epochs: int | None = None) -> list[str]:
    if not history:
        return []
    last = history[-1]
    out: list[str] = []
    reports = [(h, HealthReport.from_record(h)) for h in history]
    with_health = [(h, r) for h, r in reports if r is not None]
    if with_health:
        h, r = with_health[-1]
        assert r is not None
        out += _collapse(r, th, f" at epoch {_epoch_of(h)}")
    out += _falling(history, th)
    loss, chance = last.get("loss"), last.get("loss_chance")
    if loss is not None and chance and _epoch_of(last) >= th.patience_epochs:
        out += _loss_line(float(loss), float(chance), th, f" at epoch {_epoch_of(last)}")
    if not any(line.startswith("stuck") for line in out):
        out += _flat(history, th)
    acc = last.get("acc1")
    if acc is not None and float(acc) >= th.easy_acc1 and _epoch_of(last) >= th.patience_epochs:
        out.append(f"too easy at epoch {_epoch_of(last)}: pretext acc@1 {float(acc):.1f}%; "
                   f"{EASY_CAUSES}")
    return out + _knn_floor(last, th, epochs)


def diagnose(obj: HealthReport | dict[str, Any] | Sequence[dict[str, Any]],
             thresholds: Thresholds | None = None, *, epochs: int | None = None) -> list[str]:
    """Warnings (one line each; empty when nothing looks wrong) for a
    :class:`~moco.eval.health.report.HealthReport`, a metrics.jsonl record, or a run's history
    (records oldest first, as :func:`moco.utils.runlog.read_metrics` returns them).

    Each line starts with what is wrong (``collapsed``, ``collapsing``, ``stuck``, ``too
    easy``), gives the figures and says what commonly causes it. A report alone is judged on
    its signals and, when it carries ``loss`` and ``chance``, on the loss (at or above
    chance). A history is judged on its newest health record, the trend of its signals, its
    newest loss against ``loss_chance`` (from epoch ``patience_epochs`` on), a loss that does
    not move near chance, the pretext accuracy and the kNN monitor against the untrained
    network's (from epoch 2 x ``patience_epochs``, or ``knn_patience_fraction`` of the run's
    planned ``epochs`` when given)."""
    th = thresholds or Thresholds()
    if isinstance(obj, HealthReport):
        out = _collapse(obj, th, "")
        if obj.loss is not None and obj.chance:
            out += _loss_line(obj.loss, obj.chance, th, "")
        return out
    if isinstance(obj, dict):
        return _history([obj], th, epochs)
    return _history(list(obj), th, epochs)
