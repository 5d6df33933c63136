"""Checks of a run's settings that need more than the config, before anything is built or
written.

:func:`run_advice` lists the settings that run but cannot work as meant on this data (warned,
not refused).

The checks of the config alone (settings that contradict each other, the queue and one batch
in memory) are :func:`moco.engine.config.check_combination`, which ``MocoConfig.validate``
calls. :func:`check_buildable` needs the process layout and the dataset size: it builds the
encoder on PyTorch's ``meta`` device (no memory, no time) to check the architecture, the
memory of the weights and of a memory bank, and that every BatchNorm gets more than one value
per channel.
"""

from __future__ import annotations

from typing import Any

from moco.core.errors import ConfigError
from moco.engine.config import DEFAULTS, PRESETS, SPLIT_BN_MODES, MocoConfig
from moco.utils.memory import FLOAT_BYTES, refuse_if_too_big


def images_per_bn_group(cfg: MocoConfig, mode: str, world_size: int) -> tuple[int, str]:
    """How many images one BatchNorm normalises together in training under ``--shuffle-bn
    mode`` (``auto`` resolved), and how that number comes about (for messages)."""
    from moco.core.methods import method_spec

    local = max(1, cfg.batch_size // world_size)
    per = f"-b {cfg.batch_size} / {world_size} processes" if world_size > 1 else f"-b {cfg.batch_size}"
    if not method_spec(cfg.mechanism).shuffle_bn:
        return cfg.batch_size, f"-b {cfg.batch_size} (BatchNorm over the global batch)"
    if mode in SPLIT_BN_MODES:
        return max(1, local // cfg.bn_splits), f"{per} / --bn-splits {cfg.bn_splits}"
    if mode == "syncbn":
        return cfg.batch_size, f"-b {cfg.batch_size} (SyncBatchNorm)"
    return local, per


def check_staleness_images(cfg: MocoConfig, images_per_epoch: int) -> None:
    """``--staleness-every`` encodes K fresh keys from one epoch's images: K must not be more."""
    from moco.core.methods import method_spec

    if cfg.staleness_every and method_spec(cfg.mechanism).has_queue and images_per_epoch < cfg.moco_k:
        raise ConfigError(f"--staleness-every compares the queue with K = {cfg.moco_k} fresh "
                          f"keys, but an epoch has only {images_per_epoch} images; lower --moco-k, "
                          "use more images, or drop --staleness-every")


def check_buildable(cfg: MocoConfig, mode: str, world_size: int = 1,
                    num_samples: int | None = None) -> None:
    """Build ``cfg``'s encoder on the meta device and raise :class:`ConfigError` when the
    architecture is refused, the weights or a memory bank cannot fit in memory, or a
    BatchNorm would see one value per channel ("Expected more than 1 value per channel")."""
    import torch

    from moco.core.model import build_encoder
    from moco.engine.build import backbone_options

    try:
        with torch.device("meta"):
            encoder = build_encoder(cfg.arch, cfg.moco_dim, mlp=cfg.mlp, cifar_stem=cfg.cifar_stem,
                                    bn_splits=1, options=backbone_options(cfg))
    except (ValueError, KeyError) as e:  # the backbone refuses the settings given to it
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"-a/--arch {cfg.arch}: {text}") from None
    n_params = sum(p.numel() for p in encoder.parameters())
    # f_q, f_k, the gradient and the SGD momentum buffer, each as big as the weights.
    refuse_if_too_big(f"the weights of {cfg.arch} with a --moco-dim {cfg.moco_dim} head "
                      f"({n_params} parameters, 4 copies)", n_params * 4 * FLOAT_BYTES,
                      "choose a smaller --arch or --moco-dim")
    from moco.core.methods import method_spec

    for what, nbytes, fix in method_spec(cfg.mechanism).memory(cfg, num_samples):
        refuse_if_too_big(what, nbytes, fix)
    smallest = _smallest_bn_map(encoder, cfg.image_size)
    if smallest == (0, ""):
        raise ConfigError(f"--image-size {cfg.image_size} is too small for {cfg.arch}: a layer's "
                          "output would be empty; raise --image-size")
    if smallest is None:
        return
    values, name = smallest
    group, how = images_per_bn_group(cfg, mode, world_size)
    if group * values <= 1:
        raise ConfigError(
            f"BatchNorm would normalise 1 value per channel ({group} image per group: {how}; "
            f"{name} of {cfg.arch} is 1x1 at --image-size {cfg.image_size}), which it cannot "
            "do; lower --bn-splits, raise --batch-size or --image-size"
            + (" (or add --cifar-stem for 32 px images)" if not cfg.cifar_stem else ""))


def _smallest_bn_map(encoder: Any, image_size: int) -> tuple[int, str] | None:
    """(H x W, module name) of the smallest input any BatchNorm of ``encoder`` gets for one
    image of ``image_size`` px (a forward pass on the meta device), or None when the meta
    forward is not possible for this network."""
    import torch
    from torch import nn

    seen: list[tuple[int, str]] = []
    hooks = []
    for name, module in encoder.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0]
                seen.append((int(torch.Size(x.shape[2:]).numel()), name))
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            encoder.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    except RuntimeError as e:
        if "too small" in str(e):
            return 0, ""
        return None  # a network whose forward cannot run on meta: checked when training
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    return min(seen) if seen else None


