"""Batched augmentation (moco.data.batch_augment) against torchvision's per-image transforms:
(a) the same parameter distributions, (b) the same output for the same parameters; each view
of an asymmetric recipe (MoCo v3) from its own recipe."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import KS_CRIT, N, cfg_for, jpegs, ks, loader_for
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moco.data import batch_augment as BA
from moco.data.augment import eval_transform


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("hw,scale", [((32, 32), (0.08, 1.0)), ((40, 90), (0.2, 1.0)),
                                      ((12, 100), (0.2, 1.0))])
def test_crop_distribution_matches_random_resized_crop(hw: tuple[int, int],
                                                       scale: tuple[float, float]) -> None:
    h, w = hw
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), [3 / 4, 4 / 3])
                    for _ in range(N)], dtype=np.float64)
    g = torch.Generator().manual_seed(1)
    ours = BA.sample_crops(torch.full((N,), h), torch.full((N,), w), scale, (3 / 4, 4 / 3), g).numpy()
    assert ours.dtype == np.int64 and ours.shape == (N, 4)
    i, j, ch, cw = ours.T
    assert (i >= 0).all() and (j >= 0).all() and (i + ch <= h).all() and (j + cw <= w).all()
    for name, f in [("area", lambda c: c[:, 2] * c[:, 3] / (h * w)),
                    ("log ratio", lambda c: np.log(c[:, 3] / c[:, 2])),
                    ("top", lambda c: c[:, 0]), ("left", lambda c: c[:, 1])]:
        d = ks(f(ours.astype(np.float64)), f(ref))
        assert d < KS_CRIT, f"{name}: KS {d:.4f} >= {KS_CRIT:.4f}"
    # the center-crop fallback happens as often (12x100: most tries fail)
    fallback = ((h - 12) // 2, (w - round(12 * 4 / 3)) // 2, 12, round(12 * 4 / 3)) if h == 12 else None
    if fallback is not None:
        p_ref = float((ref == fallback).all(axis=1).mean())
        hits = int((ours == fallback).all(axis=1).sum())
        assert p_ref > 0.01 and binomial_ok(hits, N, p_ref)


def test_crops_per_sample_sizes() -> None:
    """Each sample's crop is drawn for its own image size (mixed-size caches)."""
    g = torch.Generator().manual_seed(0)
    hs = torch.tensor([32, 500, 64] * 100)
    ws = torch.tensor([32, 300, 200] * 100)
    c = BA.sample_crops(hs, ws, (0.2, 1.0), (3 / 4, 4 / 3), g)
    assert (c[:, 0] + c[:, 2] <= hs).all() and (c[:, 1] + c[:, 3] <= ws).all()
    assert c[1::3, 2].max() > 100  # the large image gets large crops


@pytest.mark.parametrize("aug", ["v1", "v2", "cifar-demo", "v3", "cifar-v3"])
def test_jitter_and_probabilities_match_torchvision(aug: str) -> None:
    recipe = BA.make_recipe(aug, 0.2)
    b, c, s, hue = recipe.jitter
    cj = T.ColorJitter(b, c, s, hue)
    torch.manual_seed(0)
    ref = [T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) for _ in range(N)]
    g = torch.Generator().manual_seed(1)
    p = BA.sample_params(recipe, torch.full((N,), 32), torch.full((N,), 32), g)
    for k, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
        r = np.array([x[k + 1] for x in ref])
        d = ks(getattr(p, name).numpy(), r)
        assert d < KS_CRIT, f"{name}: KS {d:.4f}"
    # op order: every permutation ~1/24, as torch.randperm(4)
    ref_perm = np.array([x[0].tolist() for x in ref])
    for perm in itertools.permutations(range(4)):
        hits = int((p.order.numpy() == perm).all(axis=1).sum())
        p_ref = float((ref_perm == perm).all(axis=1).mean())
        assert binomial_ok(hits, N, 1 / 24) and binomial_ok(int(p_ref * N), N, 1 / 24)
    # probabilities of the recipe (its first view): MoCo v1/v2, the CIFAR-10 notebook, MoCo v3
    expect = {"v1": (1.0, 0.2, 0.0, 0.0), "v2": (0.8, 0.2, 0.5, 0.0),
              "cifar-demo": (0.8, 0.2, 0.0, 0.0), "v3": (0.8, 0.2, 1.0, 0.0),
              "cifar-v3": (0.8, 0.2, 0.0, 0.0)}[aug]
    for name, prob in zip(["jitter", "gray", "blur", "solarize"], expect, strict=True):
        assert binomial_ok(int(getattr(p, name).sum()), N, prob), name
    assert binomial_ok(int(p.flip.sum()), N, 0.5)
    sig = p.sigma.numpy()
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    assert ks(sig, np.random.default_rng(0).uniform(0.1, 2.0, N)) < KS_CRIT


