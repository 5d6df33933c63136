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
) -> float:
    """The lr for the 0-based ``epoch``.

    Step:   base · 0.1^(#milestones ≤ epoch).
    Cosine: base · ½(1 + cos(π·epoch/epochs)) (``main_moco.py``: the last epoch is not 0).
    """
    if cos:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr * 0.1 ** sum(1 for m in milestones if epoch >= m)


def warmup_factor(epoch: int, step: int, steps: int, warmup_epochs: int) -> float:
    """The optional linear warmup (not in the papers; Goyal et al. 2017's gradual warmup), set per
    step: the schedule's lr times (steps done + 1) / (warmup steps) over the first
    ``warmup_epochs`` epochs of ``steps`` steps each, 1 afterwards. Per step, so that one warmup
    epoch already ramps (a per-epoch ramp of one epoch would be no warmup at all)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return 1.0
    return (epoch * steps + step + 1) / (warmup_epochs * max(steps, 1))
