"""Read a pretrained encoder, whoever wrote the checkpoint: its weights
(:func:`read_encoder`), architecture (given, recorded or inferred) and a
:class:`PretrainedInfo` describing it (:func:`describe_encoder`).

:func:`moco.eval.encoders.load_backbone` builds the network ``[B,3,H,W] -> [B, D]`` (``fc`` =
identity, eval mode) from them in one call. Accepted files:

* checkpoints written by ``moco pretrain`` (the original layout plus our ``moco`` entry);
* checkpoints written by the original ``main_moco.py``: ``state_dict`` with
  ``module.encoder_q.*`` (v1 ``fc`` or v2 ``fc.0``/``fc.2`` head), ``module.encoder_k.*``,
  ``module.queue``, ``module.queue_ptr``;
* the CIFAR-10 notebook's checkpoints: ``encoder_q.net.N`` keys (its ``ModelBase``), no
  ``module.``;
* bare torchvision state dicts (``conv1.weight``, ..., optionally ``fc.*`` and ``module.``),
  which covers ``moco export --format torchvision`` and ``moco lincls`` checkpoints;
* ``.safetensors`` files written by ``moco export --format safetensors``.

The architecture comes from ``--arch``, else the checkpoint's ``arch`` key or our
``moco.engine.config``, else it is inferred from the tensor shapes; the CIFAR stem is read from the
shape of ``conv1.weight`` (3x3 instead of 7x7). Files are read with
``torch.load(weights_only=True)``: nothing in them is executed.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moco.core.backbones import (
    HEAD_NAMES,
    accepted_archs_text,
    available_backbones,
    build_backbone,
    head_name,
    is_known_arch,
)
from moco.core.errors import ConfigError
from moco.core.timm_backbone import is_timm_arch
from moco.data.recipes import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from moco.utils.checkpoint import (
    PREFIX,
    CheckpointError,
    check_finite,
    check_is_file,
    load_checkpoint,
    model_state,
    read_head,
)

# The notebook's ``ModelBase.net`` (an ``nn.Sequential``) indices -> torchvision names.
_DEMO_NET = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4",
             "9": "fc"}


@dataclass
class PretrainedInfo:
    """What :func:`~moco.eval.encoders.load_backbone` found in a checkpoint.

    ``feature_dim`` is the width D of what the returned model outputs (the pooled backbone
    features, or the projection head's output with ``keep_head``); ``backbone_dim`` is always
    the pooled width (512 for ResNet-18, 2048 for ResNet-50). ``layout`` is one of ``moco``
    (written by us), ``original`` (``main_moco.py``), ``demo`` (the CIFAR notebook),
    ``torchvision`` (bare state dict) or ``safetensors``. ``head`` is ``linear``, ``mlp`` or
    None when the file has no projection head. ``image_size``, ``mean`` and ``std`` are the
    pretraining run's when recorded, else 32 px + CIFAR constants for a CIFAR stem and
    224 px + ImageNet constants otherwise.
    """

    path: str
    arch: str
    cifar_stem: bool
    feature_dim: int
    backbone_dim: int
    layout: str
    head: str | None = None
    head_dim: int | None = None
    epoch: int | None = None
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    knn_features: str | None = None
    features: str = "backbone"
    config: dict[str, Any] | None = field(default=None, repr=False)

    def describe(self) -> str:
        stem = " (CIFAR stem)" if self.cifar_stem else ""
        ep = f", epoch {self.epoch}" if self.epoch is not None else ""
        return (f"{self.arch}{stem}, {self.layout} checkpoint{ep}, {self.feature_dim}-d "
                f"features, {self.image_size} px")


@dataclass
class EncoderWeights:
    """The query encoder of a checkpoint under its network's names, head included.

    ``state``: ``conv1.weight``, ``bn1.*``, ``layerL.B.*`` (a ResNet), then the head's keys
    when the file has them (``fc.*`` / ``fc.0.*``, ``fc.2.*`` for a ResNet; ``head.*`` for a
    ViT), in the file's order. ``head_name`` is the attribute of the head
    (:func:`moco.core.backbones.head_name`): ``fc`` unless the keys say otherwise.
    """

    state: dict[str, torch.Tensor]
    layout: str
    ckpt: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    head_name: str = ""

    def __post_init__(self) -> None:
        if not self.head_name:
            self.head_name = head_name_of_keys(self.state)

    def is_head(self, key: str) -> bool:
        return key.startswith(self.head_name + ".")

    @property
    def backbone(self) -> dict[str, torch.Tensor]:
        """The encoder without its head (what ``main_lincls.py`` keeps)."""
        return {k: v for k, v in self.state.items() if not self.is_head(k)}

    @property
    def head(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if self.is_head(k)}


def head_name_of_keys(state: dict[str, Any]) -> str:
    """The head's attribute in a state dict's keys: the first of
    :data:`~moco.core.backbones.HEAD_NAMES` (``fc``, ``head``, ``classifier``) that prefixes a
    key, else ``fc``."""
    for name in HEAD_NAMES:
        if any(k.startswith(name + ".") for k in state):
            return name
    return "fc"


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _demo_key(rest: str) -> str:
    """``net.3.0.conv1.weight`` -> ``layer1.0.conv1.weight`` (the notebook's ``ModelBase``)."""
    parts = rest.split(".", 2)
    if len(parts) < 3 or parts[0] != "net" or parts[1] not in _DEMO_NET:
        raise CheckpointError(f"unexpected key encoder_q.{rest} in a CIFAR-demo checkpoint")
    return f"{_DEMO_NET[parts[1]]}.{parts[2]}"


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file (truncated or corrupt): "
                              f"{e}") from None
    return tensors, metadata


def _check_torch_file(p: Path) -> None:
    """A clear error for a file that ``torch.save`` did not write (text, an image, ...): the
    zip format starts with ``PK``, the legacy format with a pickle protocol byte."""
    head = read_head(p, 6)
    if not head:
        raise CheckpointError(f"{p} is empty: not a checkpoint")
    if head.startswith(b"\x93NUMPY"):
        raise CheckpointError(f"{p} is a numpy .npy file (e.g. moco embed's output), not a "
                              "checkpoint")
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"{p} is not a checkpoint: it was not written by torch.save "
                              "(nor is it a .safetensors file)")


