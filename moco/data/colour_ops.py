"""Per-pixel colour operations of the batched augmentation (:mod:`moco.data.batch_augment`)
on float images [N,3,H,W] in [0, 1], with a per-sample factor [N,1,1,1]: the tensor formulas
of torchvision's ``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale`` and
``solarize``."""

from __future__ import annotations

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] -> [N,1,H,W] luma, torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor | float, f: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a per-sample factor f [N,1,1,1]: f·x + (1-f)·other in
    [0, 1]."""
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, luma(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """HSV hue rotation by ``shift`` [N,1,1,1] (in turns), as torchvision's tensor op.

    RGB -> HSV as torchvision (Pillow's formulas), then back with the closed form
    c = v - (v - min)·clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b
    (v·s = v - min, so saturation never needs to be formed).
    """
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    rng = maxc - x.amin(dim=1)
    div = torch.where(rng == 0, 1.0, rng)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    # 6h before the wrap: (g-b)/rng if max is r, 2+(b-r)/rng if g, 4+(r-g)/rng if b
    h6 = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(rng, alpha=2.0),
                                               (r - g).add_(rng, alpha=4.0)))
    h6 = h6.div_(div).add_(shift[:, :, 0].mul(6.0)).remainder_(6.0).unsqueeze(1)
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1
    k = (h6 + n).remainder_(6.0)
    a = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - rng.unsqueeze(1) * a).clamp_(0.0, 1.0)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision's ``solarize`` of float images: every value >= ``threshold`` (in [0, 1];
    PIL's 128 levels are 128/255) becomes 1 - value."""
    return torch.where(x >= threshold, 1.0 - x, x)
