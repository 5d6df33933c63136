"""The features that enter an encoder's head, read off its forward pass without changing it.

A MoCo step calls ``encoder_q`` on the query views; its head (``fc``, the v2 MLP, a v3
projector) turns the pooled backbone features [B, D] into the embedding. The health report
wants both from one forward, and the online probe wants the backbone features of the
training forward (as solo-learn's and lightly's online classifiers): :class:`HeadInputTap`
records the head's input, detached, through a forward pre-hook that returns nothing (the
forward pass, its gradients and its result are those without the tap).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moco.core.backbones import get_head


class HeadInputTap:
    """Records the input [B, D] of ``encoder``'s head (:func:`moco.core.backbones.get_head`:
    ``fc``, ``head``, ``classifier`` or a declared ``moco_head``), detached.

    It keeps the **first** forward after construction or after the last :meth:`take`: every
    mechanism encodes the queries (``im_q``, in batch order) first in a step; later calls of
    the same encoder in that step (end-to-end's keys, symmetric MoCo's second view) are
    ignored. With ``training_only``, forwards in eval mode (the kNN monitor's, the health
    report's) are ignored too: only training forwards are recorded. Use as a context manager
    or call :meth:`close` to remove the hook.

    Register it after any deep copy of the encoder is made (``MoCo`` copies f_q into f_k):
    a copy carries its own copy of the hook.

    Raises :class:`~moco.core.errors.ConfigError` when the encoder has no recognisable head.
    """

    def __init__(self, encoder: nn.Module, training_only: bool = False) -> None:
        head = get_head(encoder)
        self.training_only = training_only
        self._features: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.training_only and not module.training:
            return
        if self._features is None and args and isinstance(args[0], torch.Tensor):
            self._features = args[0].detach()

    def take(self) -> torch.Tensor | None:
        """The recorded features (None if the encoder has not run since the last take), and
        arm the tap for the next forward."""
        f, self._features = self._features, None
        return f

    def close(self) -> None:
        self._handle.remove()
        self._features = None

    def __enter__(self) -> HeadInputTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeadInputs:
    """Collects the input of **every** forward of ``encoder``'s head (eval mode included),
    detached, as float32 rows [B, D] in call order: the backbone features of a pass whose
    output is the head's (the kNN monitor's queries with ``--knn-features head``), without a
    second pass. :meth:`close` removes the hook.

    Raises :class:`~moco.core.errors.ConfigError` when the encoder has no recognisable head.
    """

    def __init__(self, encoder: nn.Module) -> None:
        self._rows: list[torch.Tensor] = []
        self._handle = get_head(encoder).register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self._rows.append(args[0].detach().float().flatten(1))

    def features(self) -> torch.Tensor | None:
        """The rows collected so far [N, D] (None: the head has not run)."""
        return torch.cat(self._rows) if self._rows else None

    def close(self) -> None:
        self._handle.remove()
