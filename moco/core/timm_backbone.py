"""Any timm model as a MoCo backbone: ``-a timm:NAME`` (the ``timm`` extra).

timm models name their classifier differently (``fc``, ``classifier``, ``head.fc``), and some
have layers between the pooling and the classifier (MobileNetV3's ``conv_head``). MoCo needs a
network whose last layer is a Linear named ``fc`` (it replaces it by its projection head), so
:class:`TimmBackbone` holds the timm model built with ``num_classes=0`` (its forward returns
the pooled pre-logits features [B, D]) as ``body`` and adds ``fc``. Checkpoint keys are then
``encoder_q.body.<timm name>`` and ``encoder_q.fc.*``; :func:`timm_state_dict` turns the
backbone back into timm's own names for ``moco export --format timm``.

MoCo v1/v2's Shuffling BN needs BatchNorm: there a model without any (ViT, ConvNeXt:
LayerNorm) is refused. MoCo v3 has no Shuffling BN and takes any model, ViTs included
(``require_batchnorm=False``); a timm ViT built with ``num_classes=0`` returns its pooled
[CLS] features after the final norm.
timm's ``BatchNormAct2d`` (BN + activation in one module, used by EfficientNet, MobileNet,
RegNet, ...) subclasses ``nn.BatchNorm2d``; :func:`moco.core.shuffle_bn.convert_split_bn` keeps its
activation (see there), and :func:`convert_sync_batchnorm` uses timm's converter, which keeps
it too (torch's would drop it).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from moco.core.errors import ConfigError
from moco.core.seeding import seeded

PREFIX = "timm:"
INSTALL_HINT = "pip install 'momentum-contrast[timm]' (the timm extra; or pip install timm)"


def is_timm_arch(arch: str) -> bool:
    return arch.startswith(PREFIX)


def timm_name(arch: str) -> str:
    """``timm:resnet26d`` -> ``resnet26d``."""
    return arch[len(PREFIX):] if is_timm_arch(arch) else arch


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"-a timm:NAME needs the timm package, which is not installed: "
                          f"{INSTALL_HINT}") from None
    return timm


def has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def check_timm_name(name: str) -> None:
    """Raise :class:`ConfigError` (a ValueError) unless timm knows the model ``name``."""
    timm = _timm()
    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:8] if name else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"timm has no model named {name!r}{hint}; list them with "
                          "python -c \"import timm; print(timm.list_models('*resnet*'))\"")


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``: random weights, no download."""
    check_timm_name(name)
    model: nn.Module = _timm().create_model(name, pretrained=False, **kwargs)
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def pooled_width(body: nn.Module) -> int:
    """Width D of what a timm model built with ``num_classes=0`` returns: ``head_hidden_size``
    (after MobileNetV3's ``conv_head``, for instance) when the model has one, else
    ``num_features``."""
    width = getattr(body, "head_hidden_size", None) or getattr(body, "num_features", None)
    if not isinstance(width, int):
        raise ConfigError(f"{type(body).__name__} does not say its feature width "
                          "(no num_features): not a timm classification model")
    return width


class TimmBackbone(nn.Module):
    """A timm model without its classifier (``body``: [B,3,H,W] -> pooled [B, D]) followed by
    ``fc`` ([B, D] -> [B, num_classes]), so that MoCo can replace ``fc`` by its head."""

    def __init__(self, name: str, num_classes: int = 1000, *, require_batchnorm: bool = True,
                 image_size: int | None = None) -> None:
        super().__init__()
        self.timm_name = name
        self.body = create_timm_model(name, num_classes=0)
        if require_batchnorm and not has_batchnorm(self.body):
            raise ConfigError(f"timm:{name} has no BatchNorm layer (it normalises with LayerNorm or "
                              "GroupNorm): MoCo v1/v2's shuffling BN needs a CNN with BatchNorm, "
                              "e.g. timm:resnet26d, timm:efficientnet_b0, timm:regnety_016 (MoCo "
                              "v3 takes any model)")
        built = _vit_image_size(self.body)
        if image_size is not None and built is not None and built != (image_size, image_size):
            self.body = create_timm_model(name, num_classes=0, img_size=image_size)
        self.fc = nn.Linear(pooled_width(self.body), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.body(x))
        return out


