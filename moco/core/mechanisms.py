"""The two other contrastive mechanisms the MoCo paper compares against (MoCo v1 §3.2,
Figure 2 and Figure 3), registered as the methods ``end-to-end`` and ``memory-bank``.

Each is a :class:`~moco.core.method_base.PretrainingMethod` like :class:`MoCo`: its
``forward(im_q, im_k, shuffle, index)`` returns a :class:`~moco.core.method_base.StepOutput`
(loss, logits [N, 1+K] with the positive in column 0), its query encoder is ``encoder_q``
(the one the optimizer trains and evaluation uses), no EMA. State dicts hold ``encoder_q.*``
plus each mechanism's own buffers:

* ``moco``        (:class:`MoCo`): ``encoder_q.*``, ``encoder_k.*``, ``key_queue.*``.
* ``end-to-end``  (:class:`EndToEnd`): ``encoder_q.*`` only.
* ``memory-bank`` (:class:`MemoryBank`): ``encoder_q.*``, ``memory.bank`` [num_samples, dim]
  and ``memory._extra_state`` (the negative sampler's RNG state, a uint8 tensor), so a
  resumed run draws the same negatives as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco.core.device import to_device
from moco.core.errors import ConfigError
from moco.core.loss import at_least_fp32, fp32, info_nce, moco_logits
from moco.core.method_base import PretrainingMethod, StepOutput
from moco.core.methods import MemoryNeed, build_method, register_method
from moco.core.model import embed
from moco.core.seeding import BANK_SAMPLING, QUEUE, stream_generator
from moco.core.shuffle_bn import KeyShuffle, NoShuffle

BANK_INITS = ("random", "uniform")


def end_to_end_logits(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """Logits [N, N] of the end-to-end mechanism, positive first (MoCo v1 Figure 2a).

    Row n: column 0 is q_n·k_n (its own key), columns 1..N-1 are q_n·k_j for j != n in
    increasing j (the other keys of the batch, K = N-1 negatives); all divided by ``t``.
    Same as a cross-entropy over ``q @ k.T`` with target = the diagonal, rearranged so that
    :func:`~moco.core.loss.info_nce` and :func:`~moco.core.loss.top1_accuracy` (target 0) apply.

    Args:
        q: queries [N, C], unit length.
        k: keys [N, C], unit length (with gradient in end-to-end).
        t: softmax temperature τ.
    """
    n = q.shape[0]
    with fp32(q.device.type):
        sim = at_least_fp32(q) @ at_least_fp32(k).T  # [N, N]
        pos = sim.diagonal().unsqueeze(1)  # [N, 1]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        neg = sim[off_diagonal].view(n, n - 1)  # row-major: row n keeps j != n in order
        return torch.cat([pos, neg], dim=1) / t


class EndToEnd(PretrainingMethod):
    """End-to-end mechanism (MoCo v1 §3.2 / Figure 2a).

    The keys are the current mini-batch's second views, encoded by the *query* encoder with
    gradients (one encoder, back-propagated through both views); each query's positive is
    its own key and its negatives are the other N-1 keys of the batch, so the dictionary
    size is tied to the batch (K = N-1). As in the paper, shuffling BN is used: with
    ``--shuffle-bn split`` the key batch is permuted around the encoder (and SplitBatchNorm
    normalises sub-batches), so a query and its key see BN statistics of different samples.

    Args:
        encoder_q: the encoder ([B,3,H,W] -> [B, dim]) used for both queries and keys.
        t: softmax temperature τ.
    """

    def __init__(self, encoder_q: nn.Module, t: float = 0.07) -> None:
        super().__init__()
        self.t = t
        self.encoder_q = encoder_q

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, shuffle: KeyShuffle | None = None,
                index: torch.Tensor | None = None) -> StepOutput:
        """One step on two views [N,3,H,W]; ``index`` is unused. Logits are [N, N]."""
        shuffle = shuffle if shuffle is not None else NoShuffle()
        if im_q.shape[0] < 2:
            raise ConfigError("end-to-end needs a batch of at least 2 (the negatives are the batch)")
        q = embed(self.encoder_q(im_q))
        x, handle = shuffle.shuffle(im_k)
        k = shuffle.unshuffle(embed(self.encoder_q(x)), handle)
        if q.requires_grad and not k.requires_grad:
            raise ConfigError(
                "end-to-end back-propagates through the keys, but this --shuffle-bn mode gathers "
                "them across processes without gradients; use --shuffle-bn split or none")
        logits = end_to_end_logits(q, k, self.t)
        return StepOutput(info_nce(logits), logits.detach())


class FeatureBank(nn.Module):
    """One unit-length feature per training sample, and the sampler of negatives.

    Buffers: ``bank`` [num_samples, dim] float32, row i = the stored feature of sample i.
    Extra state: the CPU ``torch.Generator`` that draws the negatives (saved in the state
    dict as ``_extra_state``, a uint8 tensor, so sampling resumes exactly).

    Initialisation (``init``):
        ``"random"`` (default): standard-normal rows normalised to unit length, the same
        rule as MoCo's initial queue (``moco/builder.py``), so every entry is on the unit
        sphere from step 0, like the entries written later.
        ``"uniform"``: InstDisc's ``lemniscate.pytorch`` rule, U(-a, a) with
        a = 1/sqrt(dim/3), i.e. E‖v‖² = 1 but rows not exactly unit length.
    Both are random directions with no information; "random" keeps the logits of
    never-visited entries on the same scale as the updated ones.
    """

    bank: torch.Tensor

    def __init__(self, num_samples: int, dim: int, init: str = "random",
                 generator: torch.Generator | None = None, seed: int = 0) -> None:
        super().__init__()
        if num_samples < 1 or dim < 1:
            raise ConfigError(f"memory bank needs num_samples >= 1 and dim >= 1, got {num_samples}, {dim}")
        if init == "random":
            bank = F.normalize(torch.randn(num_samples, dim, generator=generator), dim=1)
        elif init == "uniform":
            a = 1.0 / (dim / 3.0) ** 0.5
            bank = torch.rand(num_samples, dim, generator=generator) * (2 * a) - a
        else:
            raise ConfigError(f"bank init must be one of {BANK_INITS}, got {init!r}")
        self.register_buffer("bank", bank)
        self.sampler = stream_generator(seed)

    @property
    def num_samples(self) -> int:
        return self.bank.shape[0]

    def sample(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Indices of ``shape`` drawn uniformly with replacement from [0, num_samples), on the
        bank's device. A draw may hit the query's own sample (InstDisc allows it)."""
        idx = torch.randint(0, self.num_samples, shape, generator=self.sampler)
        return to_device(idx, self.bank.device)

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor, m: float) -> None:
        """v_i <- normalize(m·v_i + (1-m)·f) for each sample i of the batch (InstDisc Eq. 8).

        Args:
            index: sample indices [N] (long); only these rows change. With repeated indices
                the last write wins.
            features: the queries [N, C] of those samples (detached here).
            m: bank momentum (``--bank-momentum``; 0 = overwrite, InstDisc uses 0.5).
        """
        index = index.to(self.bank.device, torch.long)
        old = self.bank.index_select(0, index)
        new = m * old + (1.0 - m) * features.detach().to(self.bank.dtype)
        self.bank.index_copy_(0, index, F.normalize(new, dim=1))

    def get_extra_state(self) -> torch.Tensor:
        return self.sampler.get_state()

    def set_extra_state(self, state: Any) -> None:
        self.sampler.set_state(torch.as_tensor(state, dtype=torch.uint8).cpu())


