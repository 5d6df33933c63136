"""Label-free health signals of a batch of embeddings, and the loss's chance level.

Each signal is a pure function of embeddings [N, D] (computed in float64 on the CPU: a few
hundred rows cost milliseconds) that says whether the representation is spread out or has
collapsed, without any label:

* :func:`effective_rank`: RankMe (Garrido et al., ICML 2023), exp of the entropy of the
  normalised singular values; from 1 (every embedding on one line) to min(N, D).
* :func:`alignment` and :func:`uniformity` (Wang & Isola, ICML 2020): how close the two views
  of an image land (lower is better, 0 for identical views) and how evenly the embeddings
  cover the unit sphere (log of a Gaussian potential; 0 when every embedding is the same
  point, down to about -4 for t = 2 when they are spread over a high-dimensional sphere).
* :func:`normalized_std`: the per-dimension standard deviation of the L2-normalised
  embeddings (SimSiam, Chen & He, CVPR 2021, §4.1): 0 for a collapsed output, about
  1/sqrt(D) for embeddings spread over the sphere.
* :func:`chance_loss`: the loss of an encoder that has learned nothing, ln(C) for InfoNCE
  over C logit columns (see the function for each method's C).

:class:`~moco.eval.health.report.HealthReport` gathers them for one encoder on one sample
(:func:`~moco.eval.health.sample.encoder_health`); :func:`~moco.eval.health.diagnose.diagnose`
turns reports and training histories into warnings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: RankMe's epsilon added to every normalised singular value (Garrido et al. 2023, Eq. 1).
RANKME_EPS = 1e-7
#: Wang & Isola's exponents: alignment alpha 2, uniformity t 2 (their defaults).
ALIGN_ALPHA = 2.0
UNIFORM_T = 2.0


def _f64(z: torch.Tensor) -> torch.Tensor:
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"expected embeddings [N, D] with N >= 1, got shape {tuple(z.shape)}")
    return z.detach().to("cpu", torch.float64)


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of embeddings ``z`` [N, D] (Garrido et al., "RankMe: Assessing the downstream
    performance of pretrained self-supervised representations by their rank", ICML 2023,
    Eq. 1): with σ the singular values of ``z``, p_k = σ_k / ||σ||_1 + ε and
    RankMe = exp(-Σ_k p_k log p_k).

    The embeddings are taken as they are (not centred, not normalised), as in the paper. A
    matrix of identical non-zero rows gives 1; N >= D embeddings spread evenly over all D
    dimensions give about D. An all-zero matrix has no direction at all: 0."""
    s = torch.linalg.svdvals(_f64(z))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = ALIGN_ALPHA) -> float:
    """Alignment of positive pairs (Wang & Isola, "Understanding contrastive representation
    learning through alignment and uniformity on the hypersphere", ICML 2020, Eq. 3):
    E ||f(x) - f(y)||_2^alpha over the pairs (row i of ``x`` and row i of ``y``, [N, D], two
    views of image i), on L2-normalised rows. 0 when both views land on the same point; 4
    (alpha 2) when they are antipodal."""
    a, b = F.normalize(_f64(x), dim=1), F.normalize(_f64(y), dim=1)
    if a.shape != b.shape:
        raise ValueError(f"alignment needs two views of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return float((a - b).norm(dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(x: torch.Tensor, t: float = UNIFORM_T) -> float:
    """Uniformity (Wang & Isola 2020, Eq. 4): log E exp(-t ||f(x) - f(y)||_2^2) over all pairs
    of distinct rows of ``x`` [N, D] (N >= 2), on L2-normalised rows. 0 when every row is the
    same point (collapse); lower (more negative) when they spread over the sphere, at best
    about -2t = -4 for many dimensions (every pair nearly orthogonal: squared distance 2)."""
    a = F.normalize(_f64(x), dim=1)
    if a.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 embeddings")
    sq = torch.pdist(a, p=2).pow(2)  # the N(N-1)/2 pairs i < j: the mean over all i != j
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> float:
    """Mean over the D dimensions of the standard deviation over the N rows of the
    L2-normalised embeddings (SimSiam, Chen & He, "Exploring simple Siamese representation
    learning", CVPR 2021, §4.1; population std). 0 when every output is the same vector
    (collapse); about 1/sqrt(D) when the outputs are spread over the sphere (zero mean,
    isotropic): compare ``std * sqrt(D)`` with 1."""
    a = F.normalize(_f64(z), dim=1)
    return float(a.std(dim=0, correction=0).mean())


def chance_loss(columns: int, *, terms: int = 1, scale: float = 1.0) -> float:
    """The loss of an encoder that has learned nothing: ``terms * scale * ln(columns)``.

    InfoNCE is a cross-entropy over the C = ``columns`` logits of a query, one of them the
    positive. With no information every column is as likely (equal logits): the softmax is
    uniform and the loss is ln C. A method declares its rule by the width of its logits (the
    ``logits`` of every step have it as their last dimension: :func:`chance_of_logits`), how
    many such terms its loss sums and the factor it multiplies them by:

    ===============================  ====================  =======  =====  ====================
    method                           logits per process    terms    scale  chance level
    ===============================  ====================  =======  =====  ====================
    MoCo v1/v2 (queue of K)          [N, 1+K]              1        1      ln(K+1)
    MoCo, ``--symmetric``            [N, 1+K] twice        2        1      2 ln(K+1)
    memory bank (K drawn)            [N, 1+K]              1        1      ln(K+1)
    end-to-end (MoCo v1 Fig. 2a)     [N, N]: own key +     1        1      ln N
                                     the N-1 others
    MoCo v3 (keys of every process)  [N, N_global]         2        2τ     4τ ln(N_global)
    ===============================  ====================  =======  =====  ====================

    N is the batch of one process, N_global the batch of all processes. ln(2N-1) is the
    chance level of SimCLR's NT-Xent, where each of the 2N views is scored against the 2N-1
    other views; no method here has that layout. K 4096: 8.318; K 65536: 11.09; end-to-end
    at batch 128: 4.852.
    """
    if columns < 1 or terms < 1 or scale <= 0:
        raise ValueError(f"expected columns >= 1, terms >= 1, scale > 0; got {columns}, "
                         f"{terms}, {scale}")
    return terms * scale * math.log(columns)


def chance_of_logits(logits: torch.Tensor, *, terms: int = 1, scale: float = 1.0) -> float:
    """:func:`chance_loss` for a step's ``logits`` [N, C] (C = the last dimension)."""
    return chance_loss(int(logits.shape[-1]), terms=terms, scale=scale)
