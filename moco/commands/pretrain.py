"""``moco pretrain DATA``: MoCo v1/v2 pretraining with the original ``main_moco.py`` flags."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from moco.config import (
    AUGMENTATIONS,
    BAD_IMAGE_POLICIES,
    LOADERS,
    LR_SCALES,
    MECHANISMS,
    PRECISIONS,
    PRESETS,
    SHUFFLE_BN,
    MocoConfig,
    build_config,
    load_yaml,
)

D = MocoConfig()  # defaults, shown in the help


def _bool_or_auto(v: str) -> bool | str:
    return "auto" if v.lower() == "auto" else _bool(v)


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a ResNet with MoCo v1/v2 on a folder of images",
        description="Pretrain a ResNet with MoCo. Settings come from the defaults (main_moco.py's, "
        "MoCo v1), then --preset, then --config FILE.yaml, then the flags given here.",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", nargs="?", help="dataset folder with train/ (and val/ or test/); default "
                   "$MOCO_DATA, else ../shared/data/cifar10 when present")
    g = p.add_argument_group("recipe")
    g.add_argument("--preset", choices=sorted(PRESETS), help="mocov1 / mocov2: the papers' ImageNet "
                   "recipes; cifar10: the authors' CIFAR-10 demo recipe")
    g.add_argument("--config", dest="config_file", metavar="FILE.yaml",
                   help="YAML file of settings (keys as the long flags), applied over the preset")
    m = p.add_argument_group("model")
    m.add_argument("-a", "--arch", help=f"backbone (default {D.arch}): resnet18/34/50/101/152, "
                   "wide_resnet50_2, ...")
    m.add_argument("--cifar-stem", type=_bool, nargs="?", const=True,
                   help="3x3 stride-1 conv1 and no max-pool, for 32 px images")
    m.add_argument("--moco-dim", type=int, help=f"feature dimension C (default {D.moco_dim})")
    m.add_argument("--moco-k", type=int, help=f"queue size K (default {D.moco_k})")
    m.add_argument("--moco-m", type=float, help=f"key-encoder momentum m (default {D.moco_m})")
    m.add_argument("--moco-t", type=float, help=f"softmax temperature T (default {D.moco_t})")
    m.add_argument("--mlp", type=_bool, nargs="?", const=True, help="MoCo v2 MLP head")
    m.add_argument("--symmetric", type=_bool, nargs="?", const=True,
                   help="symmetric loss: loss(q1,k2)+loss(q2,k1), both key sets enqueued")
    m.add_argument("--shuffle-bn", choices=SHUFFLE_BN, help="shuffling BN: ddp = key images "
                   "shuffled across processes, each process's BN on its slice (the original; needs "
                   "torchrun); split = SplitBatchNorm + key-batch shuffle within each process; none = "
                   "no shuffle, BN over the same --bn-splits sub-batches (per-GPU BN without the "
                   "shuffle: the paper's ablation; --bn-splits 1 for plain BN); syncbn = SyncBatchNorm over the global batch, no "
                   "shuffle (comparison; GPUs only); auto = ddp under torchrun, split on one process "
                   f"(default {D.shuffle_bn})")
    m.add_argument("--bn-splits", type=int, help=f"sub-batches of SplitBatchNorm (default {D.bn_splits})")
    m.add_argument("--mechanism", choices=MECHANISMS, help="contrastive mechanism (MoCo v1 Figure 2): "
                   "moco = momentum key encoder + queue; end-to-end = keys from the current batch "
                   "through the query encoder with gradients (K = batch - 1); memory-bank = InstDisc "
                   f"bank, --moco-k negatives sampled from it (default {D.mechanism})")
    m.add_argument("--bank-momentum", type=float, help="memory bank entry update v <- normalize(m v + "
                   f"(1-m) q) (default {D.bank_momentum}, InstDisc's)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help=f"number of epochs (default {D.epochs})")
    o.add_argument("--stop-after-epochs", type=int, metavar="N", help="train only the first N "
                   "epochs of the --epochs schedule, then save and stop (0 = all); --resume auto "
                   "continues the same schedule (this flag is not kept for the resumed run)")
    o.add_argument("--time-limit", type=float, metavar="MINUTES", help="save and stop at the end "
                   "of the last epoch whose training fits in MINUTES (judged from the epochs so "
                   "far; 0 = no limit); --resume auto continues the same schedule (this flag is not "
                   "kept for the resumed run)")
    o.add_argument("-b", "--batch-size", type=int, help="GLOBAL batch size over all processes; "
                   f"each of N torchrun processes gets b / N (default {D.batch_size})")
    o.add_argument("--lr", "--learning-rate", dest="lr", type=float, help=f"base lr (default {D.lr})")
    o.add_argument("--lr-scale", choices=LR_SCALES, help="none: --lr is used as given (the "
                   "original); linear: lr = --lr x batch / 256 (the global batch, so independent of "
                   f"the process count) (default {D.lr_scale})")
    o.add_argument("--schedule", type=int, nargs="*", help="epochs at which lr is multiplied by 0.1 "
                   f"(default {D.schedule}); ignored with --cos")
    o.add_argument("--cos", type=_bool, nargs="?", const=True, help="cosine lr schedule (per epoch)")
    o.add_argument("--warmup-epochs", type=int, help="linear lr warmup epochs (default 0)")
    o.add_argument("--momentum", type=float, help=f"SGD momentum (default {D.momentum})")
    o.add_argument("--wd", "--weight-decay", dest="wd", type=float,
                   help=f"weight decay (default {D.wd})")
    a = p.add_argument_group("data and augmentation")
    a.add_argument("--aug-plus", dest="aug", action="store_const", const="v2",
                   help="MoCo v2 augmentation (same as --aug v2)")
    a.add_argument("--aug", choices=AUGMENTATIONS, help=f"augmentation recipe (default {D.aug})")
    a.add_argument("--image-size", type=int, help=f"crop size in pixels (default {D.image_size})")
    a.add_argument("--crop-min-scale", type=float,
                   help=f"RandomResizedCrop minimum area fraction (default {D.crop_min_scale})")
    a.add_argument("--train-subset", type=int, help="pretrain on a class-balanced subset of N "
                   "train images (kNN still uses the full train set as its bank)")
    a.add_argument("-j", "--workers", type=int, help="data-loading processes (default: cores - 1 on "
                   "CPU, up to 8 on GPU)")
    e = p.add_argument_group("monitoring")
    e.add_argument("--knn-every", type=int, help=f"kNN evaluation every N epochs, 0 = never (default "
                   f"{D.knn_every}); the last epoch is always evaluated")
    e.add_argument("--knn-k", type=int, help=f"neighbours (default {D.knn_k})")
    e.add_argument("--knn-t", type=float, help=f"kNN temperature (default {D.knn_t})")
    e.add_argument("--knn-features", choices=("backbone", "head"), help="kNN on pooled backbone "
                   "features or on the head's output (default backbone)")
    e.add_argument("--staleness-every", type=int, help="every N epochs, measure the loss against "
                   "the queue vs against K keys freshly encoded by f_k (moco.staleness; ~K/B+2x"
                   "--staleness-batches key-encoder batches, no training effect); 0 = never "
                   "(default); single process only")
    e.add_argument("--staleness-batches", type=int, help="training batches the two dictionaries "
                   f"are compared on (default {D.staleness_batches})")
    e.add_argument("-p", "--print-freq", type=int, help="TensorBoard step scalars every N steps")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("run")
    r.add_argument("--output", help=f"run folder (default {D.output})")
    r.add_argument("--resume", help="checkpoint to resume from, or 'auto' for the newest readable "
                   "one in --output; the run folder's config.yaml supplies every setting not given "
                   "as a flag, so 'moco pretrain --output DIR --resume auto' continues a run")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    r.add_argument("--save-every-steps", type=int, help="also checkpoint every N steps (0 = per epoch only)")
    r.add_argument("--keep-last", type=int, help=f"checkpoints to keep (default {D.keep_last}; 0 = all)")
    r.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, help="an unreadable image file: "
                   "stop = stop with an error naming it (after saving the steps done); skip = "
                   "replace it by the next readable image and count it (the count is logged and "
                   f"in metrics.jsonl as bad_images) (default {D.on_bad_image})")
    r.add_argument("--seed", type=int, help=f"seed for weights, data order and augmentation "
                   f"(default {D.seed})")
    r.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    r.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast on CUDA, fp32 on CPU")
    r.add_argument("--dist-timeout", type=float, metavar="MINUTES", help="under torchrun: a "
                   "collective that waits longer fails and stops the job (a dead or stuck rank); "
                   f"must exceed rank 0's kNN evaluation and checkpoint time (default {D.dist_timeout})")
    r.add_argument("--channels-last", type=_bool_or_auto, nargs="?", const=True,
                   help="channels_last memory format: true, false or auto (default: on CUDA only)")
    s = p.add_argument_group("input pipeline and speed")
    s.add_argument("--loader", choices=LOADERS, help="auto / tensor: decoded-image cache (when the "
                   "decoded images fit in memory, else decoding in workers) + batched augmentation "
                   "on the training device; pil: the original per-image PIL transforms in "
                   f"DataLoader workers (default {D.loader})")
    s.add_argument("--cache-dir", help="folder of the decoded-image cache, never inside DATA "
                   "(default $MOCO_CACHE, else ~/.cache/moco)")
    s.add_argument("--compile", type=_bool, nargs="?", const=True, help="torch.compile the "
                   "encoders (the first steps compile for a minute or more; default off)")
    p.set_defaults(run=run)


# Settings of one invocation, never taken from the resumed run's config.yaml.
PER_INVOCATION = {"resume", "stop_after_epochs", "time_limit"}
_NOT_CONFIG = {"command", "run", "config_file", "no_progress", "overwrite"}


def config_from_args(args: argparse.Namespace) -> MocoConfig:
    """Defaults <- preset <- --config FILE <- flags; with --resume, the run folder's saved
    config.yaml comes first, so only the flags given change it."""
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    yaml_path = getattr(args, "config_file", None)
    if values.get("resume"):
        file_values = load_yaml(yaml_path) if yaml_path else {}
        saved = saved_run_settings(values, file_values)
        if saved:
            return build_config(overrides={**saved, **file_values, **values})
    return build_config(yaml_path=yaml_path, overrides=values)


def saved_run_settings(flags: dict[str, Any], file_values: dict[str, Any]) -> dict[str, Any]:
    """The settings in ``config.yaml`` of the run being resumed ({} if there is none or it
    cannot be read). The run folder: --output, else the config file's, else the folder of the
    --resume checkpoint, else the default."""
    resume = str(flags.get("resume", ""))
    output = flags.get("output") or file_values.get("output")
    if not output:
        output = str(Path(resume).parent) if resume != "auto" else D.output
    path = Path(output) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        saved = load_yaml(path)
    except ValueError as e:  # e.g. cut short by a kill: the flags must then say everything
        print(f"warning: ignoring {path}: {e}", file=sys.stderr)
        return {}
    known = {f.name for f in fields(MocoConfig)}
    return {k: v for k, v in saved.items() if k in known and k not in PER_INVOCATION}


def run(args: argparse.Namespace) -> int:
    from moco.train import pretrain

    cfg = config_from_args(args)
    result = pretrain(cfg, progress=not getattr(args, "no_progress", False),
                      overwrite=getattr(args, "overwrite", False))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    last = result.history[-1] if result.history else {}
    print(f"checkpoint: {result.checkpoint}")
    if result.stopped_early:
        return 0
    if last:
        print(f"final: loss {last['loss']:.4f}, pretext acc@1 {last['acc1']:.1f}%"
              + (f", kNN top-1 {last['knn_top1']:.2f}%" if last.get("knn_top1") is not None else ""))
    return 0
