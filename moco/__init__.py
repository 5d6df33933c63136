"""moco: Momentum Contrast (MoCo v1, v2, v3) self-supervised pretraining, as a library and a CLI.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297.

The public API is the names in ``__all__`` (see the README's "Use it as a library"):

* pretraining methods by name: :func:`register_method`, :func:`available_methods`,
  :class:`PretrainingMethod` (the base of a method) and :class:`StepOutput`;
* the paper's parts: :class:`MoCo` (Algorithm 1 around any encoder ``nn.Module``),
  :func:`build_encoder`, :class:`KeyQueue`, :func:`info_nce` / :func:`moco_logits`,
  :func:`momentum_update`, :class:`SplitBatchNorm` and the key shuffles (Shuffling BN);
* configuration and training: :class:`MocoConfig`, :func:`build_config`, :func:`pretrain`,
  :class:`PretrainResult`, the augmentations (:func:`pretrain_transform`, :class:`TwoViews`);
* pretrained encoders: :func:`load_backbone`, :func:`extract_features`, :func:`knn_evaluate`,
  :func:`linear_classification`, :func:`embed_images`, :func:`export_checkpoint`, and their
  settings (:class:`KnnConfig`, :class:`LinclsConfig`, :class:`EmbedConfig`,
  :class:`FeatureOptions`: each value checked, errors naming the parameter);
* :class:`MocoError`, the base of every error a user can fix (one line: what, where, the fix).

Names are imported on first use: ``import moco`` alone loads neither torch nor anything else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_API: dict[str, str] = {
    # the paper's parts (moco.core)
    "MoCo": "moco.core.model",
    "StepOutput": "moco.core.model",
    "PretrainingMethod": "moco.core.method_base",
    "register_method": "moco.core.methods",
    "available_methods": "moco.core.methods",
    "build_encoder": "moco.core.model",
    "build_backbone": "moco.core.backbones",
    "register_backbone": "moco.core.backbones",
    "strip_head": "moco.core.backbones",
    "linear_head": "moco.core.heads",
    "mlp_head": "moco.core.heads",
    "KeyQueue": "moco.core.queue",
    "info_nce": "moco.core.loss",
    "moco_logits": "moco.core.loss",
    "momentum_update": "moco.core.momentum",
    "SplitBatchNorm": "moco.core.shuffle_bn",
    "convert_split_bn": "moco.core.shuffle_bn",
    "KeyShuffle": "moco.core.shuffle_bn",
    "NoShuffle": "moco.core.shuffle_bn",
    "LocalShuffle": "moco.core.shuffle_bn",
    "DDPShuffle": "moco.core.shuffle_bn",
    "make_key_shuffle": "moco.core.shuffle_bn",
    # configuration, data and pretraining
    "MocoConfig": "moco.engine.config",
    "build_config": "moco.engine.config_sources",
    "pretrain": "moco.engine.loop",
    "PretrainResult": "moco.engine.run_state",
    "pretrain_transform": "moco.data.augment",
    "eval_transform": "moco.data.augment",
    "TwoViews": "moco.data.augment",
    "CIFAR_MEAN": "moco.data.recipes",  # the normalisation of the recipes (per channel, RGB)
    "CIFAR_STD": "moco.data.recipes",
    "IMAGENET_MEAN": "moco.data.recipes",
    "IMAGENET_STD": "moco.data.recipes",
    # pretrained encoders: loading, features, evaluation, export
    "load_backbone": "moco.eval.encoders",
    "load_encoder": "moco.eval.encoders",
    "PretrainedInfo": "moco.eval.pretrained",
    "extract_features": "moco.eval.features",
    "FeatureOptions": "moco.eval.features",
    "knn_evaluate": "moco.eval.knn",
    "knn_accuracy": "moco.eval.knn",
    "KnnConfig": "moco.eval.config",
    "KnnResult": "moco.eval.knn",
    "linear_classification": "moco.eval.lincls",
    "LinclsConfig": "moco.eval.config",
    "embed_images": "moco.eval.embed",
    "EmbedConfig": "moco.eval.config",
    "export_checkpoint": "moco.eval.export",
    "EXPORT_FORMATS": "moco.eval.export",
    # released weights by name, Hugging Face Hub folders
    "load_pretrained": "moco.hub.load",
    "from_pretrained": "moco.hub.hf",
    # errors
    "MocoError": "moco.core.errors",
    "ConfigError": "moco.core.errors",
    "RunError": "moco.core.errors",
    "CheckpointError": "moco.utils.checkpoint",
    "DataError": "moco.data.source",
}

__all__ = [  # a literal list for static tools; tests/package/test_api.py checks it against _API
    "CIFAR_MEAN", "CIFAR_STD", "CheckpointError", "ConfigError", "DDPShuffle", "DataError", "EXPORT_FORMATS", "EmbedConfig",
    "FeatureOptions", "IMAGENET_MEAN", "IMAGENET_STD", "KeyQueue", "KeyShuffle", "KnnConfig", "KnnResult", "LinclsConfig",
    "LocalShuffle", "MoCo", "MocoConfig", "MocoError", "NoShuffle", "PretrainResult",
    "PretrainedInfo", "PretrainingMethod", "RunError", "SplitBatchNorm", "StepOutput", "TwoViews",
    "available_methods", "build_backbone", "build_config", "build_encoder", "convert_split_bn",
    "embed_images", "eval_transform", "export_checkpoint", "extract_features", "from_pretrained",
    "info_nce", "knn_accuracy", "knn_evaluate", "linear_classification", "linear_head",
    "load_backbone", "load_encoder", "load_pretrained", "make_key_shuffle", "mlp_head",
    "moco_logits", "momentum_update", "pretrain", "pretrain_transform", "register_backbone",
    "register_method", "strip_head",
]

if TYPE_CHECKING:  # the names for type checkers and editors; at run time see __getattr__
    from moco.core.backbones import build_backbone, register_backbone, strip_head
    from moco.core.errors import ConfigError, MocoError, RunError
    from moco.core.heads import linear_head, mlp_head
    from moco.core.loss import info_nce, moco_logits
    from moco.core.method_base import PretrainingMethod
    from moco.core.methods import available_methods, register_method
    from moco.core.model import MoCo, StepOutput, build_encoder
    from moco.core.momentum import momentum_update
    from moco.core.queue import KeyQueue
    from moco.core.shuffle_bn import (
        DDPShuffle,
        KeyShuffle,
        LocalShuffle,
        NoShuffle,
        SplitBatchNorm,
        convert_split_bn,
        make_key_shuffle,
    )
    from moco.data.augment import TwoViews, eval_transform, pretrain_transform
    from moco.data.recipes import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
    from moco.data.source import DataError
    from moco.engine.config import MocoConfig
    from moco.engine.config_sources import build_config
    from moco.engine.loop import pretrain
    from moco.engine.run_state import PretrainResult
    from moco.eval.config import EmbedConfig, KnnConfig, LinclsConfig
    from moco.eval.embed import embed_images
    from moco.eval.encoders import load_backbone, load_encoder
    from moco.eval.export import EXPORT_FORMATS, export_checkpoint
    from moco.eval.features import FeatureOptions, extract_features
    from moco.eval.knn import KnnResult, knn_accuracy, knn_evaluate
    from moco.eval.lincls import linear_classification
    from moco.eval.pretrained import PretrainedInfo
    from moco.hub.hf import from_pretrained
    from moco.hub.load import load_pretrained
    from moco.utils.checkpoint import CheckpointError


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'moco' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