def read_encoder(path: str | Path) -> EncoderWeights:
    """The query encoder's weights of any accepted file (see the module docstring).

    Raises :class:`CheckpointError` for a missing, truncated or foreign file, or one without
    encoder weights.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        check_is_file(p)
        tensors, metadata = _read_safetensors(p)
        if "embeddings" in tensors and "conv1.weight" not in tensors:
            raise CheckpointError(f"{p} holds embeddings (moco embed), not encoder weights")
        check_finite(tensors, p, "encoder")
        return EncoderWeights(tensors, "safetensors", {}, metadata)
    _check_torch_file(p)
    ckpt = load_checkpoint(p)
    state = model_state(ckpt, p)
    out: dict[str, torch.Tensor] = {}
    keys = [_strip(k, PREFIX) for k in state]
    if any(k.startswith("encoder_q.net.") for k in keys):
        layout = "demo"
        for k, v in zip(keys, state.values(), strict=True):
            if k.startswith("encoder_q."):
                out[_demo_key(k[len("encoder_q."):])] = v
    elif any(k.startswith("encoder_q.") for k in keys):
        layout = "moco" if isinstance(ckpt.get("moco"), dict) else "original"
        for k, v in zip(keys, state.values(), strict=True):
            if k.startswith("encoder_q."):
                out[k[len("encoder_q."):]] = v
    elif "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        layout = "torchvision"
        out = dict(zip(keys, state.values(), strict=True))
    elif keys and all(k.startswith(("body.", "fc.")) for k in keys):
        layout = "timm"  # a bare -a timm:NAME backbone (body.* + fc.*): a moco lincls checkpoint
        out = dict(zip(keys, state.values(), strict=True))
    else:
        sample = ", ".join(list(state)[:3]) or "none"
        raise CheckpointError(
            f"{p} has no encoder_q weights (keys start with: {sample}): not a MoCo pretraining "
            "checkpoint, nor a torchvision ResNet state dict (a moco export --format timm file "
            "is for timm.create_model, not for moco)")
    check_finite(out, p, "encoder")
    return EncoderWeights(out, layout, ckpt)


@functools.cache
def _signature(arch: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """``arch``'s head prefix (``fc.``, ``head.``) and the shapes of its other tensors except
    ``conv1.weight`` (the stem may be the CIFAR one), built on the meta device: no memory, no
    time."""
    model = _meta_backbone(arch).model
    head = head_name(model) + "."
    return head, {k: tuple(v.shape) for k, v in model.state_dict().items()
                  if not k.startswith(head) and k != "conv1.weight"}


def _shapes(arch: str, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``state``'s tensors that :func:`_signature` compares (not the head)."""
    head, _ = _signature(arch)
    return {k: tuple(v.shape) for k, v in state.items()
            if not k.startswith(head) and k != "conv1.weight"}


