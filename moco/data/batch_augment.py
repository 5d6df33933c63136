"""Batched augmentation on the training device: the recipes of :mod:`moco.data.recipes` (the
table the per-image PIL path is built from too) applied to a whole uint8 batch at once, with
per-sample parameters drawn on the CPU (:mod:`moco.data.aug_params`).

Applying them (:func:`apply_params`) matches torchvision's functional ops on float tensors:

* crop + resize is separable: ``out = Wy @ img @ Wxᵀ`` with per-sample weight matrices
  [S, H] and [S, W] holding PIL's / torchvision's antialiased bilinear coefficients (the same
  triangle filter, widened when shrinking), zero outside the crop box. A flip reverses Wx's
  rows (flip commutes with every later op: they are per-pixel, use the global mean, or are
  symmetric). ``/255`` is folded in. One batched matmul does every crop of the batch.
* jitter ops are the tensor formulas of ``adjust_brightness/contrast/saturation/hue`` with
  a per-sample factor (:mod:`moco.data.colour_ops`); the random order is applied position
  by position. Solarize is torchvision's ``solarize`` at the recipe's threshold / 255.
* blur is torchvision's ``gaussian_blur`` (kernel 13 = 2·⌈3·σ_max⌉+1, reflect padding) as a
  per-sample separable matrix product ([S, S] per sample, reflect padding folded in).
  The original blurs with PIL's extended box filter of radius σ, which is the same Gaussian
  up to its box-filter approximation.

The per-image PIL pipeline rounds to uint8 after every op; this one stays in float32, so
outputs agree with PIL to within a few 1/255 levels (the tests check both references).
Works on CPU and CUDA alike: parameters are drawn on the CPU (bit-identical on any device)
and reach the device in one non-blocking copy (``moco.core.device.packed_to_device``); images
live there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moco.core.device import packed_to_device as plan_to_device
from moco.data.aug_params import (  # re-exported: the sampling half of the batched augmentation
    BLUR_SIGMA,
    AugParams,
    Recipe,
    make_recipe,
    sample_crops,
    sample_params,
)
from moco.data.colour_ops import (  # re-exported: the per-pixel ops
    GRAY_WEIGHTS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    luma,
    solarize,
)

__all__ = ["BLUR_SIGMA", "GRAY_WEIGHTS", "AugParams", "BatchAugment", "Recipe",
           "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
           "apply_params", "eval_resize", "make_recipe", "sample_crops", "sample_params",
           "solarize"]

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


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


# The parameters are drawn on the CPU, where every "which samples does this op touch" decision
# is made. Everything the device needs (crop boxes, flips, per-sample factors, the indices of
# the samples each op touches, mean/std) is first collected in a plan of CPU tensors and sent
# in one non-blocking copy (:func:`moco.core.device.packed_to_device`), not in ~20 blocking ones.
Plan = dict[str, torch.Tensor]


def _jitter_plan(p: AugParams) -> Plan:
    """``j{pos}{op}``: the factors of op ``op`` at position ``pos`` of the random order for the
    samples it applies to; ``j{pos}{op}i``: their indices (absent when it is every sample)."""
    factors = [p.brightness, p.contrast, p.saturation, p.hue]
    plan: Plan = {}
    for pos in range(4):
        for op in range(4):
            sel = p.jitter & (p.order[:, pos] == op)
            if not bool(sel.any()):
                continue
            key = f"j{pos}{op}"
            if bool(sel.all()):
                plan[key] = factors[op]
            else:
                plan[key + "i"] = sel.nonzero()[:, 0]
                plan[key] = factors[op][sel]
    return plan


def _jitter(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    for pos in range(4):
        for op in range(4):
            key = f"j{pos}{op}"
            if key not in plan:
                continue
            if key + "i" not in plan:
                x = _JITTER_OPS[op](x, _col(plan[key], x))
                continue
            idx = plan[key + "i"]
            x.index_copy_(0, idx, _JITTER_OPS[op](x.index_select(0, idx), _col(plan[key], x)))
    return x


def _gray_plan(on: torch.Tensor) -> Plan:
    return {"gray": on} if bool(on.any()) else {}


def _grayscale(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    if "gray" not in plan:
        return x
    return torch.where(plan["gray"].view(-1, 1, 1, 1), luma(x).expand_as(x), x)


def _solarize_plan(on: torch.Tensor) -> Plan:
    return {"solarize": on} if bool(on.any()) else {}


def _solarize(x: torch.Tensor, plan: Plan, threshold: float) -> torch.Tensor:
    if "solarize" not in plan:
        return x
    return torch.where(plan["solarize"].view(-1, 1, 1, 1), solarize(x, threshold / 255.0), x)


def _blur_plan(on: torch.Tensor, sigma: torch.Tensor) -> Plan:
    if not bool(on.any()):
        return {}
    idx = on.nonzero()[:, 0]
    return {"blur_i": idx, "sigma": sigma[idx]}


def _blur(x: torch.Tensor, plan: Plan, kernel: int | None = None) -> torch.Tensor:
    if "blur_i" not in plan:
        return x
    kernel = kernel or blur_kernel_size()
    idx, sig = plan["blur_i"], plan["sigma"]
    _, _, hgt, wid = x.shape
    by = blur_matrices(sig, hgt, kernel).to(x.dtype)
    bx = by if hgt == wid else blur_matrices(sig, wid, kernel).to(x.dtype)
    sub = torch.matmul(torch.matmul(by[:, None], x.index_select(0, idx)), bx[:, None].transpose(-1, -2))
    return x.index_copy_(0, idx, sub)


def gaussian_blur(x: torch.Tensor, on: torch.Tensor, sigma: torch.Tensor,
                  kernel: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur (σ per sample) on the samples where ``on`` [N] is true."""
    return _blur(x, plan_to_device(_blur_plan(on, sigma), x.device), kernel)


