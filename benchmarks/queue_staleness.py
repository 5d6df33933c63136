"""Are the queue's keys easier negatives than fresh ones? A check of the stale-key reading
in docs/ablations.md (queue size, v2 Table 1: the loss rises when the lr drops).

For a MoCo checkpoint (with its run folder's config.yaml): InfoNCE loss, pretext acc@1 and the
mean query-negative cosine of ``--batches`` training batches (the run's augmentation,
shuffling BN, BN in training mode as in training) against

  (a) the checkpoint's own queue: K keys from the last K / batch steps' key encoders;
  (b) K fresh keys: random training images encoded now by the checkpoint's key encoder.

Stale keys come from older encoders the queries have moved away from: if they are easier
negatives, (a) shows a lower loss, a higher acc@1 and a lower mean cosine than (b).

    .venv/bin/python benchmarks/queue_staleness.py runs/ablations/v2_table1/v1/checkpoint_0009.pth.tar
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from moco.checkpoint import from_original_layout, load_checkpoint
from moco.config import build_config
from moco.data import find_dataset
from moco.loader import make_train_loader
from moco.loss import info_nce, moco_logits, top1_accuracy
from moco.model import MoCo
from moco.shuffle_bn import LocalShuffle
from moco.train import build_model


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
    model.train()
    loader = make_train_loader(cfg, find_dataset(cfg.data).train, device, workers=0)
    shuffle = LocalShuffle(torch.Generator().manual_seed(0))
    k_size = model.key_queue.queue.shape[1]
    with torch.no_grad():
        fresh = []
        batches = loader.batches(epoch=cfg.epochs + 1)  # an order no training epoch used
        while sum(x.shape[0] for x in fresh) < k_size:
            fresh.append(model.encode_key(next(batches).im_k, shuffle))
        negatives = {"(a) the checkpoint's queue": model.key_queue.negatives(),
                     "(b) fresh keys, current f_k": torch.cat(fresh)[:k_size].T.contiguous()}
        measured = list(itertools.islice(loader.batches(epoch=cfg.epochs + 2), args.batches))
        print(f"{ckpt_path}: K {k_size}, T {cfg.moco_t}, {args.batches} batches of {cfg.batch_size}")
        for name, neg in negatives.items():
            losses, accs, cos = [], [], []
            for b in measured:
                q = model.encode_query(b.im_q)
                k = model.encode_key(b.im_k, shuffle)
                logits = moco_logits(q, k, neg, cfg.moco_t)
                losses.append(float(info_nce(logits)))
                accs.append(top1_accuracy(logits))
                cos.append(float((q @ neg).mean()))
            n = len(measured)
            print(f"  {name:30s} loss {sum(losses) / n:.3f}  acc@1 {sum(accs) / n:5.1f}%  "
                  f"mean cos(q, negative) {sum(cos) / n:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
