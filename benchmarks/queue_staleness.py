"""Are the queue's keys easier negatives than fresh ones? A check of the stale-key reading
in docs/ablations.md (queue size, v2 Table 1: the loss rises when the lr drops).

For a MoCo checkpoint (with its run folder's config.yaml): InfoNCE loss, pretext acc@1 and the
mean query-negative cosine of ``--batches`` training batches (the run's augmentation,
shuffling BN, BN in training mode as in training) against

  (a) the checkpoint's own queue: K keys from the last K / batch steps' key encoders;
  (b) K fresh keys: random training images encoded now by the checkpoint's key encoder.

Stale keys come from older encoders the queries have moved away from: if they are easier
negatives, (a) shows a lower loss, a higher acc@1 and a lower mean cosine than (b).
The measurement is moco.engine.staleness (also logged per epoch by ``moco pretrain --staleness-every``).

    .venv/bin/python benchmarks/queue_staleness.py runs/ablations/v2_table1/v1/checkpoint_0009.pth.tar
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moco.core.model import MoCo
from moco.core.shuffle_bn import LocalShuffle, NoShuffle
from moco.data.loaders import make_train_loader
from moco.data.splits import find_dataset
from moco.engine.build import build_model
from moco.engine.config_sources import build_config
from moco.engine.staleness import measure_staleness
from moco.utils.checkpoint import from_original_layout, load_checkpoint
from moco.utils.runtime import resolve_precision


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=8, help="training batches to measure on")
    args = p.parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    cfg = build_config(yaml_path=ckpt_path.parent / "config.yaml",
                       overrides={"device": "cpu", "output": "", "resume": ""})
    device = torch.device("cpu")
    model = build_model(cfg, device)
    assert isinstance(model, MoCo), "a MoCo checkpoint (--mechanism moco)"
    model.load_state_dict(from_original_layout(load_checkpoint(ckpt_path)["state_dict"]))
    loader = make_train_loader(cfg, find_dataset(cfg.data).train, device, workers=0)
    split = cfg.shuffle_bn in ("auto", "split", "ddp", "syncbn")  # one process: shuffled splits
    r = measure_staleness(
        model, loader, lambda: LocalShuffle(torch.Generator().manual_seed(0)) if split else NoShuffle(),
        batches=args.batches, autocast_dtype=resolve_precision(cfg.precision, device))
    print(f"{ckpt_path}: K {model.key_queue.size}, T {cfg.moco_t}, {args.batches} batches of "
          f"{cfg.batch_size}")
    for name, loss, acc, cos in (("(a) the checkpoint's queue", r.queue_loss, r.queue_acc1, r.queue_cos),
                                 ("(b) fresh keys, current f_k", r.fresh_loss, r.fresh_acc1, r.fresh_cos)):
        print(f"  {name:30s} loss {loss:.3f}  acc@1 {acc:5.1f}%  mean cos(q, negative) {cos:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