def run_advice(cfg: MocoConfig, images: int, knn_bank: int | None, *,
               shuffle_bn: str | None = None, world_size: int = 1) -> list[str]:
    """Settings that run but cannot work as meant on ``images`` training images (and a kNN
    bank of ``knn_bank`` images, None without the monitor): the method's own (a queue longer
    than the data), an lr not scaled with a changed batch, kNN's k beyond its bank, and with
    the resolved ``shuffle_bn`` mode, BatchNorm groups too small for their statistics."""
    from moco.core.methods import method_spec

    advice = list(method_spec(cfg.mechanism).advise(cfg, images))
    advice += lr_advice(cfg)
    if shuffle_bn is not None:
        advice += bn_group_advice(cfg, shuffle_bn, world_size)
    if knn_bank is not None and cfg.knn_k > knn_bank:
        advice.append(f"--knn-k {cfg.knn_k} is larger than the kNN monitor's bank of {knn_bank} "
                      f"train images: each query's vote is over the whole bank (k = {knn_bank}); "
                      f"use --knn-k {max(1, min(knn_bank // 10, 200))} or so")
    return advice


#: Fewer images than this in one BatchNorm group are warned about: the original trains with
#: 32 per GPU (256 over 8), and MoCo v2 on 500 images (docs/own-images.md) gained 4.7 kNN
#: points going from groups of 4 (-b 32 / --bn-splits 8) to 16 (--bn-splits 2); end-to-end
#: there read the same with groups of 8 and of 16 (within 1.2 points).
BN_GROUP_MIN = 16


def bn_group_advice(cfg: MocoConfig, mode: str, world_size: int) -> list[str]:
    """Shuffling BN over sub-batches of fewer than :data:`BN_GROUP_MIN` images: noisy
    statistics (MoCo v1 §3.3 keeps a GPU's 32); fewer splits or a larger batch fix it."""
    from moco.core.methods import method_spec

    if not method_spec(cfg.mechanism).shuffle_bn or mode == "syncbn":
        return []
    group, how = images_per_bn_group(cfg, mode, world_size)
    if group >= BN_GROUP_MIN:
        return []
    local = max(1, cfg.batch_size // world_size)
    # the most splits of at least BN_GROUP_MIN images each: the largest divisor of the batch
    # up to local // BN_GROUP_MIN (0 when even one group is too small)
    splits = next((s for s in range(local // BN_GROUP_MIN, 0, -1) if local % s == 0), 0)
    if mode in SPLIT_BN_MODES and splits >= 2:
        fix = f"use --bn-splits {splits} ({local // splits} images each)"
    elif mode in SPLIT_BN_MODES:
        fix = f"use -b {2 * BN_GROUP_MIN * world_size} or more with --bn-splits 2"
    else:
        fix = f"use -b {BN_GROUP_MIN * world_size} or more"
    return [f"BatchNorm normalises groups of {group} images ({how}): noisy statistics (the "
            "original: 32 per GPU; MoCo v2 on 500 images learned 4.7 kNN points less with "
            f"groups of 4 than of 16); {fix}"]


def lr_advice(cfg: MocoConfig) -> list[str]:
    """The batch changed from the recipe's (the preset's, else the default 256) while the lr
    stayed the one tuned for it, with ``--lr-scale none``: what the linear scaling rule
    (Goyal et al.) gives, and how to apply it."""
    recipe = {**DEFAULTS, **PRESETS.get(cfg.preset, {})}
    batch, lr = int(recipe["batch_size"]), float(recipe["lr"])
    if cfg.lr_scale != "none" or cfg.batch_size == batch or cfg.lr != lr:
        return []
    whose = f"preset {cfg.preset}'s" if cfg.preset else "the default"
    scaled = lr * cfg.batch_size / batch
    text = (f"-b {cfg.batch_size} is not {whose} batch {batch}, but --lr {lr:g} is still the "
            f"one tuned for {batch}: the linear scaling rule (Goyal et al.) gives lr "
            f"{lr:g} x {cfg.batch_size}/{batch} = {scaled:.6g}; ")
    if batch == 256:
        return [text + "--lr-scale linear applies it (or give --lr)"]
    return [text + f"pass --lr {scaled:.6g} (--lr-scale linear scales --lr by batch/256, for "
            "recipes tuned at 256)"]
