"""The health signals of one encoder on one sample, as a record of ``metrics.jsonl``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moco.eval.health.signals import alignment, effective_rank, normalized_std, uniformity

#: The metrics.jsonl keys of a report (:meth:`HealthReport.to_record`; plus ``loss_chance``
#: when the chance level is known).
RECORD_KEYS = ("health_rank", "health_rank_features", "health_std", "health_std_ratio",
               "health_alignment", "health_uniformity", "health_images", "health_dim",
               "health_feature_dim")


@dataclass
class HealthReport:
    """The signals of one encoder on one sample of ``images`` images (two views each).

    ``rank``, ``std``, ``uniformity``: of the embeddings (the encoder's output, dimension
    ``dim``; the first view's); ``alignment``: between the two views' embeddings;
    ``rank_features``: RankMe of the features that enter the head (dimension
    ``feature_dim``; None when the encoder's head cannot be told apart). ``loss`` and
    ``chance``: the training loss and its chance level, when the caller knows them."""

    images: int
    dim: int
    rank: float
    std: float
    alignment: float
    uniformity: float
    feature_dim: int | None = None
    rank_features: float | None = None
    loss: float | None = None
    chance: float | None = None

    @property
    def std_ratio(self) -> float:
        """``std * sqrt(dim)``: about 1 when spread over the sphere, 0 when collapsed."""
        return self.std * math.sqrt(self.dim)

    def to_record(self) -> dict[str, Any]:
        """The values under their metrics.jsonl keys (:data:`RECORD_KEYS`, and
        ``loss_chance`` when known)."""
        rec: dict[str, Any] = {
            "health_rank": self.rank, "health_rank_features": self.rank_features,
            "health_std": self.std, "health_std_ratio": self.std_ratio,
            "health_alignment": self.alignment, "health_uniformity": self.uniformity,
            "health_images": self.images, "health_dim": self.dim,
            "health_feature_dim": self.feature_dim,
        }
        if self.chance is not None:
            rec["loss_chance"] = self.chance
        return rec

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> HealthReport | None:
        """The report stored in a metrics.jsonl record by :meth:`to_record` (None when the
        record has none); ``loss`` comes from the record's ``loss``."""
        if record.get("health_rank") is None:
            return None
        return cls(images=int(record.get("health_images") or 0),
                   dim=int(record.get("health_dim") or 1), rank=float(record["health_rank"]),
                   std=float(record["health_std"]), alignment=float(record["health_alignment"]),
                   uniformity=float(record["health_uniformity"]),
                   feature_dim=record.get("health_feature_dim"),
                   rank_features=record.get("health_rank_features"),
                   loss=record.get("loss"), chance=record.get("loss_chance"))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "std_ratio": self.std_ratio}

    def describe(self) -> str:
        """One line for the log."""
        feats = (f", features {self.rank_features:.1f} of {self.feature_dim}"
                 if self.rank_features is not None else "")
        return (f"health on {self.images} images: effective rank {self.rank:.1f} of "
                f"{self.dim}{feats}; std x sqrt(d) {self.std_ratio:.2f} (1 = spread, 0 = "
                f"collapsed); alignment {self.alignment:.3f}; uniformity {self.uniformity:.2f}")


def report_of(z1: torch.Tensor, z2: torch.Tensor, features: torch.Tensor | None = None, *,
              loss: float | None = None, chance: float | None = None) -> HealthReport:
    """The report of two views' embeddings ``z1``, ``z2`` [N, D] (row i: image i) and,
    optionally, the head's input features [N, F] of the first view."""
    return HealthReport(
        images=int(z1.shape[0]), dim=int(z1.shape[1]), rank=effective_rank(z1),
        std=normalized_std(z1), alignment=alignment(z1, z2), uniformity=uniformity(z1),
        feature_dim=int(features.shape[1]) if features is not None else None,
        rank_features=effective_rank(features) if features is not None else None,
        loss=loss, chance=chance)
