"""Batched augmentation on the training device: the recipes of :mod:`moco.augment`
(REFERENCE.md §5.1-5.5, §6.1) applied to a whole uint8 batch at once.

Every sample gets its own random parameters, drawn from a ``torch.Generator`` with the same
distributions as torchvision's transforms (:func:`sample_params`):

* crop: ``RandomResizedCrop.get_params`` - area fraction ~ U(scale), log-ratio ~ U(log 3/4,
  log 4/3), w/h rounded half-to-even, 10 tries, then the center-crop fallback;
* ``ColorJitter``: brightness/contrast/saturation ~ U[1-x, 1+x], hue ~ U[-h, h], the four ops
  in a uniformly random order per sample, applied with ``RandomApply`` p;
* grayscale with p, Gaussian blur σ ~ U(0.1, 2.0) with p, horizontal flip with p 0.5.

Applying them (:func:`apply_params`) matches torchvision's functional ops on float tensors:

* crop + resize is separable: ``out = Wy @ img @ Wxᵀ`` with per-sample weight matrices
  [S, H] and [S, W] holding PIL's / torchvision's antialiased bilinear coefficients (the same
  triangle filter, widened when shrinking), zero outside the crop box. A flip reverses Wx's
  rows (flip commutes with every later op: they are per-pixel, use the global mean, or are
  symmetric). ``/255`` is folded in. One batched matmul does every crop of the batch.
* jitter ops are the tensor formulas of ``adjust_brightness/contrast/saturation/hue`` with
  a per-sample factor; the random order is applied position by position.
* blur is torchvision's ``gaussian_blur`` (kernel 13 = 2·⌈3·σ_max⌉+1, reflect padding) as a
  per-sample separable matrix product ([S, S] per sample, reflect padding folded in).
  The original blurs with PIL's extended box filter of radius σ, which is the same Gaussian
  up to its box-filter approximation.

The per-image PIL pipeline rounds to uint8 after every op; this one stays in float32, so
outputs agree with PIL to within a few 1/255 levels (the tests check both references).
Works on CPU and CUDA alike: parameters are drawn on the CPU (bit-identical on any device),
images live on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

BLUR_SIGMA = (0.1, 2.0)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation. ``order`` lists the colour steps after crop+flip."""

    name: str
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    flip_p: float = 0.5
    order: tuple[str, ...] = ("jitter", "gray", "blur")


def make_recipe(aug: str, crop_min_scale: float) -> Recipe:
    """The recipe of ``moco.augment.pretrain_transform(aug, ...)`` (REFERENCE.md §5.1/5.2, §6.1).

    v1: crop, grayscale p0.2, ColorJitter(0.4,0.4,0.4,0.4) always, flip.
    v2: crop, jitter(0.4,0.4,0.4,0.1) p0.8, grayscale p0.2, blur p0.5, flip.
    cifar-demo: crop, flip, jitter(0.4,0.4,0.4,0.1) p0.8, grayscale p0.2.
    """
    scale = (crop_min_scale, 1.0)
    if aug == "v1":
        return Recipe("v1", scale, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                      order=("gray", "jitter"))
    if aug == "v2":
        return Recipe("v2", scale, blur_p=0.5, order=("jitter", "gray", "blur"))
    if aug == "cifar-demo":
        return Recipe("cifar-demo", scale, order=("jitter", "gray"))
    raise ValueError(f"unknown augmentation {aug!r}; choose v1, v2 or cifar-demo")


@dataclass
class AugParams:
    """Per-sample parameters of N views (CPU tensors).

    crop [N,4] int64 (top i, left j, height h, width w) as ``RandomResizedCrop.get_params``;
    flip, jitter, gray, blur [N] bool (applied or not); brightness, contrast, saturation,
    hue, sigma [N] float64; order [N,4] int64: a permutation of 0..3 (0 brightness,
    1 contrast, 2 saturation, 3 hue, torchvision's ``fn_idx``).
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
    return AugParams(
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
        sigma=_uniform(n, BLUR_SIGMA[0], BLUR_SIGMA[1], g),
    )


# ----- applying parameters ----------------------------------------------------------------

def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                     flip: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                     window: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Antialiased bilinear weights [N, out_size, in_size] (float32) of "crop [start,
    start+length) then resize to out_size", as PIL's / torchvision's (``antialias=True``)
    resampling: output o samples the source around ``start + (o + 0.5) * scale`` with a
    triangle filter widened by the downscale factor, renormalised inside ``window``.

    By default ``scale = length / out_size`` and ``window = [start, start + length)`` (a
    crop); other values express "resize, then take out_size pixels from an offset" (the eval
    center crop). ``flip`` [N] bool reverses the output order (horizontal flip). Built on
    ``start``'s device.
    """
    f32, dev = torch.float32, start.device
    start = start.to(f32)[:, None, None]
    length = length.to(f32)[:, None, None]
    scale = length / out_size if scale is None else scale.to(f32)[:, None, None]
    lo, hi = (start, start + length) if window is None else (
        window[0].to(f32)[:, None, None], window[1].to(f32)[:, None, None])
    inv_support = 1.0 / scale.clamp(min=1.0)
    o = torch.arange(out_size, dtype=f32, device=dev)[None, :, None]
    if flip is not None:
        o = torch.where(flip.to(dev)[:, None, None], (out_size - 1) - o, o)
    center = start + (o + 0.5) * scale - 0.5  # [N, out, 1], in pixel-index units
    p = torch.arange(in_size, dtype=f32, device=dev)[None, None, :]
    w = (p - center).abs_().mul_(inv_support).neg_().add_(1.0).clamp_(min=0.0)
    w.mul_((p >= lo) & (p < hi))
    return w.div_(w.sum(dim=2, keepdim=True))


