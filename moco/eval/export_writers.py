"""The writers of the export formats (registered in :mod:`moco.eval.export_formats`): each
takes an :class:`~moco.eval.export.ExportJob`, writes ``job.out`` atomically, adds what the user
should know to ``job.warnings`` / ``job.notes`` and returns the number of tensors written."""

from __future__ import annotations

import json
import pickle
from typing import Any

import torch

from moco.core.errors import ConfigError
from moco.core.seeding import seeded
from moco.core.timm_backbone import create_timm_model, is_timm_arch, timm_name, timm_state_dict
from moco.detection.settings import c4_problem
from moco.eval.architectures import build_network
from moco.eval.export import (
    SAFETENSORS_FORMAT,
    ExportJob,
    detectron2_checkpoint,
    write_safetensors,
)
from moco.eval.layouts import is_vit_state
from moco.eval.vit_spec import ViTSpec, spec_from_state, timm_model_args
from moco.utils.atomic import atomic_write
from moco.utils.checkpoint import torch_save


def _save(job: ExportJob, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """``tensors`` to ``job.out``: safetensors when its name ends in ``.safetensors``, else
    ``torch.save``."""
    if job.out.suffix == ".safetensors":
        write_safetensors(job.out, tensors, metadata)
    else:
        atomic_write(job.out, lambda f: torch_save(tensors, f))
    return len(tensors)


def _no_safetensors_name(job: ExportJob, consumer: str, suffix: str) -> None:
    if job.out.suffix == ".safetensors":
        raise ConfigError(f"--out {job.out}: {consumer} reads a pickle, not a safetensors file; "
                          f"name the file {job.out.stem}{suffix} (or export --format safetensors)")


def _is_vit(job: ExportJob) -> bool:
    return job.info.vit is not None or is_vit_state(job.backbone)


def vit_spec(job: ExportJob) -> ViTSpec:
    """The exported ViT's spec: recorded in ``info``, else read from the network (a
    registered ViT) and its tensors."""
    if job.info.vit:
        return ViTSpec.from_json(job.info.vit)
    with torch.device("meta"):
        net = build_network(job.info.network())
    heads = net.get_submodule("blocks.0.attn").num_heads
    assert isinstance(heads, int)
    return spec_from_state(job.backbone, heads, job.source)


def _resnet_only(job: ExportJob, fmt: str) -> None:
    if _is_vit(job):
        raise ConfigError(f"{job.info.arch} is a Vision Transformer: --format {fmt} is for "
                          "ResNets; export it with --format timm, deit or safetensors")
    if is_timm_arch(job.info.arch):
        raise ConfigError(f"{job.info.arch} is a timm model, not a torchvision ResNet: export it "
                          "with --format timm (for timm.create_model) or --format safetensors")


def _stem_warning(job: ExportJob, consumer: str) -> list[str]:
    info = job.info
    if not info.cifar_stem:
        return []
    return [f"this {info.arch} has the CIFAR stem (conv1 3x3 stride 1, no max-pool): a stock "
            f"{consumer} has a 7x7 conv1 and will refuse conv1.weight; build the model with the "
            f"same stem (moco.core.backbones.build_backbone({info.arch!r}, cifar_stem=True), or "
            "replace conv1 by Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool by Identity)"]


def _builder_note(arch: str) -> list[str]:
    """How to build the network a torchvision-format export of ``arch`` loads into, when it is
    not ``torchvision.models.<arch>()``."""
    import torchvision

    from moco.core.wide_resnet import WIDE_RESNETS

    if arch in WIDE_RESNETS:
        return [f"{arch} is torchvision's ResNet with every layer {WIDE_RESNETS[arch][2]}x wider: "
                f"build it with moco.core.wide_resnet.{arch}() and load_state_dict(sd, strict=False) "
                "(only fc.weight and fc.bias missing)"]
    if arch == "resnext50_32x8d":
        return ["build it with torchvision.models.resnet.ResNet(Bottleneck, [3, 4, 6, 3], "
                "groups=32, width_per_group=8) (or moco.core.backbones.build_backbone"
                "('resnext50_32x8d').model) and load_state_dict(sd, strict=False)"]
    if not hasattr(torchvision.models, arch):
        return [f"{arch} is a registered backbone: build it with moco.core.backbones."
                f"build_backbone({arch!r}).model (with the same register_backbone call) and "
                "load_state_dict(sd, strict=False) (only the head missing)"]
    return []


def write_torchvision(job: ExportJob) -> int:
    _resnet_only(job, "torchvision")
    job.warnings += _stem_warning(job, f"torchvision.models.{job.info.arch}()")
    job.notes += _builder_note(job.info.arch)
    state = {k: v.detach().contiguous().clone() for k, v in job.backbone.items()}
    return _save(job, state, {"format": "pt", "arch": job.info.arch})


def write_detectron2(job: ExportJob) -> int:
    _resnet_only(job, "detectron2")
    _no_safetensors_name(job, "detectron2", ".pkl")
    info, w = job.info, job.weights
    problem = c4_problem(info.arch)
    if problem is not None and not info.cifar_stem:
        job.warnings.append(f"{problem}; the MoCo R-C4 configs will not build with these weights")
    job.warnings += _stem_warning(job, "detectron2 ResNet")
    if not w.pretraining:
        job.warnings.append(f"{job.source} is a bare backbone ({w.layout}): only its backbone "
                            "keys are converted (the original script expects a MoCo checkpoint)")
        state = job.backbone
    else:
        state = w.state  # the query encoder with its head, as the original script keeps it
    obj = detectron2_checkpoint({f"module.encoder_q.{k}": v for k, v in state.items()})
    atomic_write(job.out, lambda f: pickle.dump(obj, f))
    return len(obj["model"])


def write_safetensors_export(job: ExportJob) -> int:
    info = job.info
    tensors = {k: v.detach().contiguous().clone() for k, v in job.backbone.items()}
    metadata = {
        "format": SAFETENSORS_FORMAT, "arch": info.arch,
        "cifar_stem": "true" if info.cifar_stem else "false",
        "feature_dim": str(info.backbone_dim), "image_size": str(info.image_size),
        "mean": json.dumps(list(info.mean)), "std": json.dumps(list(info.std)),
        "source": job.source.name, "source_layout": info.layout,
        "epoch": "" if info.epoch is None else str(info.epoch),
    }
    if info.vit:
        metadata["vit"] = info.vit
    if job.out.suffix != ".safetensors":
        job.warnings.append(f"{job.out} is a safetensors file although its name does not end "
                            "in .safetensors: moco reads it by its content, other tools go by "
                            "the name")
    write_safetensors(job.out, tensors, metadata)
    return len(tensors)


def write_timm(job: ExportJob) -> int:
    info = job.info
    if _is_vit(job):
        name, kwargs = timm_model_args(vit_spec(job))
        tensors, heads = _timm_vit_state(job, name, kwargs)
    elif info.cifar_stem:
        raise ConfigError(f"this {info.arch} has the CIFAR stem (3x3 conv1, no max-pool): "
                          f"timm's {timm_name(info.arch)} has the 7x7 stem; export it as "
                          "torchvision or safetensors")
    else:
        name, kwargs = timm_name(info.arch), {}
        tensors, heads = timm_state_dict(info.arch, job.backbone, seed=job.seed)
    n = _save(job, tensors, {"format": "pt", "source": job.source.name, "arch": info.arch})
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    job.notes.append(f"the classifier ({', '.join(heads)}) is timm's fresh initialisation, not "
                     "trained (MoCo pretraining trains no classifier): fine-tune it, or build the "
                     "model with num_classes=N for your classes")
    job.notes.append(f"load with timm.create_model({name!r}, pretrained=True{args}, "
                     f"pretrained_cfg_overlay=dict(file={str(job.out)!r}))")
    return n


def _timm_vit_state(job: ExportJob, name: str, kwargs: dict[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ViT's tensors (timm's names already) plus the fresh default head of
    ``timm.create_model(name, **kwargs)`` under ``job.seed``."""
    with seeded(job.seed):
        ref = create_timm_model(name, **kwargs).state_dict()
    heads = [k for k in ref if k.startswith("head.")]
    wanted = {k: tuple(v.shape) for k, v in ref.items() if k not in heads}
    got = {k: tuple(v.shape) for k, v in job.backbone.items()}
    if wanted != got:
        diff = sorted(set(wanted) ^ set(got)) or [k for k in wanted if wanted[k] != got[k]]
        raise ConfigError(f"the {job.info.arch} backbone does not fit timm's {name}: {diff[0]} "
                          f"differs ({len(diff)} tensor(s) in all); export as safetensors")
    out = {k: v.detach().contiguous().clone() for k, v in job.backbone.items()}
    out.update({k: ref[k].detach().clone().contiguous() for k in heads})
    return out, heads


def write_deit(job: ExportJob) -> int:
    if not _is_vit(job):
        raise ConfigError(f"--format deit is for Vision Transformers; {job.info.arch} is not one "
                          "(export it as torchvision, timm or safetensors)")
    _no_safetensors_name(job, "DeiT's main.py", ".pth")
    spec = vit_spec(job)
    state = {k: v.detach().contiguous().clone() for k, v in job.backbone.items()}
    atomic_write(job.out, lambda f: torch_save({"model": state}, f))
    name, kwargs = timm_model_args(spec)
    job.notes.append("the head is left out: DeiT's main.py --finetune loads the rest with "
                     "strict=False and initialises the head for its classes")
    if kwargs:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        job.notes.append(f"DeiT's --model must build this ViT ({spec.describe()}): timm's "
                         f"{name} with {args} (DeiT's own models differ: deit_small_patch16_224 "
                         "has 6 heads)")
    else:
        job.notes.append(f"fine-tune with DeiT's main.py --model {name} --finetune {job.out}")
    return len(state)
