"""Learning-rate schedules, set once per epoch as the original (``main_moco.py``'s
``adjust_learning_rate``; the CIFAR-10 notebook's cosine is 1-based)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def learning_rate(
    base_lr: float,
    epoch: int,
    epochs: int,
    *,
    cos: bool,
    milestones: Sequence[int] = (),
    warmup_epochs: int = 0,
) -> float:
    """The lr for the 0-based ``epoch``.

    Step:   base · 0.1^(#milestones ≤ epoch).
    Cosine: base · ½(1 + cos(π·epoch/epochs)) (``main_moco.py``: the last epoch is not 0).
    Warmup: optional, linear from base/warmup to base over the first ``warmup_epochs``.
    """
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    if cos:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr * 0.1 ** sum(1 for m in milestones if epoch >= m)
