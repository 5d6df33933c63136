"""Per-image augmentation recipes (REFERENCE.md §5, §6.1), as torchvision transforms on PIL.

All randomness comes from torch's generator (torchvision's transforms draw from it), so one
``torch.manual_seed`` per sample fixes both views (see :class:`TwoViews`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

Transform = Callable[[Image.Image], torch.Tensor]


class PILGaussianBlur:
    """``moco/loader.py``'s GaussianBlur: σ ~ U(σ_min, σ_max), PIL blur with radius σ.

    σ is drawn from torch's generator rather than Python's ``random`` (same distribution), so
    a per-sample torch seed fixes it. σ is in pixels of the crop, as the original (which had
    224 px crops): it is not rescaled for small images.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        s = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self) -> str:
        return f"PILGaussianBlur(sigma={self.sigma})"


def pretrain_transform(
    aug: str,
    image_size: int,
    crop_min_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> T.Compose:
    """One view's pipeline.

    v1 (InstDisc): crop, grayscale p0.2, ColorJitter(0.4,0.4,0.4,0.4) always, flip.
    v2 (aug+):     crop, jitter(0.4,0.4,0.4,0.1) p0.8, grayscale p0.2, blur p0.5, flip.
    cifar-demo:    crop, flip, jitter(0.4,0.4,0.4,0.1) p0.8, grayscale p0.2 (no blur).
    """
    crop = T.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0))
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if aug == "v1":
        ops: list[object] = [crop, T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4),
                             T.RandomHorizontalFlip()]
    elif aug == "v2":
        ops = [crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               T.RandomGrayscale(p=0.2), T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
               T.RandomHorizontalFlip()]
    elif aug == "cifar-demo":
        ops = [crop, T.RandomHorizontalFlip(p=0.5),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    else:
        raise ValueError(f"unknown augmentation {aug!r}; choose v1, v2 or cifar-demo")
    return T.Compose(ops + tail)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """No augmentation: resize the short side and center-crop.

    224 px: Resize(256) + CenterCrop(224) as ``main_lincls.py``; small inputs (<= 64 px, e.g.
    CIFAR) are only resized to ``image_size`` and center-cropped, as the demo's test transform.
    """
    resize = image_size if image_size <= 64 else round(image_size * 256 / 224)
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean=list(mean), std=list(std))])


class TwoViews:
    """``TwoCropsTransform``: the same pipeline applied twice, independent draws.

    Called with ``(img, seed)``, the draws depend on ``seed`` only (the global torch RNG is
    restored afterwards), so a sample's views do not depend on worker count or order.
    """

    def __init__(self, base: Transform) -> None:
        self.base = base

    def __call__(self, img: Image.Image, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if seed is None:
            return self.base(img), self.base(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base(img), self.base(img)