def _reference(x: torch.Tensor, p: BA.AugParams, n: int, recipe: BA.Recipe, size: int) -> torch.Tensor:
    """One view through torchvision's functional ops on a float tensor [3,H,W] in [0, 1]."""
    i, j, h, w = p.crop[n].tolist()
    y = TF.resized_crop(x, i, j, h, w, [size, size], antialias=True)
    if p.flip[n]:
        y = TF.horizontal_flip(y)
    ops = [lambda t: TF.adjust_brightness(t, float(p.brightness[n])),
           lambda t: TF.adjust_contrast(t, float(p.contrast[n])),
           lambda t: TF.adjust_saturation(t, float(p.saturation[n])),
           lambda t: TF.adjust_hue(t, float(p.hue[n]))]
    for step in recipe.order:
        if step == "jitter" and p.jitter[n]:
            for o in p.order[n].tolist():
                y = ops[o](y)
        elif step == "gray" and p.gray[n]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        elif step == "blur" and p.blur[n]:
            y = TF.gaussian_blur(y, [13, 13], [float(p.sigma[n])] * 2)
        elif step == "solarize" and p.solarize[n]:
            y = TF.solarize(y, recipe.solarize_threshold / 255)
    return y


@pytest.mark.parametrize("aug", ["v1", "v2", "cifar-demo", "v3", "cifar-v3"])
@pytest.mark.parametrize("hw", [(32, 32), (90, 70)])
def test_same_output_as_torchvision_functional(aug: str, hw: tuple[int, int]) -> None:
    """Same parameters -> the same views as torchvision's ops (float, so no rounding):
    covers up- and down-scaling crops, flips, every jitter order, grayscale and blur."""
    g = torch.Generator().manual_seed(3)
    n = 12
    imgs = torch.randint(0, 256, (n, *hw, 3), dtype=torch.uint8, generator=g)
    recipe = BA.make_recipe(aug, 0.08)
    p = BA.sample_params(recipe, torch.full((n,), hw[0]), torch.full((n,), hw[1]), g)
    p.gray[::4] = True  # make sure each op is exercised
    p.jitter[1::2] = True
    if recipe.blur_p:
        p.blur[::2] = True
    if "solarize" in recipe.order:
        p.solarize[1::3] = True
    out = BA.apply_params(imgs, p, recipe, 32, None, None)
    assert out.shape == (n, 3, 32, 32) and out.dtype == torch.float32
    for k in range(n):
        ref = _reference(imgs[k].permute(2, 0, 1).float() / 255, p, k, recipe, 32)
        assert torch.allclose(out[k], ref, atol=2e-5), (k, float((out[k] - ref).abs().max()))