def _matches(arch: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` (with or without its head) has ``arch``'s names and shapes."""
    return _signature(arch)[1] == _shapes(arch, state)


def infer_arch(backbone: dict[str, torch.Tensor]) -> str | None:
    """The registered architecture whose tensors have exactly these names and shapes."""
    for arch in available_backbones():
        if _matches(arch, backbone):
            return arch
    return None


def _first_mismatch(arch: str, backbone: dict[str, torch.Tensor]) -> str:
    sig, got = _signature(arch)[1], _shapes(arch, backbone)
    for k in sig:
        if k not in got:
            return f"{k} is missing"
        if sig[k] != got[k]:
            return f"{k} has shape {list(got[k])}, {arch} needs {list(sig[k])}"
    extra = sorted(set(got) - set(sig))
    return f"unexpected key {extra[0]}" if extra else "no difference"


def _config_of(w: EncoderWeights) -> dict[str, Any] | None:
    """The pretraining settings recorded in the file (our ``moco.engine.config`` entry), as far as
    they describe the encoder: arch, image_size, mean, std, knn_features. A ``moco lincls``
    checkpoint records the same preprocessing at the top of its ``moco`` entry."""
    ours = w.ckpt.get("moco")
    if not isinstance(ours, dict):
        return None
    if ours.get("kind") == "lincls":
        return {k: ours[k] for k in ("image_size", "mean", "std") if k in ours}
    if isinstance(ours.get("config"), dict):
        return dict(ours["config"])
    return None


def resolve_arch(w: EncoderWeights, arch: str | None, path: str | Path) -> str:
    """The architecture of ``w``, checked against ``arch`` (``--arch``) when given."""
    backbone = w.backbone
    cfg = _config_of(w) or {}
    recorded = w.ckpt.get("arch") or cfg.get("arch") or w.metadata.get("arch")
    if arch is not None and not is_known_arch(arch):
        raise ConfigError(f"-a/--arch: unknown architecture {arch!r}; choose one of: "
                          f"{accepted_archs_text()}")
    if arch is not None and recorded and recorded != arch:
        raise CheckpointError(f"{path} is a {recorded} checkpoint but --arch is {arch}; pass "
                              f"--arch {recorded} (or leave --arch out)")
    wanted = arch or recorded
    if wanted and is_known_arch(wanted):
        if not _matches(wanted, backbone):
            found = infer_arch(backbone)
            if found is not None:
                raise CheckpointError(f"{path} holds {found} weights (from the tensor shapes) but "
                                      f"{'--arch is' if arch else 'it says it is'} {wanted}")
            raise CheckpointError(f"{path} does not match {wanted}: "
                                  f"{_first_mismatch(wanted, backbone)}")
        return str(wanted)
    found = infer_arch(backbone)
    if found is None:
        name = f" ({wanted!r} is not a known architecture)" if wanted else ""
        raise CheckpointError(f"cannot tell the architecture of {path}{name}: its tensors match "
                              f"none of {', '.join(available_backbones())} (a timm:NAME "
                              "backbone must be named: pass -a timm:NAME)")
    return found


def _head_kind(head: dict[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """``linear`` (one Linear: MoCo v1) or ``mlp`` (v2, v3) and the output width of the head's
    last Linear layer; (None, None) without a head."""
    linears = [v for k, v in head.items() if k.endswith(".weight") and v.dim() == 2]
    if not linears:
        return None, None
    return ("linear" if len(head) <= 2 and len(linears) == 1 else "mlp"), int(linears[-1].shape[0])


def describe_encoder(w: EncoderWeights, arch: str | None = None,
                     path: str | Path = "checkpoint") -> PretrainedInfo:
    """Architecture, stem, widths and preprocessing of the encoder in ``w``."""
    arch = resolve_arch(w, arch, path)
    w.head_name = head_name(_meta_backbone(arch).model)
    conv1 = w.state.get("conv1.weight")
    if is_timm_arch(arch):
        cifar_stem = False  # timm models keep their own stem
    elif conv1 is None:
        raise CheckpointError(f"{path} has no conv1.weight: not a ResNet checkpoint")
    else:
        cifar_stem = tuple(conv1.shape[-2:]) != (7, 7)
    backbone_dim = _pooled_dim(arch)
    cfg = _config_of(w) or {}
    meta = w.metadata
    head, head_dim = _head_kind(w.head) if w.layout in ("moco", "original", "demo") else (None, None)
    if cfg.get("image_size"):
        image_size = int(cfg["image_size"])
    elif meta.get("image_size"):
        image_size = int(meta["image_size"])
    else:
        image_size = 32 if cifar_stem else 224
    default_mean, default_std = (CIFAR_MEAN, CIFAR_STD) if cifar_stem else (IMAGENET_MEAN, IMAGENET_STD)
    mean = tuple(cfg.get("mean") or json.loads(meta.get("mean", "null") or "null") or default_mean)
    std = tuple(cfg.get("std") or json.loads(meta.get("std", "null") or "null") or default_std)
    epoch = w.ckpt.get("epoch")
    return PretrainedInfo(
        path=str(path), arch=arch, cifar_stem=cifar_stem, feature_dim=backbone_dim,
        backbone_dim=backbone_dim, layout=w.layout, head=head, head_dim=head_dim,
        epoch=int(epoch) if isinstance(epoch, int) else None, image_size=image_size,
        mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std),
        knn_features=cfg.get("knn_features"), config=cfg or None,
    )


@functools.cache
def _pooled_dim(arch: str) -> int:
    return _meta_backbone(arch).feature_dim


def _meta_backbone(arch: str) -> Any:
    """``build_backbone(arch)`` on the meta device; a name the registry or timm refuses is a
    :class:`~moco.core.errors.ConfigError` naming ``-a/--arch``."""
    try:
        with torch.device("meta"):
            return build_backbone(arch)
    except ValueError as e:
        raise ConfigError(f"-a/--arch {arch}: {e}") from None
