"""Checkpoints built by hand in the layouts of the original code (REFERENCE.md §6.2, §7),
without going through ``moco``: torchvision encoders, the builder's head surgery, the DDP
``module.`` prefix, the queue buffers and an SGD state over f_q + f_k in one group."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def original_encoder(arch: str = "resnet18", dim: int = 128, mlp: bool = False,
                     cifar_stem: bool = False, seed: int = 0) -> nn.Module:
    """``models.<arch>(num_classes=dim)``, with ``fc`` -> Sequential(Linear(d,d), ReLU, fc)
    for ``--mlp`` (moco/builder.py); the demo's stem for ``cifar_stem``."""
    torch.manual_seed(seed)
    enc = getattr(torchvision.models, arch)(num_classes=dim)
    if mlp:
        d = enc.fc.weight.shape[1]
        enc.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), enc.fc)
    if cifar_stem:
        enc.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        enc.maxpool = nn.Identity()
    # Make BN statistics non-trivial so that exact-equality checks mean something.
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.9, 1.1)
            m.num_batches_tracked.fill_(7)
    return enc


def original_state_dict(encoder_q: nn.Module, k: int = 32, dim: int = 128,
                        with_encoder_k: bool = True) -> dict[str, torch.Tensor]:
    """The DDP-wrapped MoCo's state dict: ``module.queue``, ``module.queue_ptr``, then
    ``module.encoder_q.*`` and ``module.encoder_k.*`` (REFERENCE.md §7)."""
    state: dict[str, torch.Tensor] = {
        "module.queue": F.normalize(torch.randn(dim, k), dim=0),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    state.update({f"module.encoder_q.{n}": v.clone() for n, v in encoder_q.state_dict().items()})
    if with_encoder_k:
        enc_k = copy.deepcopy(encoder_q)
        state.update({f"module.encoder_k.{n}": v.clone() for n, v in enc_k.state_dict().items()})
    return state


def original_optimizer_state(encoder_q: nn.Module) -> dict[str, Any]:
    """``SGD(model.parameters())`` of the original after one step: one group listing f_q's
    then f_k's parameters, momentum buffers only for f_q."""
    enc_k = copy.deepcopy(encoder_q)
    for p in enc_k.parameters():
        p.requires_grad = False
    params = list(encoder_q.parameters()) + list(enc_k.parameters())
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)
    for p in encoder_q.parameters():
        p.grad = torch.full_like(p, 1e-3)
    saved = [p.detach().clone() for p in encoder_q.parameters()]
    opt.step()
    with torch.no_grad():  # keep the weights the state dict was taken from
        for p, s in zip(encoder_q.parameters(), saved, strict=True):
            p.copy_(s)
    return opt.state_dict()


def save_original_checkpoint(path: Path, arch: str = "resnet18", *, dim: int = 128, k: int = 32,
                             mlp: bool = False, cifar_stem: bool = False, epoch: int = 1,
                             with_optimizer: bool = True, with_arch: bool = True,
                             seed: int = 0) -> nn.Module:
    """Write a ``main_moco.py`` checkpoint; returns the query encoder it holds."""
    enc = original_encoder(arch, dim, mlp, cifar_stem, seed)
    ckpt: dict[str, Any] = {"epoch": epoch}
    if with_arch:
        ckpt["arch"] = arch
    ckpt["state_dict"] = original_state_dict(enc, k, dim)
    if with_optimizer:
        ckpt["optimizer"] = original_optimizer_state(enc)
    torch.save(ckpt, path)
    return enc


def demo_state_dict(encoder_q: nn.Module, k: int = 32, dim: int = 128) -> dict[str, torch.Tensor]:
    """The CIFAR notebook's ModelBase layout: ``encoder_q.net.N`` (no ``module.``),
    ``queue``, ``queue_ptr`` (REFERENCE.md §6.2). ``encoder_q`` must have the CIFAR stem."""
    names = {"conv1": "0", "bn1": "1", "layer1": "3", "layer2": "4", "layer3": "5",
             "layer4": "6", "fc": "9"}
    out: dict[str, torch.Tensor] = {}
    for enc in ("encoder_q", "encoder_k"):
        for n, v in encoder_q.state_dict().items():
            head, rest = n.split(".", 1)
            out[f"{enc}.net.{names[head]}.{rest}"] = v.clone()
    out["queue"] = F.normalize(torch.randn(dim, k), dim=0)
    out["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return out


def original_lincls_load(state_dict: dict[str, torch.Tensor], arch: str) -> tuple[nn.Module, Any]:
    """``main_lincls.py``'s loading logic, verbatim (REFERENCE.md §8.2)."""
    model = getattr(torchvision.models, arch)()
    state_dict = dict(state_dict)
    for k in list(state_dict.keys()):
        # retain only encoder_q up to before the embedding layer
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            # remove prefix
            state_dict[k[len("module.encoder_q."):]] = state_dict[k]
        # delete renamed or unused k
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    return model, msg


def original_convert_to_detectron2(obj: dict[str, Any]) -> dict[str, Any]:
    """``detection/convert-pretrain-to-detectron2.py``, verbatim (REFERENCE.md §9.1)."""
    obj = obj["state_dict"]
    newmodel = {}
    for k, v in obj.items():
        if not k.startswith("module.encoder_q."):
            continue
        old_k = k
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        del old_k
        newmodel[k] = v.numpy()
    return {"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}
