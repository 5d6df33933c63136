"""Label-free health of a pretraining run: is the representation spread out or collapsed, is
the loss moving away from chance?

* :mod:`~moco.eval.health.signals`: the signals of embeddings [N, D] as pure functions
  (RankMe's effective rank, Wang & Isola's alignment and uniformity, SimSiam's std of
  normalised outputs) and the loss's chance level of each method;
* :mod:`~moco.eval.health.report`: :class:`HealthReport`, the signals of one encoder on one
  sample, and its metrics.jsonl record;
* :mod:`~moco.eval.health.sample`: :class:`HealthSample`, a fixed small sample of training
  images with fixed views, and :func:`encoder_health`, the report of an encoder on it;
* :mod:`~moco.eval.health.diagnose`: :func:`diagnose`, warnings for a collapsed or stuck run.

What each signal means and what to change when it goes wrong: docs/monitoring.md.
"""

from __future__ import annotations

from moco.eval.health.diagnose import Thresholds, diagnose
from moco.eval.health.report import RECORD_KEYS, HealthReport, report_of
from moco.eval.health.sample import HealthSample, default_sample_size, encoder_health
from moco.eval.health.signals import (
    alignment,
    chance_loss,
    chance_of_logits,
    effective_rank,
    normalized_std,
    uniformity,
)

__all__ = ["RECORD_KEYS", "HealthReport", "HealthSample", "Thresholds", "alignment",
           "chance_loss", "chance_of_logits", "default_sample_size", "diagnose",
           "effective_rank", "encoder_health", "normalized_std", "report_of", "uniformity"]
