"""The pieces of ``main_lincls.py``'s protocol (MoCo v1 §4.1, MoCo v3 §4): the frozen model
and its fresh classifier (in the backbone's head slot: ``fc`` for ResNets, ``head`` for ViTs,
see :func:`moco.core.backbones.head_name`), the optimizer, the train augmentation, the sanity
check and top-k accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T

from moco.core.backbones import head_name, set_head
from moco.core.errors import SanityCheckError
from moco.core.seeding import stream_generator
from moco.eval.architectures import build_network
from moco.eval.pretrained import PretrainedInfo, read_encoder
from moco.utils.checkpoint import CheckpointError
from moco.utils.runtime import native_bf16_here, resolve_precision


def train_transform(image_size: int, mean: Iterable[float], std: Iterable[float]) -> T.Compose:
    """``main_lincls.py``'s train augmentation: RandomResizedCrop (default scale 0.08-1) and a
    horizontal flip."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean=list(mean), std=list(std))])


def build_linear_model(info: PretrainedInfo, backbone: dict[str, torch.Tensor], num_classes: int,
                       seed: int = 0) -> nn.Module:
    """The frozen network with a fresh classifier in its head slot, set up as ``main_lincls.py``
    does.

    Returns the backbone network ([B,3,H,W] -> logits [B, num_classes]) whose only trainable
    tensors are the classifier's ``weight`` ~ N(0, 0.01) and ``bias`` = 0 (``fc.*`` for a
    ResNet, ``head.*`` for a ViT); ``backbone`` (the pretrained encoder without its head) is
    loaded with exactly those two tensors missing.
    """
    model = build_network(info.network(), info.cifar_stem)
    classifier = nn.Linear(info.backbone_dim, num_classes)
    set_head(model, classifier)
    names = {f"{head_name(model)}.weight", f"{head_name(model)}.bias"}
    for name, p in model.named_parameters():
        if name not in names:
            p.requires_grad = False
    g = stream_generator(seed)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=g) * 0.01)
        classifier.bias.zero_()
    msg = model.load_state_dict(backbone, strict=False)
    if set(msg.missing_keys) != names or msg.unexpected_keys:
        raise CheckpointError(f"the pretrained weights do not fit {info.arch}: missing "
                              f"{msg.missing_keys[:4]}, unexpected {msg.unexpected_keys[:4]}")
    return model


def linear_optimizer(model: nn.Module, lr: float, momentum: float, wd: float) -> torch.optim.SGD:
    """SGD over the parameters that require grad: exactly the classifier's weight and bias."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != 2:
        raise RuntimeError(f"expected 2 trainable tensors (the classifier's weight and bias), "
                           f"found {len(params)}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


def set_frozen_mode(model: nn.Module) -> None:
    """The whole model in ``eval()``: BN uses and keeps the pretrained statistics (§8.3)."""
    model.eval()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The frozen backbone's autocast dtype, None for fp32 (the classifier, its loss and update
    are always fp32). ``auto``: bf16 on a GPU with bf16 units, as pretraining decides it
    (:mod:`moco.utils.runtime`), else fp32: never fp16 for the frozen features."""
    if precision == "auto":
        return resolve_precision("auto", device) if native_bf16_here(device) else None
    return resolve_precision(precision, device)


def sanity_check(state_dict: dict[str, torch.Tensor], pretrained: str | Path) -> None:
    """``main_lincls.py``'s ``sanity_check``.

    Reloads ``pretrained`` and checks that every tensor of ``state_dict`` except the
    classifier's (the pretrained encoder's head slot: ``fc.*`` for a ResNet, ``head.*`` for a
    ViT) equals the pretrained encoder's tensor of the same name, exactly (BN running
    statistics and ``num_batches_tracked`` included). Raises :class:`SanityCheckError` naming
    the tensors that changed.
    """
    pre = read_encoder(pretrained)
    changed: list[str] = []
    for k, v in state_dict.items():
        name = k[len("module."):] if k.startswith("module.") else k
        if pre.is_head(name):
            continue
        ref = pre.state.get(name)
        if ref is None or ref.shape != v.shape or not torch.equal(v.detach().cpu(), ref):
            changed.append(name)
    if changed:
        raise SanityCheckError(
            f"{len(changed)} backbone tensor(s) differ from the pretrained checkpoint {pretrained}"
            f" (e.g. {', '.join(changed[:5])}): the backbone must stay frozen and in eval mode "
            "during linear classification")


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of rows whose target is among the top-k logits, for each k (k capped at the
    number of classes). logits [B, C], target [B]."""
    if logits.shape[0] == 0:
        return [0 for _ in ks]
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == target[:, None]
    return [int(hit[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


#: A linear classifier whose epoch loss is this many times the chance level ln(C) is diverging
#: (its loss starts at ln(C) from the N(0, 0.01) init and falls while it learns).
DIVERGING_FACTOR = 3.0


def divergence_warning(loss: float, num_classes: int, lr: float, fast: bool) -> str | None:
    """What to say when the linear classifier's epoch ``loss`` shows it diverging: far above
    the chance level ln(``num_classes``), where it starts. ``main_lincls.py``'s lr 30 is tuned
    for ImageNet's pooled ResNet-50 features; on small data or other features it can blow the
    logits up long before the loss becomes infinite."""
    chance = math.log(max(num_classes, 2))
    if not math.isfinite(loss) or loss <= DIVERGING_FACTOR * chance:
        return None
    recipe = " (main_lincls.py's, tuned for ImageNet)" if lr == 30 else ""
    fast_hint = "" if fast else "; --fast tries a value in seconds"
    return (f"the linear classifier's loss is {loss:.4g}, {loss / chance:.0f}x its chance "
            f"level ln({num_classes}) = {chance:.2f}: it is diverging at --lr {lr:g}{recipe}; "
            f"lower --lr (e.g. {lr / 30:.2g}) and raise it while the loss falls{fast_hint}")