def _vit_image_size(body: nn.Module) -> tuple[int, int] | None:
    """The input size (h, w) a timm ViT was built for (its patch grid fixes it); None for a
    CNN, which takes any size."""
    size = getattr(getattr(body, "patch_embed", None), "img_size", None)
    return (int(size[0]), int(size[1])) if isinstance(size, tuple | list) else None


def build_timm_backbone(arch: str, *, require_batchnorm: bool = True,
                        image_size: int | None = None) -> TimmBackbone:
    """The backbone of ``-a timm:NAME`` with random weights. ``require_batchnorm``: refuse a
    model without BatchNorm (MoCo v1/v2's Shuffling BN needs it). ``image_size``: the input
    size of a ViT (timm builds its patch grid for it); CNNs ignore it."""
    return TimmBackbone(timm_name(arch), require_batchnorm=require_batchnorm,
                        image_size=image_size)


@functools.cache
def _classifier_names(name: str) -> tuple[str, ...]:
    cfg: dict[str, Any] = dict(getattr(create_timm_model(name), "pretrained_cfg", None) or {})
    c = cfg.get("classifier", "fc")
    return tuple(c) if isinstance(c, list | tuple) else (str(c),)


def timm_state_dict(arch: str, backbone: dict[str, torch.Tensor], *, seed: int = 0
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``backbone`` (our names, no ``fc``) -> a state dict that ``timm.create_model(NAME,
    pretrained=True, pretrained_cfg_overlay=dict(file=...))`` loads strictly with its default
    head, and the names of the classifier tensors, which are a fresh initialisation (timm's own,
    under ``torch.manual_seed(seed)``): the pretraining trains no classifier.

    ``arch`` is ``timm:NAME`` (keys ``body.*``) or a torchvision ResNet whose timm model of the
    same name has the same tensors (resnet50, resnext50_32x4d, wide_resnet50_2, ...).
    Raises :class:`ConfigError` when the tensors do not fit the timm model.
    """
    name = timm_name(arch)
    if is_timm_arch(arch):
        state = {k[len("body."):]: v for k, v in backbone.items() if k.startswith("body.")}
        if len(state) != len(backbone):
            odd = next(k for k in backbone if not k.startswith("body."))
            raise ConfigError(f"unexpected key {odd} in a timm:{name} backbone")
    else:
        state = dict(backbone)
        if not has_timm() or not _timm().is_model(name):
            raise ConfigError(f"--format timm: timm has no model named {name}; export this "
                              f"{arch} as torchvision or safetensors instead")
    with seeded(seed):
        model = create_timm_model(name)  # the default head, timm's init
    ref = model.state_dict()
    heads = [k for k in ref if k.rsplit(".", 1)[0] in _classifier_names(name)]
    wanted = {k: tuple(v.shape) for k, v in ref.items() if k not in heads}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if wanted != got:
        diff = sorted(set(wanted) ^ set(got)) or [k for k in wanted if wanted[k] != got[k]]
        raise ConfigError(f"the {arch} backbone does not fit timm's {name}: {diff[0]} differs "
                          f"({len(diff)} tensor(s) in all)")
    out = {k: v.detach().clone().contiguous() for k, v in state.items()}
    out.update({k: ref[k].detach().clone().contiguous() for k in heads})
    return out, heads


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of ``model`` -> SyncBatchNorm (in place where possible), returning the
    model. With timm installed its converter is used, which turns ``BatchNormAct2d`` into
    ``SyncBatchNormAct`` (BN + activation); torch's would silently drop the activation."""
    if has_timm():
        from timm.layers import convert_sync_batchnorm as timm_convert

        out: nn.Module = timm_convert(model)  # type: ignore[no-untyped-call]
        return out
    converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
    return converted
