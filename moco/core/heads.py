"""Projection heads: v1 linear fc, v2 MLP (MoCo v2 §2; ``moco/builder.py``) and the MLPs of
MoCo v3 (projector and predictor, MoCo v3 §5)."""

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


def build_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's projector and predictor MLPs (MoCo v3 §5, "MLP heads"): input
    [B, in_dim] -> [B, out_dim].

    ``num_layers`` Linear layers, none with a bias (the BatchNorm after each makes one
    redundant): in_dim -> hidden -> ... -> hidden -> out_dim. Between two layers BatchNorm1d
    and ReLU; after the last one, when ``last_bn``, a BatchNorm1d without affine parameters.
    The layers are numbered as ``moco/builder.py``'s ``_build_mlp`` numbers them, so the
    authors' checkpoint keys (``fc.0.weight``, ``fc.1.running_mean``, ..., ``head.6.weight``)
    load unchanged: 2 layers are ``0`` Linear, ``1`` BN, ``2`` ReLU, ``3`` Linear, ``4`` BN.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got num_layers={num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