class MemoryBank(PretrainingMethod):
    """Memory-bank mechanism, InstDisc style as MoCo describes it (MoCo v1 §3.2 / Figure 2b,
    §4.1), with the InfoNCE loss of the MoCo paper's re-implementation.

    Each step: q = normalize(f_q(im_q)) [N, C] (only the first view is used); the positive of
    query n is its own bank entry v_{index[n]}; K negatives are drawn uniformly (with
    replacement, no gradient) from the whole bank; logits [N, 1+K] positive first / τ;
    InfoNCE; then, after the loss and without gradient, the batch's entries are updated
    v <- normalize(m·v + (1-m)·q) with m = ``bank_momentum``. There is no key encoder and no
    shuffling BN (the positives come from earlier steps, MoCo v1 §3.3 / App. A.9).

    Negatives: by default the K indices are drawn once per step and shared by the batch (like
    MoCo's queue: memory O(K·C)). ``per_query=True`` draws K per query as InstDisc's code
    does (memory O(N·K·C)). A drawn negative can be the query's own sample (probability K/n
    per query for n samples); InstDisc allows this and so does this module: that entry then
    appears both as the positive and as one negative.

    Args:
        encoder_q: the query encoder ([B,3,H,W] -> [B, dim]).
        num_samples: training-set size (the bank has one row per sample; ``index`` values
            must lie in [0, num_samples)).
        dim: feature width C.
        k: negatives per query K (``--moco-k``).
        t: softmax temperature τ.
        bank_momentum: m of the entry update (``--bank-momentum``, 0.5 = InstDisc).
        per_query: draw K negatives per query instead of once per step.
        **bank: the :class:`FeatureBank`'s ``init`` (its initialisation), ``generator`` (for
            its initial values) and ``seed`` (of the negative sampler).
    """

    def __init__(self, encoder_q: nn.Module, num_samples: int, dim: int = 128, k: int = 4096,
                 t: float = 0.07, bank_momentum: float = 0.5, per_query: bool = False,
                 **bank: Any) -> None:
        super().__init__()
        if not 0 <= bank_momentum < 1:
            raise ConfigError(f"bank momentum must be in [0, 1), got {bank_momentum}")
        self.k = k
        self.t = t
        self.bank_momentum = bank_momentum
        self.per_query = per_query
        self.encoder_q = encoder_q
        self.memory = FeatureBank(num_samples, dim, **bank)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, shuffle: KeyShuffle | None = None,
                index: torch.Tensor | None = None) -> StepOutput:
        """One step. ``im_q`` [N,3,H,W] is encoded; ``im_k`` is unused; ``index`` [N] holds
        the samples' dataset indices. ``shuffle`` is not used to reorder anything (no
        shuffling BN); only its ``gather`` is used so that, across processes, every rank
        writes every rank's features into its bank. Logits are [N, 1+K]."""
        if index is None:
            raise ConfigError("the memory bank needs the samples' dataset indices (Batch.index)")
        shuffle = shuffle if shuffle is not None else NoShuffle()
        index = to_device(index, self.memory.bank.device).long()
        n = im_q.shape[0]
        q = embed(self.encoder_q(im_q))  # [N, C] float32
        with torch.no_grad():
            pos = self.memory.bank.index_select(0, index).to(q.dtype)  # [N, C]
            if self.per_query:
                neg_idx = self.memory.sample((n, self.k))  # [N, K]
                neg = self.memory.bank[neg_idx].to(q.dtype)  # [N, K, C]
        if self.per_query:
            with fp32(q.device.type):
                l_pos = torch.einsum("nc,nc->n", q, pos).unsqueeze(1)
                l_neg = torch.einsum("nc,nkc->nk", q, neg)
                logits = torch.cat([l_pos, l_neg], dim=1) / self.t
        else:
            with torch.no_grad():
                negatives = self.memory.bank[self.memory.sample((self.k,))].T  # [C, K]
            logits = moco_logits(q, pos, negatives, self.t)
        loss = info_nce(logits)
        self.memory.update(shuffle.gather(index), shuffle.gather(q.detach()), self.bank_momentum)
        return StepOutput(loss, logits.detach())


