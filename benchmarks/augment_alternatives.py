"""How fast can the MoCo v2 augmentation of a uint8 batch be, with per-sample parameters?
The alternatives considered for ``moco.data.batch_augment`` (docs/benchmarks.md says which won and
why), timed on the same images, views per second (two views per image):

  ours             moco.data.batch_augment: separable matmul crop, tensor colour ops (the choice)
  ours: crop only  its crop+resize+flip step alone
  roi_align crop   torchvision.ops.roi_align per-sample boxes (no antialiasing when shrinking)
  grid_sample crop F.affine_grid + F.grid_sample (bilinear, no antialiasing)
  tv2 per image    torchvision.transforms.v2 (Compose of the recipe) on each image tensor
  PIL per image    moco.data.augment.pretrain_transform on PIL images (the original recipe)
  kornia           kornia.augmentation (if importable): crop, jitter, gray, blur, flip

Wall time (best of --repeat) and process CPU time per view are both printed: on a machine
shared with other jobs the CPU time is the steadier figure.

    .venv/bin/python benchmarks/augment_alternatives.py --batch 256 --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def timed(fn: Callable[[], object], views: int, repeat: int) -> tuple[float, float]:
    """(best views/s by wall clock, views per CPU-second of the best-CPU run)."""
    fn()
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    return views / best_wall, views / max(best_cpu, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="images (2 views each)")
    ap.add_argument("--size", type=int, default=32, help="source and crop size")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-slow", action="store_true", help="skip the per-image tv2/PIL loops")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from moco.data import batch_augment as BA
    from moco.data.augment import pretrain_transform

    b, s = args.batch, args.size
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    aug = BA.BatchAugment("v2", s, 0.2, mean, std)
    views = 2 * b
    rows: list[tuple[str, float, float]] = []

    def add(name: str, fn: Callable[[], object]) -> None:
        w, c = timed(fn, views, args.repeat)
        rows.append((name, w, c))
        print(f"{name:18s} {w:9.0f} views/s   {c:9.0f} views per CPU-s", flush=True)

    print(f"{b} images x 2 views, {s} px, v2 recipe, {torch.get_num_threads()} torch threads")
    add("ours", lambda: aug(imgs, g))
    p = aug.params(torch.full((b,), s), torch.full((b,), s), g)
    src = torch.arange(b).repeat(2)
    add("ours: crop only", lambda: BA.crop_resize(imgs, p, s, src))

    from torchvision.ops import roi_align

    boxes = torch.cat([src[:, None].float(), p.crop[:, [1, 0]].float(),
                       (p.crop[:, [1, 0]] + p.crop[:, [3, 2]]).float()], dim=1)

    def roi() -> torch.Tensor:
        x = imgs.permute(0, 3, 1, 2).float().div_(255)
        return roi_align(x, boxes, output_size=s, spatial_scale=1.0, sampling_ratio=2, aligned=True)

    add("roi_align crop", roi)

    def grid() -> torch.Tensor:
        x = imgs.permute(0, 3, 1, 2).float().div_(255).index_select(0, src)
        i, j, h, w = (p.crop[:, k].float() for k in range(4))
        theta = torch.zeros(2 * b, 2, 3)
        theta[:, 0, 0] = w / s * torch.where(p.flip, -1.0, 1.0)
        theta[:, 0, 2] = (2 * j + w) / s - 1
        theta[:, 1, 1] = h / s
        theta[:, 1, 2] = (2 * i + h) / s - 1
        return F.grid_sample(x, F.affine_grid(theta, [2 * b, 3, s, s], align_corners=False),
                             mode="bilinear", padding_mode="border", align_corners=False)

    add("grid_sample crop", grid)

    if not args.skip_slow:
        from torchvision.transforms import v2

        tv2 = v2.Compose([
            v2.RandomResizedCrop(s, scale=(0.2, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(13, (0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std))])
        chw = imgs.permute(0, 3, 1, 2)
        add("tv2 per image", lambda: [tv2(chw[k]) for k in range(b) for _ in range(2)])
        pil_tf = pretrain_transform("v2", s, 0.2, mean, std)
        pils = [Image.fromarray(a) for a in imgs.numpy()]
        add("PIL per image", lambda: [pil_tf(im) for im in pils for _ in range(2)])
    try:
        import kornia.augmentation as K
    except ImportError:
        print("kornia: not installed (pip install kornia to include it)")
    else:
        kaug = K.AugmentationSequential(
            K.RandomResizedCrop((s, s), scale=(0.2, 1.0)),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((13, 13), (0.1, 2.0), p=0.5), K.RandomHorizontalFlip(),
            K.Normalize(torch.tensor(mean), torch.tensor(std)))

        def kor() -> torch.Tensor:
            x = imgs.permute(0, 3, 1, 2).float().div_(255)
            return torch.cat([kaug(x), kaug(x)])

        add("kornia", kor)
    base = dict((n, w) for n, w, _ in rows)
    if "PIL per image" in base:
        print(f"ours / PIL per image (1 process): {base['ours'] / base['PIL per image']:.1f}x")
    _ = np  # numpy is imported for PIL's array conversion


if __name__ == "__main__":
    main()
