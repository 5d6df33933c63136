"""What a pretraining method is to the training loop: :class:`PretrainingMethod` (one step on
two views, what it trains, what it updates each step, what it saves, which encoder evaluation
uses) and :class:`StepOutput` (what one step returns). Methods are registered by name in
:mod:`moco.core.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moco.core.momentum import MomentumSchedule
from moco.core.shuffle_bn import KeyShuffle

#: The prefix of every key of a checkpoint's ``state_dict`` (``main_moco.py`` saves its
#: DataParallel / DDP module).
CHECKPOINT_PREFIX = "module."


@dataclass
class StepOutput:
    """What one step returns.

    Attributes:
        loss: the 0-d loss to back-propagate.
        logits: [N, C] scores of the first (or only) query/key pair, for the pretext
            accuracy (how often the positive has the largest score), detached; None when the
            method has no such classification.
        labels: [N] long, the column of each row's positive in ``logits``; None: column 0
            (MoCo's layout, positive first).
        metrics: further 0-d tensors to log (their epoch means go to ``metrics.jsonl`` and
            TensorBoard under their names); kept on the device, read at log points only.
    """

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def accuracy(self) -> torch.Tensor | None:
        """Pretext acc@1 in % as a 0-d float64 tensor on the logits' device (not read back),
        or None without logits."""
        if self.logits is None:
            return None
        target = (self.labels.to(self.logits.device) if self.labels is not None
                  else torch.zeros(self.logits.shape[0], dtype=torch.long,
                                   device=self.logits.device))
        return (self.logits.argmax(dim=1) == target).to(torch.float64).mean() * 100.0


class PretrainingMethod(nn.Module):
    """The base of a pretraining method: subclass it and implement :meth:`forward`.

    The loop calls, each step: :meth:`set_progress` (the EMA momentum of the step), then
    ``forward(im_q, im_k, shuffle, index)`` under autocast, back-propagates ``loss`` and
    steps the optimizer over :meth:`trainable_parameters`. Checkpoints hold
    :meth:`checkpoint_state`; the kNN monitor and the exports use
    :meth:`evaluation_encoder`.

    Class attributes a method may set:
        encoder_attr: the attribute holding the encoder evaluation uses (default
            ``encoder_q``, as MoCo's f_q).
        momentum_schedule: the EMA momentum m as a function of the training progress (in
            epochs, fractional) and the total epochs; None: nothing is EMA-updated. The
            method reads the current value from ``self.m``.
    """

    encoder_attr: str = "encoder_q"
    momentum_schedule: MomentumSchedule | None = None
    m: float = 0.0

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, shuffle: KeyShuffle | None = None,
                index: torch.Tensor | None = None) -> StepOutput:
        """One step on two views [N,3,H,W] of the same images. ``shuffle``: the run's key
        shuffle (Shuffling BN, MoCo v1 §3.3; its ``gather`` collects a tensor from every
        process); ``index``: the images' dataset indices [N]."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def evaluation_encoder(self) -> nn.Module:
        """The encoder whose features evaluation uses (head included; the kNN monitor strips
        it for ``--knn-features backbone``)."""
        module = getattr(self, self.encoder_attr)
        assert isinstance(module, nn.Module), f"{self.encoder_attr} is not a module"
        return module

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: by default one group of every parameter that
        requires a gradient, in registration order (MoCo: f_q's; f_k is frozen and moves by
        momentum only)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def set_progress(self, epochs: float, total_epochs: int) -> None:
        """Before each step: ``epochs`` = finished epochs + step / steps per epoch. Sets
        ``self.m`` from :attr:`momentum_schedule` (when there is one)."""
        if self.momentum_schedule is not None:
            self.m = self.momentum_schedule(epochs, total_epochs)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The state dict as a checkpoint stores it: every key under ``module.``, as
        ``main_moco.py`` saves its DDP module."""
        return {CHECKPOINT_PREFIX + k: v for k, v in self.state_dict().items()}

    def state_from_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's ``state_dict`` (with or without ``module.``) as this module's state
        dict keys (the inverse of :meth:`checkpoint_state`)."""
        n = len(CHECKPOINT_PREFIX)
        return {k[n:] if k.startswith(CHECKPOINT_PREFIX) else k: v for k, v in state.items()}