def _separable(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """out[n,c] = wy[n] @ x[n,:,:,c] @ wx[n]ᵀ: x float [N,H,W,3] (channels last, as stored),
    wy [N,S,H], wx [N,T,W] -> [N,3,S,T] contiguous. Two batched matmuls."""
    n, hgt, wid, _ = x.shape
    s, t = wy.shape[1], wx.shape[1]
    y = torch.bmm(wy, x.reshape(n, hgt, wid * 3))  # [N, S, W*3]
    y = y.view(n, s, wid, 3).transpose(2, 3).reshape(n, s * 3, wid)  # [N, S*3, W]
    out = torch.bmm(y, wx.transpose(1, 2))  # [N, S*3, T]
    return out.view(n, s, 3, t).transpose(1, 2).contiguous()


def _crop_plan(p: AugParams, source: torch.Tensor | None) -> Plan:
    plan = {"crop": p.crop, "flip": p.flip}
    if source is not None:
        plan["source"] = source
    return plan


def _crop_resize(images: torch.Tensor, plan: Plan, size: int) -> torch.Tensor:
    m, hgt, wid, _ = images.shape
    crop = plan["crop"]  # the weights are built on the device: [N,S,H] is large at 224 px
    wy = resample_weights(crop[:, 0], crop[:, 2], hgt, size).mul_(1.0 / 255.0)
    wx = resample_weights(crop[:, 1], crop[:, 3], wid, size, plan["flip"])
    if "source" in plan:
        images = images.index_select(0, plan["source"])
    elif m != len(crop):
        raise ValueError(f"{m} images for {len(crop)} views: pass source")
    return _separable(images.to(torch.float32), wy, wx)


def crop_resize(images: torch.Tensor, p: AugParams, size: int,
                source: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``p.crop`` of each image, resize to ``size`` (antialiased bilinear), flip where
    ``p.flip``, scale to [0, 1].

    images: uint8 [M,H,W,3] (channels last, as stored) on the device; ``source`` [N] int64
    picks the image of each of the N views (default: view n uses image n).
    Returns float32 [N,3,size,size].
    """
    return _crop_resize(images, plan_to_device(_crop_plan(p, source), images.device), size)


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.to(x.dtype).view(1, 3, 1, 1)) / std.to(x.dtype).view(1, 3, 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    stats = plan_to_device({"mean": torch.tensor(mean, dtype=torch.float64),
                            "std": torch.tensor(std, dtype=torch.float64)}, x.device)
    return _normalize(x, stats["mean"], stats["std"])


def apply_params(images: torch.Tensor, p: AugParams, recipe: Recipe, size: int,
                 mean: Sequence[float] | None, std: Sequence[float] | None,
                 source: torch.Tensor | None = None) -> torch.Tensor:
    """The recipe with parameters ``p`` on uint8 [M,H,W,3] images -> float32 [N,3,size,size]
    (normalised with ``mean``/``std`` unless they are None). Every parameter reaches the
    device in one copy (:func:`plan_to_device`)."""
    plan = {**_crop_plan(p, source), **colour_plan(p, recipe, mean, std)}
    plan = plan_to_device(plan, images.device)
    return apply_colour(_crop_resize(images, plan, size), plan, recipe)


def colour_plan(p: AugParams, recipe: Recipe, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> Plan:
    """What the recipe's colour steps and the normalisation need, as CPU tensors (see
    :data:`Plan`)."""
    plan: Plan = {}
    for step in recipe.colour_steps:
        plan.update({"jitter": _jitter_plan(p), "gray": _gray_plan(p.gray),
                     "blur": _blur_plan(p.blur, p.sigma),
                     "solarize": _solarize_plan(p.solarize)}[step])
    if mean is not None and std is not None:
        plan["mean"] = torch.tensor(mean, dtype=torch.float64)
        plan["std"] = torch.tensor(std, dtype=torch.float64)
    return plan


def apply_colour(x: torch.Tensor, plan: Plan, recipe: Recipe) -> torch.Tensor:
    """The recipe's colour steps in its order on views float [N,3,S,S] in [0, 1], then the
    normalisation when the plan (on ``x``'s device) holds mean and std. Both views of an
    asymmetric recipe apply the same steps (their parameters differ), so ``recipe`` may be
    either view's."""
    for step in recipe.colour_steps:
        if step == "jitter":
            x = _jitter(x, plan)
        elif step == "gray":
            x = _grayscale(x, plan)
        elif step == "blur":
            x = _blur(x, plan)
        elif step == "solarize":
            x = _solarize(x, plan, recipe.solarize_threshold)
    if "mean" in plan:
        x = _normalize(x, plan["mean"], plan["std"])
    return x


class BatchAugment:
    """Two independent views of every image of a uint8 batch, on the batch's device; the
    second views follow the recipe's second view when it has one (``v3``).

    ``aug`` / ``image_size`` / ``crop_min_scale`` / ``mean`` / ``std`` as
    :func:`moco.data.augment.pretrain_transform`.
    """

    def __init__(self, aug: str, image_size: int, crop_min_scale: float,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.recipe = make_recipe(aug, crop_min_scale)
        self.size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def params(self, heights: torch.Tensor, widths: torch.Tensor, g: torch.Generator) -> AugParams:
        """Parameters of 2N views: the N query views, then the N key views (each drawn from
        its own view's recipe when the recipe is asymmetric)."""
        first, second = self.recipe.views()
        q = sample_params(first, heights, widths, g)
        k = sample_params(second, heights, widths, g)
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
    [N,3,size,size] in [0, 1], as :func:`moco.data.augment.eval_transform` without Normalize.

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
    plan: Plan = {}
    for axis, (full, new) in enumerate(((hs, nh), (ws, nw))):
        sc = full.to(torch.float64) / new
        top = torch.round((new - size) / 2.0)  # torchvision's int(round(...)), half-to-even
        plan.update({f"start{axis}": top * sc, f"full{axis}": full, f"scale{axis}": sc})
    plan = plan_to_device(plan, images.device)
    mats = [resample_weights(plan[f"start{a}"], plan[f"full{a}"], in_size, size,
                             scale=plan[f"scale{a}"],
                             window=(torch.zeros_like(plan[f"scale{a}"]), plan[f"full{a}"]))
            for a, in_size in enumerate((hgt, wid))]
    return _separable(images.to(torch.float32), mats[0].mul_(1.0 / 255.0), mats[1])