def test_close_to_pil_for_the_same_parameters() -> None:
    """Against the PIL ops of the original recipe: crop+resize, the jitter ops and blur agree
    to within PIL's uint8 rounding (PIL's hue is quantised to 1/256 turn, its blur is an
    extended box filter)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    a = np.clip(a.astype(float) * 0.3 + np.linspace(0, 170, 64)[None, :, None], 0, 255).astype(np.uint8)
    img = Image.fromarray(a)
    t = torch.from_numpy(a)[None]
    crop = torch.tensor([[5, 7, 30, 41]])
    p = BA.sample_params(BA.make_recipe("v2", 0.2), torch.tensor([48]), torch.tensor([64]),
                         torch.Generator().manual_seed(0))
    p.crop, p.flip = crop, torch.tensor([True])
    ours = BA.crop_resize(t, p, 32)[0]
    pil = TF.horizontal_flip(TF.resized_crop(img, 5, 7, 30, 41, [32, 32]))
    ref = TF.to_image(pil).float() / 255
    assert (ours - ref).abs().max() <= 1.01 / 255
    f = torch.ones(1, 1, 1, 1)
    for op, pil_op, val in [(BA.adjust_brightness, TF.adjust_brightness, 1.3),
                            (BA.adjust_contrast, TF.adjust_contrast, 0.7),
                            (BA.adjust_saturation, TF.adjust_saturation, 1.35),
                            (BA.adjust_hue, TF.adjust_hue, 0.08)]:
        y = op(ref[None].clone(), f * val)[0]
        r = TF.to_image(pil_op(pil, val)).float() / 255
        assert (y - r).abs().mean() < 1.5 / 255 and (y - r).abs().max() < 6 / 255, op.__name__
    y = BA.gaussian_blur(ref[None], torch.tensor([True]), torch.tensor([1.5]))[0]
    r = TF.to_image(pil.filter(ImageFilter.GaussianBlur(radius=1.5))).float() / 255
    inner = (slice(None), slice(4, -4), slice(4, -4))  # borders: reflect vs PIL's edge extension
    assert (y - r)[inner].abs().mean() < 1.5 / 255


def test_eval_resize_matches_eval_transform() -> None:
    rng = np.random.default_rng(1)
    for h, w, size in [(32, 32, 32), (40, 50, 32), (300, 200, 224), (64, 90, 64)]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = eval_transform(size, (0, 0, 0), (1, 1, 1))(Image.fromarray(a))
        resize = size if size <= 64 else round(size * 256 / 224)
        out = BA.eval_resize(torch.from_numpy(a)[None], size, resize)[0]
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= 1.01 / 255  # PIL rounds to uint8


def test_eval_resize_per_sample_sizes() -> None:
    """Zero-padded images with their valid sizes give what each image gives alone."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (50, 45, 3), dtype=np.uint8)
    pad = torch.zeros(2, 50, 60, 3, dtype=torch.uint8)
    pad[0, :40, :60], pad[1, :50, :45] = torch.from_numpy(a), torch.from_numpy(b)
    out = BA.eval_resize(pad, 32, 36, torch.tensor([[40, 60], [50, 45]]))
    for k, x in enumerate([a, b]):
        alone = BA.eval_resize(torch.from_numpy(x)[None], 32, 36)[0]
        assert torch.allclose(out[k], alone, atol=1e-5)


