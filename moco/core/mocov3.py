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
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco.core.backbones import BackboneOptions, build_backbone, feature_dim_of, set_head
from moco.core.collectives import concat_all_gather
from moco.core.errors import ConfigError
from moco.core.heads import build_mlp
from moco.core.loss import fp32
from moco.core.method_base import PretrainingMethod, StepOutput
from moco.core.methods import register_method
from moco.core.momentum import (
    ConstantMomentum,
    CosineMomentum,
    init_key_encoder,
    momentum_update,
)
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


class MoCoV3(PretrainingMethod):
    """MoCo v3 (the registered method ``mocov3``): ``base_encoder`` and ``predictor`` are
    trained, ``momentum_encoder`` follows.

    Args:
        base_encoder: backbone + projector, [B,3,H,W] -> [B, C] (see :func:`build_mocov3`);
            the momentum encoder is a deep copy, frozen (no gradient, ever).
        predictor: [B, C] -> [B, C], on the query side only.
        t: temperature τ (1.0 for ResNets, 0.2 for ViTs in MoCo v3).
        m: the momentum m0. The EMA of a step uses :attr:`m`; the training loop sets it per
            step from :attr:`momentum_schedule` (:meth:`set_progress`), or set it with
            :meth:`set_momentum` (or assign ``m``).
        cosine: the momentum rises from m0 to 1 by the half-cycle cosine over training
            (:class:`~moco.core.momentum.CosineMomentum`, ``main_moco.py --moco-m-cos``);
            False keeps m0 (:class:`~moco.core.momentum.ConstantMomentum`).

    As a :class:`~moco.core.method_base.PretrainingMethod`: the optimizer trains the base
    encoder and the predictor (:meth:`trained_parameters`), evaluation uses the base encoder
    (its head is the projector: the kNN monitor, ``lincls`` and the exports drop it), and
    checkpoints hold the authors' keys under ``module.``: ``module.base_encoder.*``,
    ``module.momentum_encoder.*``, ``module.predictor.*`` (what ``moco knn``, ``lincls``,
    ``export`` and ``embed`` read in the authors' releases).
    """

    encoder_attr = "base_encoder"

    def __init__(self, base_encoder: nn.Module, predictor: nn.Module, t: float = 1.0,
                 m: float = 0.99, cosine: bool = True) -> None:
        super().__init__()
        self.base_encoder = base_encoder
        self.momentum_encoder = copy.deepcopy(base_encoder)
        self.predictor = predictor
        init_key_encoder(self.base_encoder, self.momentum_encoder)
        self.t = t
        self.m0 = m
        self.m = m
        self.momentum_schedule = CosineMomentum(m) if cosine else ConstantMomentum(m)

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

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """One parameter group: :meth:`trained_parameters`."""
        return [{"params": self.trained_parameters()}]

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
    MLPs, τ, m0 and its cosine schedule (``m_cos``), the heads (None: :data:`VIT_HEADS` for a
    ViT, else :data:`RESNET_HEADS`)."""

    dim: int = 256
    mlp_dim: int = 4096
    t: float = 1.0
    m: float = 0.99
    heads: HeadSpec | None = None
    m_cos: bool = True


def with_v3_heads(encoder: nn.Module, feature_dim: int, config: MoCoV3Config) -> MoCoV3:
    """MoCo v3 around ``encoder`` (a backbone whose features [B, ``feature_dim``] enter its
    head): the head (``fc`` / ``head``, :func:`~moco.core.backbones.set_head`) becomes the
    projector (feature_dim -> mlp_dim -> ... -> dim), the predictor is dim -> mlp_dim -> dim,
    their depths those of ``config.heads`` (by default by the backbone's kind, §5)."""
    c = config
    spec = c.heads or (VIT_HEADS if is_vision_transformer(encoder) else RESNET_HEADS)
    set_head(encoder, build_mlp(spec.projector_layers, feature_dim, c.mlp_dim, c.dim,
                                spec.projector_last_bn))
    predictor = build_mlp(spec.predictor_layers, c.dim, c.mlp_dim, c.dim, spec.predictor_last_bn)
    return MoCoV3(encoder, predictor, t=c.t, m=c.m, cosine=c.m_cos)


def build_mocov3(arch: str, config: MoCoV3Config | None = None,
                 options: BackboneOptions | None = None) -> MoCoV3:
    """MoCo v3 on the backbone ``arch`` (built with ``options``, e.g.
    ``BackboneOptions(zero_init_residual=True, require_batchnorm=False)`` for MoCo v3's
    ResNets, ``BackboneOptions(stop_grad_conv1=True, require_batchnorm=False)`` for its ViTs),
    its heads by :func:`with_v3_heads`."""
    backbone = build_backbone(arch, options=options)
    return with_v3_heads(backbone.model, backbone.feature_dim, config or MoCoV3Config())


# ----- the registered method ----------------------------------------------------------------

#: What MoCo v3's backbones are built with (§5; ``main_moco.py``): torchvision ResNets with
#: ``zero_init_residual``; any network, BatchNorm or not (no Shuffling BN needs it).
BACKBONE_OPTIONS = {"zero_init_residual": True, "require_batchnorm": False}


def chance_loss(t: float, global_batch: int) -> float:
    """MoCo v3's loss of an encoder that has learned nothing (every logit alike): each of the
    two ctr terms is 2τ·ln N for the N keys of the global batch, so 4τ·ln N."""
    return 4.0 * t * math.log(global_batch)


def _check(settings: Any) -> None:
    if settings.shuffle_bn not in ("auto", "none"):
        raise ConfigError(
            f"--shuffle-bn {settings.shuffle_bn}: MoCo v3 has no Shuffling BN (its BatchNorm "
            "sees the global batch, synchronised across processes); drop --shuffle-bn")
    if settings.batch_size < 2:
        raise ConfigError("--mechanism mocov3 takes its negatives from the batch: --batch-size "
                          f"must be >= 2, got {settings.batch_size}")


def _advise(settings: Any, _images: int) -> list[str]:
    """Settings of MoCo v1/v2 that MoCo v3 does not read, when given."""
    out = []
    if settings.symmetric:
        out.append("--symmetric: MoCo v3's loss is always symmetric (ctr(q1, k2) + ctr(q2, k1)); "
                   "the flag changes nothing")
    if settings.mlp:
        out.append("--mlp: MoCo v3 always has its MLP projector and predictor (widths --mlp-dim "
                   "and --moco-dim); the flag changes nothing")
    return out


def _dictionary(settings: Any, _images: int) -> str:
    m = f"m {settings.moco_m:g}" + (" -> 1 (cosine)" if settings.moco_m_cos else "")
    return (f"batch negatives, all-gathered ({settings.batch_size - 1} per query, no queue: "
            f"--moco-k unused), {m}")


def _head(settings: Any) -> str:
    return f"MLP projector + predictor (hidden {settings.mlp_dim}, out {settings.moco_dim})"


@register_method(
    "mocov3", title="MoCo v3", help="MoCo v3: no queue, the global batch's keys as negatives, "
    "a predictor, symmetric loss, momentum m0 -> 1 (ResNets and ViTs)",
    dictionary=_dictionary, check=_check, advise=_advise, shuffle_bn=False,
    backbone_options=lambda _s: dict(BACKBONE_OPTIONS), head=_head,
    chance=lambda s, batch, world: chance_loss(s.moco_t, batch * world))
def build_mocov3_method(settings: Any, encoder: nn.Module,
                        num_samples: int | None = None) -> MoCoV3:
    """:class:`MoCoV3` around ``encoder`` (the run's backbone; its head is replaced by the
    projector) from the settings ``moco_dim``, ``mlp_dim``, ``moco_t``, ``moco_m`` and
    ``moco_m_cos``."""
    config = MoCoV3Config(dim=settings.moco_dim, mlp_dim=settings.mlp_dim, t=settings.moco_t,
                          m=settings.moco_m, m_cos=settings.moco_m_cos)
    return with_v3_heads(encoder, feature_dim_of(encoder), config)
