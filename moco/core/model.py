"""The MoCo module: query encoder, momentum key encoder and key queue (MoCo v1 Algorithm 1)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.core.backbones import build_backbone
from moco.core.errors import ConfigError
from moco.core.heads import linear_head, mlp_head
from moco.core.loss import at_least_fp32, fp32, info_nce, moco_logits
from moco.core.momentum import init_key_encoder, momentum_update
from moco.core.queue import KeyQueue
from moco.core.seeding import KEY_SHUFFLE, stream_generator
from moco.core.shuffle_bn import KeyShuffle, LocalShuffle, convert_split_bn


@dataclass
class StepOutput:
    """What one forward returns: the loss to back-propagate and the logits [N, 1+K] of the
    first (or only) query/key pair, for the pretext accuracy."""

    loss: torch.Tensor
    logits: torch.Tensor


def embed(features: torch.Tensor) -> torch.Tensor:
    """The unit-length embedding of encoder outputs [B, C], in at least float32 (under autocast
    too; a float64 model keeps float64)."""
    with fp32(features.device.type):
        return F.normalize(at_least_fp32(features), dim=1)


def build_encoder(
    arch: str, dim: int, *, mlp: bool, cifar_stem: bool, bn_splits: int
) -> nn.Module:
    """A backbone with its ``fc`` replaced by the projection head ([B,3,H,W] -> [B, dim])."""
    backbone = build_backbone(arch, cifar_stem=cifar_stem)
    d = backbone.feature_dim
    backbone.model.fc = mlp_head(d, dim) if mlp else linear_head(d, dim)
    if bn_splits > 1:
        convert_split_bn(backbone.model, bn_splits)
    return backbone.model


class MoCo(nn.Module):
    """MoCo v1/v2.

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
