"""How stale is the queue? The queue's keys against keys freshly encoded by the current f_k.

A queue of K keys holds the last K / B batches, each encoded by the key encoder of its own
step (MoCo v1 §3.2: the keys must stay *consistent* while the encoder evolves). Keys from
older encoders sit where the queries have moved away from, so they are easier negatives than
keys of the current encoder. This measures it, for training batches (the run's augmentation,
key shuffle and BN in training mode):

  queue:  the InfoNCE loss, pretext acc@1 and mean cos(q, negative) against the model's queue;
  fresh:  the same against K keys of other training images encoded now by the model's f_k.

A queue loss well below the fresh loss means stale, easy negatives (docs/ablations.md, "Stale
queue keys"). The model and its buffers are left untouched: the measurement runs on a copy,
with its own shuffle and its own image order, so a run trains the same with it or without it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moco.core.errors import ConfigError
from moco.core.loss import fp32, info_nce, moco_logits, top1_accuracy
from moco.core.model import MoCo
from moco.core.seeding import STALENESS, epoch_generator
from moco.core.shuffle_bn import KeyShuffle, make_key_shuffle
from moco.data.batches import TrainLoader

if TYPE_CHECKING:
    from moco.engine.run import RunParts

# Image orders of the measurement: epochs no run trains (an epoch index, not a count).
_FRESH_EPOCH = 1_000_000
_MEASURED_EPOCH = 2_000_000


@dataclass(frozen=True)
class Staleness:
    """Loss, pretext acc@1 (%) and mean cos(q, negative) against the queue and fresh keys."""

    queue_loss: float
    fresh_loss: float
    queue_acc1: float
    fresh_acc1: float
    queue_cos: float
    fresh_cos: float

    def as_record(self) -> dict[str, float]:
        return {f"staleness_{k}": v for k, v in vars(self).items()}


def _measure(model: MoCo, batches: list[tuple[torch.Tensor, torch.Tensor]], negatives: torch.Tensor,
             shuffle: KeyShuffle) -> tuple[float, float, float]:
    loss = acc = cos = 0.0
    for im_q, im_k in batches:
        q = model.encode_query(im_q)
        k = model.encode_key(im_k, shuffle)
        logits = moco_logits(q, k, negatives, model.t)
        loss += float(info_nce(logits))
        acc += top1_accuracy(logits)
        with fp32(q.device.type):
            cos += float((q.float() @ negatives.float()).mean())
    n = len(batches)
    return loss / n, acc / n, cos / n


@torch.no_grad()
def measure_staleness(model: MoCo, loader: TrainLoader, make_shuffle: Callable[[], KeyShuffle],
                      batches: int = 8, epoch: int = 0,
                      autocast_dtype: torch.dtype | None = None) -> Staleness:
    """Compare ``model``'s queue [C, K] with K fresh keys on ``batches`` training batches.

    Args:
        model: a MoCo module (not changed: a deep copy is measured).
        loader: the run's training loader; its batches of epochs ``_FRESH_EPOCH + epoch`` and
            ``_MEASURED_EPOCH + epoch`` are used (orders no training epoch uses).
        make_shuffle: a new key shuffle of the run's ``--shuffle-bn`` mode with a fixed seed of
            its own; each pass gets one, so both comparisons see the same permutations.
        batches: how many training batches the two dictionaries are compared on.
        epoch: which measurement this is (0, 1, ...): varies the images from call to call.
        autocast_dtype: the run's autocast dtype (None: fp32).
    """
    if batches < 1:
        raise ConfigError(f"staleness needs >= 1 measured batch, got {batches}")
    # BN in training mode, as in training (batch statistics: no forward here depends on another);
    # the running statistics it updates are the copy's.
    net = copy.deepcopy(model).train()
    device = net.key_queue.queue.device
    k_size = net.key_queue.size
    measured = [(b.im_q, b.im_k) for b in
                itertools.islice(loader.batches(_MEASURED_EPOCH + epoch), batches)]
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        fresh_shuffle = make_shuffle()
        fresh: list[torch.Tensor] = []
        n_fresh = 0
        for b in loader.batches(_FRESH_EPOCH + epoch):
            fresh.append(net.encode_key(b.im_k, fresh_shuffle).float())
            n_fresh += fresh[-1].shape[0]
            if n_fresh >= k_size:
                break
        if n_fresh < k_size:
            raise ConfigError(f"staleness needs K = {k_size} fresh keys, but an epoch has only "
                             f"{n_fresh} images; lower --moco-k or use more images")
        fresh_keys = torch.cat(fresh)[:k_size].T.contiguous()
        queue = net.key_queue.negatives().float()
        ql, qa, qc = _measure(net, measured, queue, make_shuffle())
        fl, fa, fc = _measure(net, measured, fresh_keys, make_shuffle())
    return Staleness(ql, fl, qa, fa, qc, fc)


def run_staleness(parts: RunParts, epoch: int) -> Staleness:
    """:func:`measure_staleness` of a run's model after ``epoch`` (0-based), with the run's
    loader, ``--shuffle-bn`` mode (its own seeded shuffles), batches and precision."""
    model, cfg, rt = parts.model, parts.cfg, parts.runtime
    assert isinstance(model, MoCo), "validated: --staleness-every needs --mechanism moco"
    return measure_staleness(
        model, parts.train_loader,
        lambda: make_key_shuffle(rt.shuffle_bn, rt.dist, epoch_generator(cfg.seed, epoch, STALENESS)),
        batches=cfg.staleness_batches, epoch=epoch, autocast_dtype=rt.autocast_dtype)
