"""The recipes of ``moco pretrain --preset NAME``: each a set of settings applied over the
defaults and under a YAML file and the flags (:mod:`moco.engine.config`).

* ``mocov1``, ``mocov2``: the papers' ImageNet recipes (``main_moco.py``, MoCo v2 §3);
* ``cifar10``: the authors' CIFAR-10 notebook;
* ``mocov3-r50``, ``mocov3-vit-small``, ``mocov3-vit-base``: MoCo v3's ImageNet recipes (§5 and
  Appendix A; the authors' ``CONFIG.md``): the lr given is the base lr, scaled by the global
  batch / 256 (``--lr-scale linear``), warmed up linearly then a half cosine per step;
* ``cifar10-mocov3-vit``: MoCo v3 on CIFAR-10 with a ViT-Tiny of 4-px patches, a starting
  point (no published recipe: docs/mocov3.md says how its values were chosen).

The ImageNet presets monitor kNN on class-balanced subsets (10 train images per class as the
bank, 2 val images per class as queries): ~1-2% of an epoch, where the whole of train + val
would cost more than one.
"""

from __future__ import annotations

from typing import Any

from moco.data.recipes import CIFAR_MEAN, CIFAR_STD

_IMAGENET_KNN = {"knn_bank_images": 10000, "knn_query_images": 2000}

#: MoCo v3's settings shared by its recipes: no queue, the momentum m0 = 0.99 raised to 1 by
#: the cosine, 256-d output, 4096-d hidden MLPs, BYOL's asymmetric augmentation, the base lr
#: scaled by batch / 256 with a linear warmup and a per-step half cosine.
_V3 = {"mechanism": "mocov3", "moco_m": 0.99, "moco_m_cos": True, "moco_dim": 256,
       "mlp_dim": 4096, "aug": "v3", "crop_min_scale": 0.08, "lr_scale": "linear",
       "lr_schedule": "warmup-cosine", "batch_size": 4096}
#: The ViTs' (MoCo v3 §5; ``CONFIG.md``): AdamW, base lr 1.5e-4, wd 0.1, 40 warmup epochs of
#: 300, τ 0.2, the random patch projection.
_V3_VIT = {**_V3, "optimizer": "adamw", "lr": 1.5e-4, "wd": 0.1, "warmup_epochs": 40,
           "epochs": 300, "moco_t": 0.2, "stop_grad_conv1": True, "patch_size": 16}

PRESETS: dict[str, dict[str, Any]] = {
    # MoCo v1, ImageNet (main_moco.py's defaults).
    "mocov1": {"arch": "resnet50", "lr": 0.03, "batch_size": 256, "epochs": 200,
               "schedule": [120, 160], "cos": False, "moco_k": 65536, "moco_m": 0.999,
               "moco_t": 0.07, "mlp": False, "aug": "v1", "wd": 1e-4, **_IMAGENET_KNN},
    # MoCo v2: + MLP head, τ 0.2, aug+, cosine.
    "mocov2": {"arch": "resnet50", "lr": 0.03, "batch_size": 256, "epochs": 200,
               "schedule": [120, 160], "cos": True, "moco_k": 65536, "moco_m": 0.999,
               "moco_t": 0.2, "mlp": True, "aug": "v2", "wd": 1e-4, **_IMAGENET_KNN},
    # The authors' CIFAR-10 demo notebook.
    "cifar10": {"arch": "resnet18", "cifar_stem": True, "moco_dim": 128, "moco_k": 4096,
                "moco_m": 0.99, "moco_t": 0.1, "bn_splits": 8, "shuffle_bn": "auto",
                "symmetric": False, "mlp": False, "lr": 0.06, "batch_size": 512,
                "wd": 5e-4, "epochs": 200, "cos": True, "cos_one_based": True, "schedule": [],
                "aug": "cifar-demo", "image_size": 32, "crop_min_scale": 0.08,
                "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "knn_k": 200, "knn_t": 0.1,
                "knn_features": "head"},
    # MoCo v3, ResNet-50, 100 epochs: LARS, base lr 0.6, wd 1e-6, 10 warmup epochs, τ 1.0.
    "mocov3-r50": {**_V3, "arch": "resnet50", "optimizer": "lars", "lr": 0.6, "wd": 1e-6,
                   "momentum": 0.9, "warmup_epochs": 10, "epochs": 100, "moco_t": 1.0,
                   **_IMAGENET_KNN},
    # MoCo v3, ViT-S/16 and ViT-B/16, 300 epochs.
    "mocov3-vit-small": {**_V3_VIT, "arch": "vit_small", **_IMAGENET_KNN},
    "mocov3-vit-base": {**_V3_VIT, "arch": "vit_base", **_IMAGENET_KNN},
    # MoCo v3 on CIFAR-10: ViT-Tiny with 4-px patches at 32 px (64 patches), the CIFAR variant
    # of v3's augmentation (no blur), batch 512; hidden MLPs of 1024 (4096 would make the heads
    # three times the backbone), 10 warmup epochs of 200. Starting values, to be tuned.
    "cifar10-mocov3-vit": {**_V3_VIT, "arch": "vit_tiny", "patch_size": 4, "image_size": 32,
                           "aug": "cifar-v3", "batch_size": 512, "mlp_dim": 1024,
                           "warmup_epochs": 10, "epochs": 200,
                           "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "knn_k": 200,
                           "knn_t": 0.1, "knn_features": "backbone"},
}
