"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021): §3 and its Algorithm 1, §5; ``moco/builder.py`` and ``main_moco.py`` of
the authors' code.

* base encoder f_q = backbone + projector, followed by a predictor; momentum encoder f_k =
  backbone + projector, an exponential moving average of f_q's parameters (the predictor
  has no twin);
* no queue: the negatives of a query are the keys of the other images of the global batch
  (all processes' keys, gathered without gradient);
* a symmetric loss, ctr(q1, k2) + ctr(q2, k1), each term scaled by 2τ;
* the momentum rises from m0 to 1 by a half-cycle cosine over training (:func:`momentum_at`).

Under data parallelism the whole model's BatchNorm is synchronised (MoCo v3 §5;
:func:`moco.core.global_bn.sync_batchnorm_for`); on one device plain BatchNorm sees the
whole batch already. There is no Shuffling BN.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.core.backbones import BackboneOptions, build_backbone, set_head
from moco.core.collectives import concat_all_gather
from moco.core.heads import build_mlp
from moco.core.loss import fp32
from moco.core.model import StepOutput
from moco.core.momentum import init_key_encoder, momentum_update
from moco.core.shuffle_bn import KeyShuffle
from moco.core.vit import is_vision_transformer


def momentum_at(m0: float, t: float, total: float) -> float:
    """The momentum at training progress ``t`` of ``total`` epochs (``t`` = epoch +
    i / iters_per_epoch): 1 - ½(1 + cos(π t / total))(1 - m0), from m0 at t = 0 to 1 at the
    end (MoCo v3 Appendix A, following BYOL; ``main_moco.py --moco-m-cos``)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t / total)) * (1.0 - m0)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, t: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ctr(q, k) of MoCo v3 Algorithm 1: (loss, logits, labels).

    q: predictions [N, C] of this process's views, with gradient; k: keys [N, C] of the other
    views (no gradient). Both are L2-normalised (in float32, also under autocast); k is
    gathered from every process, [N·world, C] in rank order. (float64 inputs stay float64.) logits = q·k_allᵀ / τ
    [N, N·world]; the positive of query i is key i of this process, so labels = i + N·rank.
    loss = CrossEntropy(logits, labels) · 2τ (the factor is part of MoCo v3's loss).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    with fp32(q.device.type):
        qn = F.normalize(q.to(dtype), dim=1)
        kn = F.normalize(k.detach().to(dtype), dim=1)
        k_all = concat_all_gather(kn)
        logits = qn @ k_all.T / t
        n = q.shape[0]
        labels = torch.arange(n, device=q.device) + n * _rank()
        loss = F.cross_entropy(logits, labels) * (2.0 * t)
    return loss, logits, labels


def positive_first(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits [N, G] with each row's positive (column ``labels[i]``) moved to column 0 and
    the other columns after it in their order: the layout of MoCo v1/v2's logits, so that
    :func:`moco.core.loss.pretext_accuracy` (positive in column 0) applies unchanged."""
    n, g = logits.shape
    cols = torch.arange(g - 1, device=logits.device).expand(n, -1)
    others = cols + (cols >= labels[:, None]).to(cols.dtype)
    return logits.gather(1, torch.cat([labels[:, None], others], dim=1))


