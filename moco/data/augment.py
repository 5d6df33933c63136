"""The augmentation recipes of :mod:`moco.data.recipes` as torchvision transforms on PIL
images (the per-image path, ``--loader pil``), and the evaluation transform.

All randomness comes from torch's generator (torchvision's transforms draw from it), so one
``torch.manual_seed`` per sample fixes both views (see :class:`TwoViews`). An asymmetric
recipe (``v3``) gives each view its own pipeline: build the pair with
:func:`two_view_transform`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moco.core.seeding import seeded
from moco.data.recipes import BLUR_SIGMA, Recipe, eval_resize_size, make_recipe

Transform = Callable[[Image.Image], torch.Tensor]


class PILGaussianBlur:
    """``moco/loader.py``'s GaussianBlur: σ ~ U(σ_min, σ_max), PIL blur with radius σ.

    σ is drawn from torch's generator rather than Python's ``random`` (same distribution), so
    a per-sample torch seed fixes it. σ is in pixels of the crop, as the original (which had
    224 px crops): it is not rescaled for small images.
    """

    def __init__(self, sigma: Sequence[float] = BLUR_SIGMA) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        s = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self) -> str:
        return f"PILGaussianBlur(sigma={self.sigma})"


def _pil_step(step: str, r: Recipe) -> object:
    """One step of a recipe as a torchvision transform on PIL images."""
    if step == "flip":
        return T.RandomHorizontalFlip(p=r.flip_p)
    if step == "gray":
        return T.RandomGrayscale(p=r.gray_p)
    if step == "blur":
        return T.RandomApply([PILGaussianBlur(r.blur_sigma)], p=r.blur_p)
    if step == "solarize":  # PIL's ImageOps.solarize: levels >= threshold inverted
        return T.RandomSolarize(r.solarize_threshold, p=r.solarize_p)
    jitter = T.ColorJitter(*r.jitter)
    return jitter if r.jitter_p >= 1 else T.RandomApply([jitter], p=r.jitter_p)


def pretrain_transform(
    aug: str,
    image_size: int,
    crop_min_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    view: int = 0,
) -> T.Compose:
    """One view's pipeline: the recipe ``aug`` of :data:`moco.data.recipes.RECIPES` (v1,
    v2, cifar-demo, v3, ...) after ``RandomResizedCrop(image_size, scale=(crop_min_scale,
    1))``, then ToTensor and Normalize(mean, std). ``view`` 0 or 1: which view's pipeline
    (they differ for an asymmetric recipe only)."""
    if view not in (0, 1):
        raise ValueError(f"view is 0 or 1, got {view}")
    r = make_recipe(aug, crop_min_scale).views()[view]
    ops = [T.RandomResizedCrop(image_size, scale=r.scale, ratio=r.ratio)]
    ops += [_pil_step(step, r) for step in r.order]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def two_view_transform(
    aug: str,
    image_size: int,
    crop_min_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> TwoViews:
    """The pair transform of the recipe ``aug``: one pipeline applied twice for a symmetric
    recipe (``TwoCropsTransform``), each view's own for an asymmetric one (MoCo v3's
    ``TwoCropsTransform(augmentation1, augmentation2)``). Arguments as
    :func:`pretrain_transform`."""
    first = pretrain_transform(aug, image_size, crop_min_scale, mean, std)
    if not make_recipe(aug, crop_min_scale).asymmetric:
        return TwoViews(first)
    return TwoViews(first, pretrain_transform(aug, image_size, crop_min_scale, mean, std, view=1))


class ToRGB:
    """A PIL image of any mode (L, P, RGBA, CMYK, I;16, ...) as RGB; RGB images unchanged."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """No augmentation: resize the short side to :func:`moco.data.recipes.eval_resize_size`
    (256 for 224 px, as ``main_lincls.py``; small inputs such as CIFAR's 32 px only to
    ``image_size``, as the CIFAR-10 notebook's test transform) and center-crop. Images of
    any mode (L, P, RGBA, CMYK, ...) are converted to RGB first: 3 channels out."""
    return T.Compose([ToRGB(), T.Resize(eval_resize_size(image_size)),
                      T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean=list(mean), std=list(std))])


class TwoViews:
    """``TwoCropsTransform``: the same pipeline applied twice (or, with ``second``, ``base``
    for the first view and ``second`` for the other), independent draws.

    Called with ``(img, seed)``, the draws depend on ``seed`` only (the global torch RNG is
    restored afterwards), so a sample's views do not depend on worker count or order.
    """

    def __init__(self, base: Transform, second: Transform | None = None) -> None:
        self.base = base
        self.second = second if second is not None else base

    def __call__(self, img: Image.Image, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if seed is None:
            return self.base(img), self.second(img)
        with seeded(seed):
            return self.base(img), self.second(img)
