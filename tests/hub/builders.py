"""Hand-built files in the layouts of the authors' releases, small enough for tests, and
registry entries pointed at them on the local server.

* v1/v2: ``main_moco.py``'s checkpoint (``state_dict`` with ``module.encoder_q.*``, v1 ``fc``
  or v2 MLP head, ``module.encoder_k.*``, the queue; ``tests/helpers.py`` builds it);
* v3: MoCo v3's ``main_moco.py`` checkpoint, written here from the facts of its layout
  (MoCo v3 §3 and the released ``CONFIG.md``): ``state_dict`` with ``module.base_encoder.*``
  (a torchvision ResNet whose ``fc`` is the 2-layer projector, or a timm ViT whose ``head``
  is the 3-layer projector), ``module.momentum_encoder.*`` (same names), ``module.predictor.*``;
  every Linear without bias, BN1d + ReLU between layers, a last BN1d without affine
  parameters on the projector; plus ``epoch``, ``arch``, ``optimizer`` and ``scaler``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from helpers import LocalServer, original_encoder, original_optimizer_state, original_state_dict
from torch import nn

from moco.hub.registry import ReleasedWeights

HIDDEN, OUT = 64, 16  # the projector's widths (4096 and 256 in the releases)
V3_ARCH = {"vit_small_patch16_224": "vit_small", "vit_base_patch16_224": "vit_base"}
TINY_VIT = {"depth": 1, "img_size": 32}  # the ViT's width and heads stay the release's


def v3_mlp(layers: int, d_in: int, last_bn: bool) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(d_in if i == 0 else HIDDEN, OUT if last else HIDDEN, bias=False))
        if not last:
            mods += [nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(OUT, affine=False))
    return nn.Sequential(*mods)


def _nontrivial(model: nn.Module) -> None:
    """Random BN statistics and position embedding, so that equality checks mean something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
        if hasattr(model, "pos_embed"):
            model.pos_embed.normal_(0, 0.02)


def v3_backbone(arch: str, timm_args: dict[str, Any], seed: int = 0) -> nn.Module:
    """The base encoder's backbone with its projector as ``fc`` (ResNet) or ``head`` (ViT)."""
    torch.manual_seed(seed)
    if arch.startswith("vit_"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **timm_args)
        model.head = v3_mlp(3, model.num_features, True)
    else:
        model = getattr(torchvision.models, arch)(zero_init_residual=True)
        model.fc = v3_mlp(2, model.fc.in_features, True)
    _nontrivial(model)
    return model.eval()


def save_v3_checkpoint(path: Path, arch: str, timm_args: dict[str, Any] | None = None,
                       epoch: int = 300, seed: int = 0) -> nn.Module:
    """Write a MoCo v3 checkpoint; returns the base encoder (projector included)."""
    base = v3_backbone(arch, timm_args or {}, seed)
    momentum = copy.deepcopy(base)
    predictor = v3_mlp(2, OUT, not arch.startswith("resnet"))
    state: dict[str, torch.Tensor] = {}
    for prefix, m in (("base_encoder", base), ("momentum_encoder", momentum),
                      ("predictor", predictor)):
        state.update({f"module.{prefix}.{k}": v.clone() for k, v in m.state_dict().items()})
    opt = torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9)
    ckpt = {"epoch": epoch, "arch": V3_ARCH.get(arch, arch), "state_dict": state,
            "optimizer": opt.state_dict(),
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                       "growth_interval": 2000, "_growth_tracker": 0}}
    torch.save(ckpt, path)
    return base


def save_v1v2_checkpoint(path: Path, arch: str, mlp: bool, seed: int = 0,
                         with_optimizer: bool = False) -> nn.Module:
    """Write a ``main_moco.py`` checkpoint; returns the query encoder (head included)."""
    enc = original_encoder(arch, 128, mlp, seed=seed)
    ckpt: dict[str, Any] = {"epoch": 200, "arch": arch, "state_dict": original_state_dict(enc)}
    if with_optimizer:
        ckpt["optimizer"] = original_optimizer_state(enc)
    torch.save(ckpt, path)
    return enc


def features_of(encoder: nn.Module) -> nn.Module:
    """The reference backbone: ``encoder`` with its head replaced by the identity."""
    ref = copy.deepcopy(encoder)
    if hasattr(ref, "head") and not hasattr(ref, "fc"):
        ref.head = nn.Identity()
    else:
        ref.fc = nn.Identity()
    return ref.eval()


def release_kind(entry: ReleasedWeights) -> str:
    """Which hand-built file stands for ``entry``: v1, v2, v3-resnet or v3-<timm name>."""
    if entry.layout == "v1v2":
        return "v1" if entry.method == "MoCo v1" else "v2"
    return f"v3-{entry.arch}" if entry.family == "timm" else "v3-resnet"


def build_release(kind: str, folder: Path, seed: int = 0) -> tuple[Path, nn.Module, dict[str, Any]]:
    """The file of ``kind`` (see :func:`release_kind`): (path, reference backbone, the entry
    fields that describe it: a resnet18 for the ResNet-50s, a one-block 32 px ViT of the
    release's width and heads)."""
    path = folder / f"{kind}.pth.tar"
    if kind in ("v1", "v2"):
        enc = save_v1v2_checkpoint(path, "resnet18", mlp=kind == "v2", seed=seed,
                                   with_optimizer=kind == "v1")
        fields: dict[str, Any] = {"arch": "resnet18"}
    elif kind == "v3-resnet":
        enc = save_v3_checkpoint(path, "resnet18", seed=seed)
        fields = {"arch": "resnet18"}
    else:
        arch = kind[len("v3-"):]
        args = {**({"num_heads": 12} if arch == "vit_small_patch16_224" else {}), **TINY_VIT}
        enc = save_v3_checkpoint(path, arch, args, seed=seed)
        fields = {"arch": arch, "timm_args": args, "image_size": 32}
    return path, features_of(enc), fields


def serve_entry(entry: ReleasedWeights, server: LocalServer,
                built: tuple[Path, nn.Module, dict[str, Any]]) -> ReleasedWeights:
    """``entry`` pointed at the built file served at the entry's own path on ``server``, its
    checksum that of the file (the whole md5 for v1/v2, sha256 for v3)."""
    path, _, fields = built
    data = path.read_bytes()
    url_path = "/" + entry.url.split("://", 1)[1].split("/", 1)[1]
    server.served.files[url_path] = data
    sums = ({"md5": hashlib.md5(data).hexdigest(), "sha256": None} if entry.md5 else
            {"sha256": hashlib.sha256(data).hexdigest(), "md5": None})
    return dataclasses.replace(entry, url=server.url(url_path), **fields, **sums)
