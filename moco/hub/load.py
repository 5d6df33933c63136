"""The authors' released weights in one line: :func:`load_pretrained`.

The file is downloaded once into ``$MOCO_CACHE/weights`` (else ``~/.cache/moco/weights``)
by :func:`moco.utils.download.download` (resumable, checked against the published md5
prefix where there is one, atomic), read without executing code, and loaded strictly into
the network (a torchvision ResNet-50, or a timm ViT for MoCo v3's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco.hub.networks import ModelInfo, build_network, feature_width, finish, load_strict
from moco.hub.registry import ReleasedWeights, get_weights
from moco.hub.v3 import read_v3_backbone
from moco.utils.download import download, user_cache_dir, verify_file

_log = logging.getLogger(__name__)


def weights_path(entry: ReleasedWeights) -> Path:
    """Where the file of ``entry`` is kept: ``<cache>/weights/<file name>``."""
    return user_cache_dir("weights") / entry.filename


def offline_hint(entry: ReleasedWeights) -> str:
    return (f"get {entry.filename} on a machine with internet and pass it: moco zoo download "
            f"{entry.name} --from FILE (Python: load_pretrained({entry.name!r}, file=FILE)), or "
            "set MOCO_MIRROR to a folder or URL that holds it")


def fetch_weights(entry: ReleasedWeights | str, *, file: str | Path | None = None,
                  mirror: str | None = None, progress: bool | None = None) -> Path:
    """The verified local file of ``entry``: ``file`` when given (checked, used in place),
    else the cached copy, downloaded first when missing."""
    if isinstance(entry, str):
        entry = get_weights(entry)
    if file is not None:
        return verify_file(file, sha256=entry.sha256, md5=entry.md5)
    return download(entry.url, weights_path(entry), sha256=entry.sha256, md5=entry.md5,
                    mirror=mirror, progress=progress, hint=offline_hint(entry))


def released_info(entry: ReleasedWeights, feature_dim: int) -> ModelInfo:
    return ModelInfo(family=entry.family, arch=entry.arch, feature_dim=feature_dim,
                     method=entry.method, model_args=dict(entry.timm_args),
                     image_size=entry.image_size, mean=entry.mean, std=entry.std,
                     epochs=entry.epochs, source=entry.name, released=entry)


def read_released(entry: ReleasedWeights, path: Path) -> tuple[nn.Module, ModelInfo]:
    """The backbone (no head, eval mode) in the file ``path`` of ``entry``'s layout."""
    if entry.layout == "v1v2":
        from moco.eval.encoders import load_backbone

        model, pinfo = load_backbone(path, arch=entry.arch)
        return model, released_info(entry, pinfo.backbone_dim)
    state = read_v3_backbone(path).state
    probe = released_info(entry, 0)
    model = load_strict(build_network(probe), state, path, f"{entry.arch} ({entry.name})")
    return model, released_info(entry, feature_width(model, entry.family, entry.arch))


def load_pretrained(name: str, num_classes: int | None = None, *,
                    device: str | torch.device = "cpu", file: str | Path | None = None,
                    mirror: str | None = None, progress: bool | None = None) -> nn.Module:
    """The authors' released backbone ``name`` (``moco zoo list``), ready to use.

    Returns the network in eval mode on ``device``: images [B,3,224,224] (preprocessed with
    ``model.transform``: resize 256, center-crop 224, ImageNet mean/std) -> features [B, D]
    (D = 2048 for ResNet-50, 384 for ViT-S, 768 for ViT-B), or logits [B, num_classes]
    with a fresh Linear head (N(0, 0.01), as ``main_lincls.py``) when ``num_classes`` is
    given. ``model.moco_info`` tells what it is (its ``released`` entry: URL, the authors'
    top-1). ``file``: a local copy of the release instead of the download; ``mirror``: a
    base URL or folder holding the file (else ``$MOCO_MIRROR``).

    Example::

        model = moco.load_pretrained("mocov2_r50_800ep")
        feats = model(model.transform(img).unsqueeze(0))  # [1, 2048]
    """
    entry = get_weights(name)
    path = fetch_weights(entry, file=file, mirror=mirror, progress=progress)
    model, info = read_released(entry, path)
    _log.info(f"{entry.name}: {entry.method} {entry.arch}, {entry.epochs} epochs, the authors' "
              f"linear top-1 {entry.top1}% (from {path})")
    return finish(model, info, num_classes, device)


def random_init(name: str, num_classes: int | None = None, *,
                device: str | torch.device = "cpu") -> nn.Module:
    """The network of the release ``name`` at random initialisation (no download), with the
    same head, preprocessing and ``moco_info`` as :func:`load_pretrained`."""
    entry = get_weights(name)
    model = build_network(released_info(entry, 0))
    return finish(model, released_info(entry, feature_width(model, entry.family, entry.arch)),
                  num_classes, device)


def hub_entry(name: str) -> Callable[..., nn.Module]:
    """The ``torch.hub`` entry point of the release ``name`` (``hubconf.py``): a plain
    function ``name(pretrained=True, num_classes=None, **kwargs)``."""
    entry = get_weights(name)

    def load(pretrained: bool = True, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
        if pretrained:
            return load_pretrained(name, num_classes, **kwargs)
        return random_init(name, num_classes, device=kwargs.get("device", "cpu"))

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (
        f"{entry.method} {entry.arch}, {entry.epochs} pretraining epochs on ImageNet-1k: the "
        f"authors' released backbone (linear top-1 {entry.top1}%, {entry.top1_source}; "
        f"{entry.note}). Returns images [B,3,224,224] -> features [B, D] (model.transform: "
        "the preprocessing); num_classes: a fresh Linear head; pretrained=False: the same "
        "network at random initialisation. Keyword arguments of moco.load_pretrained: device, "
        "file (a local copy), mirror, progress.")
    return load


def hub_entries() -> dict[str, Callable[..., nn.Module]]:
    """Every release's ``torch.hub`` entry point, by name."""
    from moco.hub.registry import REGISTRY

    return {name: hub_entry(name) for name in REGISTRY}