def blur_matrices(sigma: torch.Tensor, size: int, kernel: int) -> torch.Tensor:
    """[N, size, size] matrices of torchvision's ``gaussian_blur`` along one axis (kernel
    ``kernel``, σ per sample, reflect padding folded in), float32 on ``sigma``'s device."""
    half, dev = kernel // 2, sigma.device
    x = torch.linspace(-half, half, kernel, dtype=torch.float32, device=dev)
    k = torch.exp(-0.5 * (x[None, :] / sigma.to(torch.float32)[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # [N, kernel]
    # reflect padding: source index of tap t at output o
    src = (torch.arange(size, device=dev)[:, None]
           + torch.arange(-half, half + 1, device=dev)[None, :])
    src = torch.where(src < 0, -src, src)
    src = torch.where(src >= size, 2 * (size - 1) - src, src)
    m = torch.zeros((len(sigma), size, size), dtype=torch.float32, device=dev)
    idx = src[None].expand(len(sigma), -1, -1)
    m.scatter_add_(2, idx, k[:, None, :].expand(-1, size, -1).contiguous())
    return m


def blur_kernel_size(sigma_max: float = BLUR_SIGMA[1]) -> int:
    """2·⌈3·σ_max⌉+1 (13 for σ ≤ 2): the kernel covers ±3σ of every sample's Gaussian."""
    return 2 * math.ceil(3 * sigma_max) + 1


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] -> [N,1,H,W] luma, torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, f: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a per-sample factor f [N,1,1,1]."""
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


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
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (h6 + n).remainder_(6.0)
    a = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - rng.unsqueeze(1) * a).clamp_(0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def color_jitter(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    """ColorJitter on the samples with ``p.jitter``, each with its own factors and op order."""
    factors = [p.brightness, p.contrast, p.saturation, p.hue]
    for pos in range(4):
        for op in range(4):
            sel = p.jitter & (p.order[:, pos] == op)
            if not bool(sel.any()):
                continue
            if bool(sel.all()):
                x = _JITTER_OPS[op](x, _col(factors[op], x))
                continue
            idx = sel.nonzero()[:, 0].to(x.device)
            sub = _JITTER_OPS[op](x.index_select(0, idx), _col(factors[op][sel], x))
            x.index_copy_(0, idx, sub)
    return x


def grayscale(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """3-channel grayscale where ``on`` [N] is true."""
    if not bool(on.any()):
        return x
    return torch.where(on.to(x.device).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, on: torch.Tensor, sigma: torch.Tensor,
                  kernel: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur (σ per sample) on the samples where ``on`` [N] is true."""
    if not bool(on.any()):
        return x
    kernel = kernel or blur_kernel_size()
    idx = on.nonzero()[:, 0]
    _, _, hgt, wid = x.shape
    sig = sigma[idx].to(x.device)
    by = blur_matrices(sig, hgt, kernel).to(x.dtype)
    bx = by if hgt == wid else blur_matrices(sig, wid, kernel).to(x.dtype)
    idx = idx.to(x.device)
    sub = torch.matmul(torch.matmul(by[:, None], x.index_select(0, idx)), bx[:, None].transpose(-1, -2))
    return x.index_copy_(0, idx, sub)


def _separable(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """out[n,c] = wy[n] @ x[n,:,:,c] @ wx[n]ᵀ: x float [N,H,W,3] (channels last, as stored),
    wy [N,S,H], wx [N,T,W] -> [N,3,S,T] contiguous. Two batched matmuls."""
    n, hgt, wid, _ = x.shape
    s, t = wy.shape[1], wx.shape[1]
    y = torch.bmm(wy, x.reshape(n, hgt, wid * 3))  # [N, S, W*3]
    y = y.view(n, s, wid, 3).transpose(2, 3).reshape(n, s * 3, wid)  # [N, S*3, W]
    out = torch.bmm(y, wx.transpose(1, 2))  # [N, S*3, T]
    return out.view(n, s, 3, t).transpose(1, 2).contiguous()


def crop_resize(images: torch.Tensor, p: AugParams, size: int,
                source: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``p.crop`` of each image, resize to ``size`` (antialiased bilinear), flip where
    ``p.flip``, scale to [0, 1].

    images: uint8 [M,H,W,3] (channels last, as stored) on the device; ``source`` [N] int64
    picks the image of each of the N views (default: view n uses image n).
    Returns float32 [N,3,size,size].
    """
    m, hgt, wid, _ = images.shape
    dev = images.device
    crop = p.crop.to(dev)  # the weights are built on the device: [N,S,H] is large at 224 px
    wy = resample_weights(crop[:, 0], crop[:, 2], hgt, size).mul_(1.0 / 255.0)
    wx = resample_weights(crop[:, 1], crop[:, 3], wid, size, p.flip.to(dev))
    if source is not None:
        images = images.index_select(0, source.to(dev))
    elif m != len(p.crop):
        raise ValueError(f"{m} images for {len(p.crop)} views: pass source")
    return _separable(images.to(torch.float32), wy, wx)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def apply_params(images: torch.Tensor, p: AugParams, recipe: Recipe, size: int,
                 mean: Sequence[float] | None, std: Sequence[float] | None,
                 source: torch.Tensor | None = None) -> torch.Tensor:
    """The recipe with parameters ``p`` on uint8 [M,H,W,3] images -> float32 [N,3,size,size]
    (normalised with ``mean``/``std`` unless they are None)."""
    x = crop_resize(images, p, size, source)
    for step in recipe.order:
        if step == "jitter":
            x = color_jitter(x, p)
        elif step == "gray":
            x = grayscale(x, p.gray)
        elif step == "blur":
            x = gaussian_blur(x, p.blur, p.sigma)
    if mean is not None and std is not None:
        x = normalize(x, mean, std)
    return x


class BatchAugment:
    """Two independent views of every image of a uint8 batch, on the batch's device.

    ``aug`` / ``image_size`` / ``crop_min_scale`` / ``mean`` / ``std`` as
    :func:`moco.augment.pretrain_transform`.
    """

    def __init__(self, aug: str, image_size: int, crop_min_scale: float,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.recipe = make_recipe(aug, crop_min_scale)
        self.size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def params(self, heights: torch.Tensor, widths: torch.Tensor, g: torch.Generator) -> AugParams:
        """Parameters of 2N views: the N query views, then the N key views."""
        q = sample_params(self.recipe, heights, widths, g)
        k = sample_params(self.recipe, heights, widths, g)
        return AugParams.cat([q, k])

    def two_views(self, images: torch.Tensor, p: AugParams) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N,H,W,3] and the 2N views' parameters -> (im_q, im_k), float32 [N,3,S,S]."""
        n = images.shape[0]
        src = torch.arange(n).repeat(2)
        x = apply_params(images, p, self.recipe, self.size, self.mean, self.std, src)
        return x[:n], x[n:]

    def __call__(self, images: torch.Tensor, g: torch.Generator,
                 sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N,H,W,3] (``sizes`` [N,2]: each image's valid height and width, top-left,
        when they differ from the array's) -> (im_q, im_k) float32 [N,3,S,S]."""
        n, hgt, wid, _ = images.shape
        if sizes is None:
            heights = torch.full((n,), hgt, dtype=torch.int64)
            widths = torch.full((n,), wid, dtype=torch.int64)
        else:
            heights, widths = sizes[:, 0].cpu(), sizes[:, 1].cpu()
        return self.two_views(images, self.params(heights, widths, g))


def eval_resize(images: torch.Tensor, size: int, resize: int,
                sizes: torch.Tensor | None = None) -> torch.Tensor:
    """``T.Resize(resize)`` + ``T.CenterCrop(size)`` + ``ToTensor`` on uint8 [N,H,W,3]
    (each image's valid (h, w) in ``sizes`` [N,2], default the full array) -> float32
    [N,3,size,size] in [0, 1], as :func:`moco.augment.eval_transform` without Normalize.

    The resize keeps the aspect ratio (short side -> ``resize``, long side
    ``int(resize * long / short)``) and the crop takes rows/columns
    ``round((resized - size) / 2)`` on; both are folded into one weight matrix per axis.
    """
    n, hgt, wid, _ = images.shape
    if sizes is None:
        hs = torch.full((n,), hgt, dtype=torch.int64)
        ws = torch.full((n,), wid, dtype=torch.int64)
    else:
        hs, ws = sizes[:, 0].cpu().to(torch.int64), sizes[:, 1].cpu().to(torch.int64)
    short = torch.minimum(hs, ws).to(torch.float64)
    nh = torch.where(hs <= ws, resize, torch.floor(resize * hs / short)).to(torch.float64)
    nw = torch.where(ws <= hs, resize, torch.floor(resize * ws / short)).to(torch.float64)
    if bool((nh < size).any() or (nw < size).any()):
        raise ValueError(f"resize {resize} is smaller than the crop {size}")
    mats, dev = [], images.device
    for full, new, in_size in ((hs, nh, hgt), (ws, nw, wid)):
        sc = full.to(torch.float64) / new
        top = torch.round((new - size) / 2.0)  # torchvision's int(round(...)), half-to-even
        zero = torch.zeros_like(sc)
        mats.append(resample_weights((top * sc).to(dev), full.to(dev), in_size, size,
                                     scale=sc.to(dev), window=(zero.to(dev), full.to(dev))))
    return _separable(images.to(torch.float32), mats[0].mul_(1.0 / 255.0), mats[1])
