"""Random parameters of the batched augmentation (:mod:`moco.data.batch_augment`): per-sample
parameters of the recipes of :mod:`moco.data.recipes` (the table the PIL path is built from
too).

Every sample gets its own random parameters, drawn on the CPU from a ``torch.Generator`` with
the same distributions as torchvision's transforms (:func:`sample_params`), so they are
bit-identical on any training device:

* crop: ``RandomResizedCrop.get_params`` - area fraction ~ U(scale), log-ratio ~ U(log 3/4,
  log 4/3), w/h rounded half-to-even, 10 tries, then the center-crop fallback;
* ``ColorJitter``: brightness/contrast/saturation ~ U[1-x, 1+x], hue ~ U[-h, h], the four ops
  in a uniformly random order per sample, applied with ``RandomApply`` p;
* grayscale with p, Gaussian blur σ ~ U(0.1, 2.0) with p, horizontal flip with p 0.5;
* solarize with p, drawn last and only by recipes that have the step (the other recipes'
  draws, hence their seeded views, do not depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from moco.data.recipes import BLUR_SIGMA, Recipe, make_recipe

__all__ = ["BLUR_SIGMA", "AugParams", "Recipe", "make_recipe", "sample_crops", "sample_params"]

@dataclass
class AugParams:
    """Per-sample parameters of N views (CPU tensors).

    crop [N,4] int64 (top i, left j, height h, width w) as ``RandomResizedCrop.get_params``;
    flip, jitter, gray, blur, solarize [N] bool (applied or not); brightness, contrast,
    saturation, hue, sigma [N] float64; order [N,4] int64: a permutation of 0..3
    (0 brightness, 1 contrast, 2 saturation, 3 hue, torchvision's ``fn_idx``).
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def select(self, idx: torch.Tensor | slice) -> AugParams:
        """The parameters of the samples ``idx``."""
        return AugParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def cat(parts: Sequence[AugParams]) -> AugParams:
        return AugParams(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                            for f in fields(AugParams)})


def _uniform(n: int | tuple[int, ...], lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    shape = (n,) if isinstance(n, int) else n
    return torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo


def sample_crops(heights: torch.Tensor, widths: torch.Tensor, scale: tuple[float, float],
                 ratio: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for N images of sizes ``heights`` x ``widths`` [N].

    Returns [N,4] int64 (i, j, h, w): the first of 10 tries whose box fits, else the
    center crop with the ratio clamped into ``ratio``.
    """
    hh, ww = heights.to(torch.float64), widths.to(torch.float64)
    n, tries = len(heights), 10
    area = (hh * ww)[:, None]
    target = area * _uniform((n, tries), scale[0], scale[1], g)
    log_r = _uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), g)
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * ar))  # torch.round is half-to-even, as Python's round
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])
    first = torch.argmax(ok.to(torch.int8), dim=1)
    found = ok.any(dim=1)
    h1 = h.gather(1, first[:, None])[:, 0]
    w1 = w.gather(1, first[:, None])[:, 0]
    u = torch.rand((n, 2), generator=g, dtype=torch.float64)
    i1 = torch.floor(u[:, 0] * (hh - h1 + 1))
    j1 = torch.floor(u[:, 1] * (ww - w1 + 1))
    # center-crop fallback
    in_ratio = ww / hh
    lo, hi = min(ratio), max(ratio)
    fw = torch.where(in_ratio < lo, ww, torch.where(in_ratio > hi, torch.round(hh * hi), ww))
    fh = torch.where(in_ratio < lo, torch.round(ww / lo), hh)
    fi = torch.div(hh - fh, 2, rounding_mode="floor")
    fj = torch.div(ww - fw, 2, rounding_mode="floor")
    out = torch.stack([torch.where(found, i1, fi), torch.where(found, j1, fj),
                       torch.where(found, h1, fh), torch.where(found, w1, fw)], dim=1)
    return out.to(torch.int64)


def sample_params(recipe: Recipe, heights: torch.Tensor, widths: torch.Tensor,
                  g: torch.Generator) -> AugParams:
    """Draw one view's parameters for N images (sizes ``heights``, ``widths`` [N]) from ``g``."""
    n = len(heights)
    crop = sample_crops(heights, widths, recipe.scale, recipe.ratio, g)
    b, c, s, h = recipe.jitter
    u = torch.rand((n, 4), generator=g, dtype=torch.float64)
    p = AugParams(
        crop=crop,
        flip=u[:, 0] < recipe.flip_p,
        jitter=u[:, 1] < recipe.jitter_p,
        brightness=_uniform(n, max(0.0, 1 - b), 1 + b, g),
        contrast=_uniform(n, max(0.0, 1 - c), 1 + c, g),
        saturation=_uniform(n, max(0.0, 1 - s), 1 + s, g),
        hue=_uniform(n, -h, h, g),
        order=torch.argsort(torch.rand((n, 4), generator=g), dim=1),
        gray=u[:, 2] < recipe.gray_p,
        blur=u[:, 3] < recipe.blur_p,
        sigma=_uniform(n, recipe.blur_sigma[0], recipe.blur_sigma[1], g),
        solarize=torch.zeros(n, dtype=torch.bool),
    )
    if "solarize" in recipe.order:
        p.solarize = torch.rand(n, generator=g, dtype=torch.float64) < recipe.solarize_p
    return p
