"""Projection heads: v1 linear fc and v2 MLP (MoCo v2 §2; ``moco/builder.py``)."""

from __future__ import annotations

from torch import nn


def linear_head(feature_dim: int, dim: int) -> nn.Linear:
    """MoCo v1: ``fc`` = Linear(D -> dim), the backbone's own classifier resized."""
    return nn.Linear(feature_dim, dim)


def mlp_head(feature_dim: int, dim: int) -> nn.Sequential:
    """MoCo v2: Linear(D -> D), ReLU, Linear(D -> dim); hidden width D, no BN.

    State-dict keys ``fc.0.*`` and ``fc.2.*`` as the original.
    """
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, dim))