# ----- the registered methods ---------------------------------------------------------------

def _refuse_symmetric(name: str) -> Any:
    def check(settings: Any) -> None:
        if settings.symmetric:
            raise ConfigError(f"--symmetric is only defined for --mechanism moco, not {name}")
    return check


def _check_end_to_end(settings: Any) -> None:
    _refuse_symmetric("end-to-end")(settings)
    if settings.batch_size < 2:
        raise ConfigError("--mechanism end-to-end takes its negatives from the batch: "
                          f"--batch-size must be >= 2, got {settings.batch_size}")


@register_method(
    "end-to-end", title="end-to-end", check=_check_end_to_end,
    help="keys from the current batch through the query encoder, with gradients (K = batch - 1)",
    dictionary=lambda s, images: f"dictionary = the batch's other {s.batch_size - 1} keys",
    chance=lambda s, batch, world: math.log(batch))  # logits [N, N] of each process's batch
def build_end_to_end(settings: Any, encoder: nn.Module, num_samples: int | None = None) -> EndToEnd:
    """:class:`EndToEnd` around ``encoder`` (setting ``moco_t``)."""
    return EndToEnd(encoder, t=settings.moco_t)


def _bank_advice(settings: Any, images: int) -> list[str]:
    if settings.moco_k <= images:
        return []
    return [f"--moco-k {settings.moco_k} negatives are drawn from a bank of {images} images: "
            "each entry is drawn several times per step; use --moco-k "
            f"{images} or less, or more images"]


def _bank_memory(settings: Any, num_samples: int | None) -> list[MemoryNeed]:
    if not num_samples:
        return []
    return [(f"the memory bank ({num_samples} images x --moco-dim {settings.moco_dim})",
             num_samples * settings.moco_dim * 4, "lower --moco-dim")]


@register_method(
    "memory-bank", title="memory-bank", check=_refuse_symmetric("memory-bank"),
    help="InstDisc's bank of one feature per image, --moco-k negatives sampled from it",
    dictionary=lambda s, images: (f"K {s.moco_k} sampled from a bank of {images}, bank "
                                  f"momentum {s.bank_momentum}"),
    advise=_bank_advice, memory=_bank_memory,
    chance=lambda s, batch, world: math.log(s.moco_k + 1))  # logits [N, 1+K]
def build_memory_bank(settings: Any, encoder: nn.Module, num_samples: int | None = None) -> MemoryBank:
    """:class:`MemoryBank` around ``encoder`` with one entry per training image (settings
    ``moco_dim``, ``moco_k``, ``moco_t``, ``bank_momentum``, ``seed``)."""
    if not num_samples:
        raise ConfigError("--mechanism memory-bank needs the training-set size (num_samples)")
    return MemoryBank(encoder, num_samples, dim=settings.moco_dim, k=settings.moco_k,
                      t=settings.moco_t, bank_momentum=settings.bank_momentum,
                      generator=stream_generator(settings.seed, QUEUE),
                      seed=settings.seed + BANK_SAMPLING)


def build_mechanism(cfg: Any, encoder_q: nn.Module, num_samples: int | None = None) -> PretrainingMethod:
    """The registered method ``cfg.mechanism`` around ``encoder_q``
    (:func:`moco.core.methods.build_method`)."""
    return build_method(cfg.mechanism, cfg, encoder_q, num_samples)