def test_two_views_shapes_and_determinism() -> None:
    aug = BA.BatchAugment("v2", 24, 0.2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    imgs = torch.randint(0, 256, (6, 32, 40, 3), dtype=torch.uint8)
    q, k = aug(imgs, torch.Generator().manual_seed(5))
    q2, k2 = aug(imgs, torch.Generator().manual_seed(5))
    assert q.shape == k.shape == (6, 3, 24, 24) and q.dtype == torch.float32
    assert torch.equal(q, q2) and torch.equal(k, k2)
    assert not torch.allclose(q, k)  # independent draws for the two views
    assert q.min() >= (0 - 0.5) / 0.25 - 1e-5 and q.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_unknown_recipe() -> None:
    with pytest.raises(ValueError, match="v1, v2, cifar-demo, v3, cifar-v3"):
        BA.make_recipe("v4", 0.2)


# ----- solarize and the asymmetric recipes (MoCo v3) -----------------------------------------------
def test_solarize_is_torchvisions() -> None:
    """On float images: torchvision's ``solarize`` exactly; on uint8 levels: PIL's
    ``ImageOps.solarize(img, 128)`` (levels from 128 up inverted)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 9, 9, generator=g)
    for thr in (0.5, 128 / 255, 0.9):
        assert torch.equal(BA.solarize(x, thr), TF.solarize(x, thr))
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    pil = TF.to_image(TF.solarize(TF.to_pil_image(levels), 128))
    ours = BA.solarize(levels.float() / 255, 128 / 255) * 255
    assert torch.allclose(ours, pil.float(), atol=1e-4)
    assert int((pil != levels).sum()) == 3 * 128  # 128..255 changed, 0..127 kept


def test_v3_views_draw_from_their_own_recipe() -> None:
    """BatchAugment draws the N first views from view 1's recipe (blur always, no solarize)
    and the N second views from view 2's (blur p 0.1, solarize p 0.2); the rest alike."""
    aug = BA.BatchAugment("v3", 16, 0.08, (0.5,) * 3, (0.25,) * 3)
    hw = torch.full((N,), 40)
    p = aug.params(hw, hw, torch.Generator().manual_seed(0))
    first, second = p.select(slice(0, N)), p.select(slice(N, 2 * N))
    assert bool(first.blur.all()) and not bool(first.solarize.any())
    assert binomial_ok(int(second.blur.sum()), N, 0.1)
    assert binomial_ok(int(second.solarize.sum()), N, 0.2)
    for v in (first, second):
        assert binomial_ok(int(v.jitter.sum()), N, 0.8) and binomial_ok(int(v.gray.sum()), N, 0.2)
        assert float(v.saturation.min()) >= 0.8 and float(v.saturation.max()) <= 1.2
        assert float(v.hue.abs().max()) <= 0.1
    cifar = BA.BatchAugment("cifar-v3", 16, 0.08, (0.5,) * 3, (0.25,) * 3)
    p = cifar.params(hw, hw, torch.Generator().manual_seed(0))
    assert not bool(p.blur.any()) and binomial_ok(int(p.solarize[N:].sum()), N, 0.2)
    assert not bool(p.solarize[:N].any())


def test_two_views_apply_each_views_parameters() -> None:
    aug = BA.BatchAugment("v3", 16, 0.2, (0.5,) * 3, (0.25,) * 3)
    imgs = torch.randint(0, 256, (5, 24, 20, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    hw = (torch.full((5,), 24), torch.full((5,), 20))
    p = aug.params(*hw, torch.Generator().manual_seed(2))
    p.solarize[5:] = True  # every second view solarized
    q, k = aug.two_views(imgs, p)
    first, second = aug.recipe.views()
    want_k = BA.apply_params(imgs, p.select(slice(5, 10)), second, 16, aug.mean, aug.std)
    want_q = BA.apply_params(imgs, p.select(slice(0, 5)), first, 16, aug.mean, aug.std)
    torch.testing.assert_close(k, want_k)
    torch.testing.assert_close(q, want_q)
    p.solarize[5:] = False
    assert not torch.allclose(aug.two_views(imgs, p)[1], k)


def test_the_original_size_crop_loader_carries_solarize(tmp_path: Path) -> None:
    """The crop loader's workers send every parameter to the training process: solarize too."""
    jpegs(tmp_path / "imgs", [(40, 50), (50, 40), (45, 45), (44, 60)])
    loader = loader_for(tmp_path / "imgs", cfg_for(aug="v3", batch_size=4))
    work = loader.work(0, 0, [0, 1, 2, 3])
    assert work.params["solarize"].shape == (8,) and not bool(work.params["solarize"][:4].any())
    work.params["solarize"] = torch.tensor([False] * 4 + [True] * 4)
    on = loader.finish(work)
    work.params["solarize"] = torch.zeros(8, dtype=torch.bool)
    off = loader.finish(work)
    assert torch.equal(on.im_q, off.im_q) and not torch.allclose(on.im_k, off.im_k)
