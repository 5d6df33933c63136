"""The MoCo module: query encoder, momentum key encoder and key queue (MoCo v1 Algorithm 1),
registered as the pretraining method ``moco`` (v1/v2: the head, τ and augmentation differ)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.core.backbones import BackboneOptions, build_backbone, set_head
from moco.core.errors import ConfigError
from moco.core.heads import linear_head, mlp_head
from moco.core.loss import at_least_fp32, fp32, info_nce, moco_logits
from moco.core.method_base import CHECKPOINT_PREFIX, PretrainingMethod, StepOutput
from moco.core.methods import MemoryNeed, register_method
from moco.core.momentum import ConstantMomentum, init_key_encoder, momentum_update
from moco.core.queue import KeyQueue
from moco.core.seeding import KEY_SHUFFLE, QUEUE, stream_generator
from moco.core.shuffle_bn import KeyShuffle, LocalShuffle, convert_split_bn

__all__ = ["MoCo", "StepOutput", "build_encoder", "embed"]

#: ``main_moco.py``'s names of the queue's buffers (``module.queue``, ``module.queue_ptr``).
_ORIGINAL_NAMES = {"key_queue.queue": "queue", "key_queue.queue_ptr": "queue_ptr"}


def embed(features: torch.Tensor) -> torch.Tensor:
    """The unit-length embedding of encoder outputs [B, C], in at least float32 (under autocast
    too; a float64 model keeps float64)."""
    with fp32(features.device.type):
        return F.normalize(at_least_fp32(features), dim=1)


def build_encoder(
    arch: str, dim: int, *, mlp: bool, cifar_stem: bool, bn_splits: int,
    options: BackboneOptions | None = None,
) -> nn.Module:
    """A backbone with its head (``fc`` of a ResNet, ``head`` of a ViT: the backbone contract,
    :func:`~moco.core.backbones.set_head`) replaced by the projection head
    ([B,3,H,W] -> [B, dim]). ``options``: what the backbone needs beyond its name (a ViT's
    image and patch size, ...)."""
    backbone = build_backbone(arch, cifar_stem=cifar_stem, options=options)
    d = backbone.feature_dim
    set_head(backbone.model, mlp_head(d, dim) if mlp else linear_head(d, dim))
    if bn_splits > 1:
        convert_split_bn(backbone.model, bn_splits)
    return backbone.model


class MoCo(PretrainingMethod):
    """MoCo v1/v2 (the registered method ``moco``).

    Args:
        encoder_q: the query encoder f_q ([B,3,H,W] -> [B, dim]); f_k is a deep copy. Any
            ``nn.Module`` with that output works (checked at the first step).
        dim: embedding width C.
        k: queue length K.
        m: key-encoder momentum.
        t: softmax temperature τ.
        symmetric: loss(q1,k2) + loss(q2,k1), both key sets enqueued (the demo's option).
        generator: for the queue's random initial keys.
        shuffle: the key shuffle of a step called without one. Default: the paper's Shuffling
            BN on one device (MoCo v1 §3.3), a random permutation of the key batch around
            f_k (:class:`LocalShuffle`, its own generator seeded 2). It matters when f_k's
            BatchNorm sees sub-batches: build the encoder with ``bn_splits`` > 1
            (:class:`SplitBatchNorm`, as the authors' CIFAR demo); with plain BatchNorm on
            one device the statistics are the whole batch's either way. Under a process group
            pass the multi-GPU shuffle (``make_key_shuffle("ddp", ...)``) to each step: the
            default refuses to run there. :class:`NoShuffle` is the no-shuffle ablation.

    As a :class:`~moco.core.method_base.PretrainingMethod`: the optimizer trains f_q (f_k is
    frozen), m is constant (:class:`~moco.core.momentum.ConstantMomentum`), checkpoints keep
    ``main_moco.py``'s layout (``module.queue``, ``module.queue_ptr``, ``module.encoder_q.*``,
    ``module.encoder_k.*``), evaluation uses f_q.
    """

    def __init__(
        self,
        encoder_q: nn.Module,
        dim: int = 128,
        k: int = 65536,
        m: float = 0.999,
        t: float = 0.07,
        symmetric: bool = False,
        generator: torch.Generator | None = None,
        shuffle: KeyShuffle | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.default_shuffle: KeyShuffle = (
            shuffle if shuffle is not None else LocalShuffle(stream_generator(0, KEY_SHUFFLE)))
        self._explicit_shuffle = shuffle is not None
        self.m = m
        self.momentum_schedule = ConstantMomentum(m)
        self.t = t
        self.symmetric = symmetric
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        init_key_encoder(self.encoder_q, self.encoder_k)
        self.key_queue = KeyQueue(dim, k, generator=generator)

    def _default_shuffle(self) -> KeyShuffle:
        if (not self._explicit_shuffle and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            raise ConfigError(
                "MoCo called without a key shuffle in a process group of "
                f"{dist.get_world_size()}: the one-device default would let each process's "
                "BatchNorm see its own queries' keys; pass shuffle=make_key_shuffle('ddp', ctx, "
                "generator) (the paper's Shuffling BN across processes) to each step")
        return self.default_shuffle

    def encode_query(self, im: torch.Tensor) -> torch.Tensor:
        """q = normalize(f_q(im)), [B, C] float32 (also under autocast: see :func:`fp32`)."""
        out = self.encoder_q(im)
        if out.ndim != 2 or out.shape[1] != self.dim:
            raise ConfigError(
                f"the query encoder outputs {list(out.shape)}, MoCo(dim={self.dim}) needs "
                f"[batch, {self.dim}]: end the encoder with a head of width {self.dim} "
                f"(build_encoder(arch, {self.dim}, ...), or replace its last layer by "
                f"nn.Linear(features, {self.dim})), or pass dim={out.shape[-1]}")
        return embed(out)

    @torch.no_grad()
    def encode_key(self, im: torch.Tensor, shuffle: KeyShuffle) -> torch.Tensor:
        """k = normalize(f_k(im)) with the batch shuffled around f_k, [B, C], no gradient."""
        x, handle = shuffle.shuffle(im)
        return shuffle.unshuffle(embed(self.encoder_k(x)), handle)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, shuffle: KeyShuffle | None = None,
                index: torch.Tensor | None = None) -> StepOutput:
        """One MoCo step on two views [B,3,H,W] (MoCo v1 Algorithm 1; ``moco/builder.py``'s
        ``forward``). ``index`` (the samples'
        dataset indices) is unused by MoCo; other mechanisms share this signature.

        Order: EMA update of f_k, keys, logits against the current queue, then enqueue.
        Without ``shuffle``: the one given to the constructor (see the class docstring).
        """
        shuffle = shuffle if shuffle is not None else self._default_shuffle()
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.m)
        negatives = self.key_queue.negatives()
        if not self.symmetric:
            q = self.encode_query(im_q)
            k = self.encode_key(im_k, shuffle)
            logits = moco_logits(q, k, negatives, self.t)
            loss = info_nce(logits)
            self.key_queue.enqueue(shuffle.gather(k))
            return StepOutput(loss, logits.detach())
        q1, q2 = self.encode_query(im_q), self.encode_query(im_k)
        k1, k2 = self.encode_key(im_q, shuffle), self.encode_key(im_k, shuffle)
        logits = moco_logits(q1, k2, negatives, self.t)
        loss = info_nce(logits) + info_nce(moco_logits(q2, k1, negatives, self.t))
        self.key_queue.enqueue(shuffle.gather(torch.cat([k1, k2], dim=0)))
        return StepOutput(loss, logits.detach())

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """``main_moco.py``'s keys: the queue first, every key under ``module.``."""
        state = self.state_dict()
        out = {CHECKPOINT_PREFIX + _ORIGINAL_NAMES[k]: v for k, v in state.items()
               if k in _ORIGINAL_NAMES}
        out.update({CHECKPOINT_PREFIX + k: v for k, v in state.items() if k not in _ORIGINAL_NAMES})
        return out

    def state_from_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``main_moco.py``'s keys (with or without ``module.``) as this module's."""
        original = {v: k for k, v in _ORIGINAL_NAMES.items()}
        bare = super().state_from_checkpoint(state)
        return {original.get(k, k): v for k, v in bare.items()}


# ----- the registered method ----------------------------------------------------------------

def _keys_per_step(settings: Any) -> int:
    return int(settings.batch_size) * (2 if settings.symmetric else 1)


def _check(settings: Any) -> None:
    """Every step enqueues the global batch's keys (twice with ``--symmetric``): K >= that."""
    n = _keys_per_step(settings)
    if n > settings.moco_k:
        raise ConfigError(
            f"--moco-k {settings.moco_k} is smaller than the {n} keys enqueued per step "
            f"(batch {settings.batch_size}{' x2 for --symmetric' if settings.symmetric else ''}); "
            "raise --moco-k or lower --batch-size")


def _advise(settings: Any, images: int) -> list[str]:
    """A queue longer than the training set holds several keys of each image, encoded by key
    encoders of several epochs ago: the consistency the queue needs (MoCo v1 §3.2) is lost."""
    if settings.moco_k <= images:
        return []
    return [f"--moco-k {settings.moco_k} is larger than the {images} training images: the "
            f"queue holds about {settings.moco_k / images:.1f} keys of every image, from key "
            f"encoders up to {settings.moco_k / images:.1f} epochs old; use --moco-k "
            f"{images} or less (e.g. {_power_of_two_at_most(images)}) or more images"]


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _chance(settings: Any, _batch: int, _world: int) -> float:
    """An untrained encoder's loss: ln(K+1) per InfoNCE term (logits [N, 1+K], every column
    alike), two terms with ``--symmetric``."""
    return (2 if settings.symmetric else 1) * math.log(settings.moco_k + 1)


def _memory(settings: Any, num_samples: int | None) -> list[MemoryNeed]:
    return [(f"the queue (--moco-k {settings.moco_k} x --moco-dim {settings.moco_dim} float32)",
             settings.moco_k * settings.moco_dim * 4, "lower --moco-k or --moco-dim")]


@register_method(
    "moco", title="MoCo", help="momentum key encoder + queue of K keys (MoCo v1/v2)",
    dictionary=lambda s, images: f"K {s.moco_k}, m {s.moco_m}", check=_check, advise=_advise,
    memory=_memory, has_queue=True, chance=_chance)
def build_moco(settings: Any, encoder: nn.Module, num_samples: int | None = None) -> MoCo:
    """:class:`MoCo` around ``encoder`` (f_q; f_k is its copy) from the settings ``moco_dim``,
    ``moco_k``, ``moco_m``, ``moco_t``, ``symmetric`` and ``seed`` (the queue's initial keys
    come from the seed's ``QUEUE`` stream)."""
    return MoCo(encoder, dim=settings.moco_dim, k=settings.moco_k, m=settings.moco_m,
                t=settings.moco_t, symmetric=settings.symmetric,
                generator=stream_generator(settings.seed, QUEUE))
