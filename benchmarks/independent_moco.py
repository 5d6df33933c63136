"""An independent, minimal MoCo v2 loop (after the original ``moco/builder.py`` and the CIFAR
demo's SplitBatchNorm), sharing no code with the ``moco`` package: torchvision's ResNet-18,
PIL transforms, a plain tensor queue. It exists to tell a recipe effect from a bug: run it
next to ``moco pretrain`` with the same settings and compare loss and pretext accuracy per
epoch (docs/long-cpu-run.md, "Why the v2 recipe learns slowly here").

    .venv/bin/python benchmarks/independent_moco.py --epochs 10          # v2 aug (with blur)
    .venv/bin/moco pretrain --config configs/demo.yaml --no-progress     # the same settings
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch import nn

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


class Blur:
    def __call__(self, x: Image.Image) -> Image.Image:
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class SplitBN(nn.BatchNorm2d):
    """The CIFAR demo's SplitBatchNorm: BN over ``s`` sub-batches in training."""

    def __init__(self, c: int, s: int = 8) -> None:
        super().__init__(c)
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        rm, rv = self.running_mean.repeat(self.s), self.running_var.repeat(self.s)
        out = F.batch_norm(x.view(-1, c * self.s, h, w), rm, rv, self.weight.repeat(self.s),
                           self.bias.repeat(self.s), True, self.momentum, self.eps).view(n, c, h, w)
        self.running_mean.copy_(rm.view(self.s, c).mean(0))
        self.running_var.copy_(rv.view(self.s, c).mean(0))
        return out


def encoder(mlp: bool) -> nn.Module:
    m = torchvision.models.resnet18(num_classes=128, norm_layer=SplitBN)
    if mlp:
        m.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), m.fc)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10/train")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.06)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--m", type=float, default=0.99)
    ap.add_argument("--t", type=float, default=0.2)
    ap.add_argument("--no-mlp", action="store_true")
    ap.add_argument("--no-blur", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    blur = [] if args.no_blur else [T.RandomApply([Blur()], p=0.5)]
    aug = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                     T.RandomGrayscale(0.2), *blur, T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(MEAN, STD)])
    ds = torchvision.datasets.ImageFolder(args.data, lambda x: (aug(x), aug(x)))
    idx = torch.randperm(len(ds))[:args.subset].tolist()
    dl = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=args.batch,
                                     shuffle=True, num_workers=2, drop_last=True, persistent_workers=True)
    f_q = encoder(not args.no_mlp)
    f_k = copy.deepcopy(f_q)
    for p in f_k.parameters():
        p.requires_grad = False
    queue = F.normalize(torch.randn(128, args.k), dim=0)
    ptr = 0
    opt = torch.optim.SGD(f_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    for ep in range(args.epochs):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * ep / args.epochs))
        for g in opt.param_groups:
            g["lr"] = lr
        t0, loss_sum, acc_sum, n = time.time(), 0.0, 0.0, 0
        for (x1, x2), _ in dl:
            q = F.normalize(f_q(x1), dim=1)
            with torch.no_grad():
                for pq, pk in zip(f_q.parameters(), f_k.parameters(), strict=True):
                    pk.mul_(args.m).add_(pq, alpha=1 - args.m)
                perm = torch.randperm(len(x2))
                k = F.normalize(f_k(x2[perm]), dim=1)[torch.argsort(perm)]
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.clone()], 1) / args.t
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            cols = (torch.arange(len(k)) + ptr) % args.k
            queue[:, cols] = k.T
            ptr = (ptr + len(k)) % args.k
            loss_sum += loss.item()
            acc_sum += (logits.argmax(1) == 0).float().mean().item() * 100
            n += 1
        print(f"epoch {ep + 1} lr {lr:.4f} loss {loss_sum / n:.3f} acc1 {acc_sum / n:.2f} "
              f"{n * args.batch / (time.time() - t0):.0f} img/s", flush=True)


if __name__ == "__main__":
    main()