class MoCoV3(nn.Module):
    """MoCo v3: ``base_encoder`` and ``predictor`` are trained, ``momentum_encoder`` follows.

    Args:
        base_encoder: backbone + projector, [B,3,H,W] -> [B, C] (see :func:`build_mocov3`);
            the momentum encoder is a deep copy, frozen (no gradient, ever).
        predictor: [B, C] -> [B, C], on the query side only.
        t: temperature τ (1.0 for ResNets, 0.2 for ViTs in MoCo v3).
        m: the momentum m0. The EMA of a step uses :attr:`m`; set it per step with
            :meth:`set_momentum` (or assign ``m``) for the cosine schedule.

    State-dict keys are the authors' without their ``module.`` prefix: ``base_encoder.*``,
    ``momentum_encoder.*``, ``predictor.*``.
    """

    def __init__(self, base_encoder: nn.Module, predictor: nn.Module, t: float = 1.0,
                 m: float = 0.99) -> None:
        super().__init__()
        self.base_encoder = base_encoder
        self.predictor = predictor
        self.momentum_encoder = copy.deepcopy(base_encoder)
        init_key_encoder(self.base_encoder, self.momentum_encoder)
        self.t = t
        self.m0 = m
        self.m = m

    def set_momentum(self, t: float, total: float) -> float:
        """Set :attr:`m` to :func:`momentum_at` (m0, t, total) for the coming step (``t`` =
        epoch + i / iters_per_epoch, ``total`` = epochs) and return it."""
        self.m = momentum_at(self.m0, t, total)
        return self.m

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the base encoder's and the predictor's parameters that
        take a gradient (not the fixed position embedding, nor a frozen patch projection)."""
        return [p for module in (self.base_encoder, self.predictor)
                for p in module.parameters() if p.requires_grad]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, shuffle: KeyShuffle | None = None,
                index: torch.Tensor | None = None) -> StepOutput:
        """One MoCo v3 step on two views [N,3,H,W] of the same N images (Algorithm 1).

        Order: queries q1, q2 = predictor(f_q(x1)), predictor(f_q(x2)); then, without
        gradient, the momentum update of f_k with the current :attr:`m` and the keys
        k1, k2 = f_k(x1), f_k(x2); then loss = ctr(q1, k2) + ctr(q2, k1).
        ``shuffle`` and ``index`` (the step signature of MoCo v1/v2) are unused: MoCo v3 has
        no Shuffling BN.

        Returns the loss and the logits of the first pair with each positive moved to column 0
        ([N, N·world], see :func:`positive_first`).
        """
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            momentum_update(self.base_encoder, self.momentum_encoder, self.m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        loss1, logits, labels = contrastive_loss(q1, k2, self.t)
        loss2, _, _ = contrastive_loss(q2, k1, self.t)
        return StepOutput(loss1 + loss2, positive_first(logits.detach(), labels))


@dataclass(frozen=True)
class HeadSpec:
    """The depth of MoCo v3's MLPs and whether each ends in a BatchNorm (MoCo v3 §5, "MLP heads";
    ``moco/builder.py``)."""

    projector_layers: int
    projector_last_bn: bool
    predictor_layers: int
    predictor_last_bn: bool


RESNET_HEADS = HeadSpec(projector_layers=2, projector_last_bn=True, predictor_layers=2,
                        predictor_last_bn=False)
VIT_HEADS = HeadSpec(projector_layers=3, projector_last_bn=True, predictor_layers=2,
                     predictor_last_bn=True)


@dataclass(frozen=True)
class MoCoV3Config:
    """What :func:`build_mocov3` builds: widths C (``dim``) and hidden (``mlp_dim``) of the
    MLPs, τ, m0, the heads (None: :data:`VIT_HEADS` for a ViT, else :data:`RESNET_HEADS`)."""

    dim: int = 256
    mlp_dim: int = 4096
    t: float = 1.0
    m: float = 0.99
    heads: HeadSpec | None = None


def build_mocov3(arch: str, config: MoCoV3Config | None = None,
                 options: BackboneOptions | None = None) -> MoCoV3:
    """MoCo v3 on the backbone ``arch`` (built with ``options``, e.g.
    ``BackboneOptions(zero_init_residual=True, require_batchnorm=False)`` for MoCo v3's
    ResNets, ``BackboneOptions(stop_grad_conv1=True, require_batchnorm=False)`` for its ViTs):
    the backbone's head becomes the projector (feature width D -> mlp_dim -> ... -> dim), the
    predictor is dim -> mlp_dim -> dim."""
    c = config or MoCoV3Config()
    backbone = build_backbone(arch, options=options)
    spec = c.heads or (VIT_HEADS if is_vision_transformer(backbone.model) else RESNET_HEADS)
    set_head(backbone.model, build_mlp(spec.projector_layers, backbone.feature_dim, c.mlp_dim,
                                       c.dim, spec.projector_last_bn))
    predictor = build_mlp(spec.predictor_layers, c.dim, c.mlp_dim, c.dim, spec.predictor_last_bn)
    return MoCoV3(backbone.model, predictor, t=c.t, m=c.m)
