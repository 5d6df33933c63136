"""Augmentation recipes: exact ops, order and parameters of MoCo v1/v2 (``main_moco.py``), the
CIFAR-10 notebook and MoCo v3's asymmetric recipe (§4; BYOL's), each view's pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from moco.data.augment import (
    PILGaussianBlur,
    ToRGB,
    TwoViews,
    eval_transform,
    pretrain_transform,
    two_view_transform,
)
from moco.engine.config import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

RATIO = (3 / 4, 4 / 3)


def _img(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _ops(aug: str, size: int = 224, scale: float = 0.2, mean=IMAGENET_MEAN, std=IMAGENET_STD,
         view: int = 0) -> list:
    tf = pretrain_transform(aug, size, scale, mean, std, view)
    assert isinstance(tf, T.Compose)
    return list(tf.transforms)


def _check_crop(op: object, size: int, min_scale: float) -> None:
    assert type(op) is T.RandomResizedCrop
    assert op.size == (size, size)
    assert tuple(op.scale) == pytest.approx((min_scale, 1.0))
    assert tuple(op.ratio) == pytest.approx(RATIO)
    assert op.interpolation == InterpolationMode.BILINEAR


def _check_jitter(op: object, hue: float, saturation: float = 0.4) -> None:
    assert type(op) is T.ColorJitter
    for name in ("brightness", "contrast"):
        assert tuple(getattr(op, name)) == pytest.approx((0.6, 1.4)), name
    assert tuple(op.saturation) == pytest.approx((1 - saturation, 1 + saturation))
    assert tuple(op.hue) == pytest.approx((-hue, hue))


def _check_tail(ops: list, mean, std) -> None:
    assert type(ops[-2]) is T.ToTensor
    assert type(ops[-1]) is T.Normalize
    assert list(ops[-1].mean) == pytest.approx(list(mean))
    assert list(ops[-1].std) == pytest.approx(list(std))


def test_v1_pipeline() -> None:
    """crop(0.2,1), grayscale p0.2, ColorJitter(0.4,0.4,0.4,0.4) ALWAYS, flip, ToTensor, Normalize."""
    ops = _ops("v1")
    assert [type(o) for o in ops] == [T.RandomResizedCrop, T.RandomGrayscale, T.ColorJitter,
                                      T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    _check_crop(ops[0], 224, 0.2)
    assert ops[1].p == pytest.approx(0.2)
    _check_jitter(ops[2], hue=0.4)
    assert ops[3].p == pytest.approx(0.5)
    _check_tail(ops, IMAGENET_MEAN, IMAGENET_STD)
    assert list(ops[-1].mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(ops[-1].std) == pytest.approx([0.229, 0.224, 0.225])


def test_v2_pipeline() -> None:
    """crop(0.2,1), jitter(0.4,0.4,0.4,0.1) p0.8, grayscale p0.2 AFTER, blur σ∈[0.1,2] p0.5, flip."""
    ops = _ops("v2")
    assert [type(o) for o in ops] == [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale,
                                      T.RandomApply, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    _check_crop(ops[0], 224, 0.2)
    assert ops[1].p == pytest.approx(0.8)
    assert len(ops[1].transforms) == 1
    _check_jitter(ops[1].transforms[0], hue=0.1)
    assert ops[2].p == pytest.approx(0.2)
    assert ops[3].p == pytest.approx(0.5)
    assert len(ops[3].transforms) == 1
    blur = ops[3].transforms[0]
    assert isinstance(blur, PILGaussianBlur)
    assert blur.sigma == pytest.approx((0.1, 2.0))
    assert ops[4].p == pytest.approx(0.5)
    _check_tail(ops, IMAGENET_MEAN, IMAGENET_STD)


def test_cifar_demo_pipeline() -> None:
    """crop(32, scale 0.08-1), flip 0.5, jitter(0.4,0.4,0.4,0.1) p0.8, grayscale 0.2, no blur."""
    ops = _ops("cifar-demo", 32, 0.08, CIFAR_MEAN, CIFAR_STD)
    assert [type(o) for o in ops] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply,
                                      T.RandomGrayscale, T.ToTensor, T.Normalize]
    _check_crop(ops[0], 32, 0.08)
    assert ops[1].p == pytest.approx(0.5)
    assert ops[2].p == pytest.approx(0.8)
    assert len(ops[2].transforms) == 1
    _check_jitter(ops[2].transforms[0], hue=0.1)
    assert ops[3].p == pytest.approx(0.2)
    _check_tail(ops, CIFAR_MEAN, CIFAR_STD)
    assert list(ops[-1].mean) == pytest.approx([0.4914, 0.4822, 0.4465])
    assert list(ops[-1].std) == pytest.approx([0.2023, 0.1994, 0.2010])


V3_TYPES = [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale, T.RandomApply, T.RandomSolarize,
            T.RandomHorizontalFlip, T.ToTensor, T.Normalize]


@pytest.mark.parametrize(("view", "blur_p", "solarize_p"), [(0, 1.0, 0.0), (1, 0.1, 0.2)])
def test_v3_pipelines(view: int, blur_p: float, solarize_p: float) -> None:
    """BYOL's recipe as MoCo v3's: crop(0.08,1), jitter(0.4,0.4,0.2,0.1) p0.8, grayscale p0.2,
    blur σ∈[0.1,2] p1.0 (view 1) / p0.1 (view 2), solarize(128) p0 / p0.2, flip."""
    ops = _ops("v3", 224, 0.08, view=view)
    assert [type(o) for o in ops] == V3_TYPES
    _check_crop(ops[0], 224, 0.08)
    assert ops[1].p == pytest.approx(0.8)
    _check_jitter(ops[1].transforms[0], hue=0.1, saturation=0.2)
    assert ops[2].p == pytest.approx(0.2)
    assert ops[3].p == pytest.approx(blur_p) and isinstance(ops[3].transforms[0], PILGaussianBlur)
    assert ops[3].transforms[0].sigma == pytest.approx((0.1, 2.0))
    assert ops[4].p == pytest.approx(solarize_p) and ops[4].threshold == 128
    assert ops[5].p == pytest.approx(0.5)
    _check_tail(ops, IMAGENET_MEAN, IMAGENET_STD)


def test_cifar_v3_pipelines_have_no_blur() -> None:
    for view, solarize_p in ((0, 0.0), (1, 0.2)):
        ops = _ops("cifar-v3", 32, 0.08, CIFAR_MEAN, CIFAR_STD, view=view)
        assert [type(o) for o in ops] == [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale,
                                          T.RandomSolarize, T.RandomHorizontalFlip, T.ToTensor,
                                          T.Normalize]
        assert ops[3].p == pytest.approx(solarize_p)


def test_symmetric_recipes_have_one_pipeline_for_both_views() -> None:
    for aug in ("v1", "v2", "cifar-demo"):
        tv = two_view_transform(aug, 32, 0.2, IMAGENET_MEAN, IMAGENET_STD)
        assert tv.second is tv.base
        assert repr(pretrain_transform(aug, 32, 0.2, IMAGENET_MEAN, IMAGENET_STD, view=1)) == repr(
            tv.base)
    tv = two_view_transform("v3", 32, 0.2, IMAGENET_MEAN, IMAGENET_STD)
    assert tv.second is not tv.base
    assert tv.base.transforms[3].p == 1.0 and tv.second.transforms[3].p == 0.1
    with pytest.raises(ValueError, match="view is 0 or 1"):
        pretrain_transform("v3", 32, 0.2, IMAGENET_MEAN, IMAGENET_STD, view=2)


def test_v3_views_follow_their_own_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first view is always blurred and never solarized; the second is solarized about
    one time in five and blurred about one time in ten."""
    calls: list[tuple[str, int]] = []
    view = [0]
    real_blur = PILGaussianBlur.__call__

    def blur(self: PILGaussianBlur, img: Image.Image) -> Image.Image:
        calls.append(("blur", view[0]))
        return real_blur(self, img)

    real_solarize = T.functional.solarize

    def solarize(img: Image.Image, threshold: float) -> Image.Image:
        calls.append(("solarize", view[0]))
        return real_solarize(img, threshold)

    monkeypatch.setattr(PILGaussianBlur, "__call__", blur)
    monkeypatch.setattr(T.functional, "solarize", solarize)
    pair = two_view_transform("v3", 16, 0.2, IMAGENET_MEAN, IMAGENET_STD)

    def tagged(tf: T.Compose, v: int) -> object:
        def run(img: Image.Image) -> torch.Tensor:
            view[0] = v
            return tf(img)
        return run

    tv = TwoViews(tagged(pair.base, 0), tagged(pair.second, 1))  # type: ignore[arg-type]
    n = 400
    img = _img(20, 20)
    for s in range(n):
        tv(img, seed=s)
    assert calls.count(("blur", 0)) == n and calls.count(("solarize", 0)) == 0
    assert abs(calls.count(("blur", 1)) / n - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5
    assert abs(calls.count(("solarize", 1)) / n - 0.2) < 5 * (0.2 * 0.8 / n) ** 0.5


def test_unknown_aug_rejected() -> None:
    with pytest.raises(ValueError, match="v1, v2, cifar-demo, v3, cifar-v3"):
        pretrain_transform("v4", 32, 0.2, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("aug", ["v1", "v2", "cifar-demo"])
@pytest.mark.parametrize(("in_size", "out_size"), [((32, 32), 32), ((300, 240), 224), ((240, 300), 32)])
def test_output_shape(aug: str, in_size: tuple[int, int], out_size: int) -> None:
    tf = pretrain_transform(aug, out_size, 0.2, IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(0)
    x = tf(_img(*in_size))
    assert x.shape == (3, out_size, out_size)
    assert x.dtype == torch.float32


def test_blur_uses_pil_radius_sigma() -> None:
    img = _img(40, 40)
    blur = PILGaussianBlur((1.3, 1.3))
    expected = img.filter(ImageFilter.GaussianBlur(radius=1.3))
    assert np.array_equal(np.asarray(blur(img)), np.asarray(expected))


def test_blur_sigma_drawn_uniformly_from_range(monkeypatch: pytest.MonkeyPatch) -> None:
    radii: list[float] = []
    real = ImageFilter.GaussianBlur

    def spy(radius: float = 2) -> ImageFilter.GaussianBlur:
        radii.append(radius)
        return real(radius)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", spy)
    img = _img(8, 8)
    blur = PILGaussianBlur((0.1, 2.0))
    torch.manual_seed(0)
    for _ in range(300):
        blur(img)
    r = np.array(radii)
    assert r.min() >= 0.1 and r.max() <= 2.0
    assert r.min() < 0.3 and r.max() > 1.8  # covers the range
    assert abs(r.mean() - 1.05) < 0.12
    # Seeded through torch's RNG: same seed, same σ.
    radii.clear()
    torch.manual_seed(5)
    blur(img)
    torch.manual_seed(5)
    blur(img)
    assert radii[0] == radii[1]


@pytest.mark.parametrize("aug", ["v1", "v2", "cifar-demo"])
def test_two_views_seeded(aug: str) -> None:
    tv = TwoViews(pretrain_transform(aug, 32, 0.2, IMAGENET_MEAN, IMAGENET_STD))
    img = _img(48, 40)
    q1, k1 = tv(img, seed=123)
    q2, k2 = tv(img, seed=123)
    assert torch.equal(q1, q2) and torch.equal(k1, k2)  # deterministic given the seed
    assert not torch.equal(q1, k1)  # two independent draws
    q3, _ = tv(img, seed=124)
    assert not torch.equal(q1, q3)


def test_two_views_restores_global_rng() -> None:
    tv = TwoViews(pretrain_transform("v2", 32, 0.2, IMAGENET_MEAN, IMAGENET_STD))
    torch.manual_seed(9)
    expected = torch.rand(4)
    torch.manual_seed(9)
    tv(_img(32, 32), seed=1)
    assert torch.equal(torch.rand(4), expected)


def test_two_views_without_seed_are_independent() -> None:
    tv = TwoViews(pretrain_transform("v1", 32, 0.2, IMAGENET_MEAN, IMAGENET_STD))
    torch.manual_seed(0)
    q, k = tv(_img(40, 40))
    assert q.shape == k.shape == (3, 32, 32)
    assert not torch.equal(q, k)


def test_eval_transform_224() -> None:
    tf = eval_transform(224, IMAGENET_MEAN, IMAGENET_STD)
    ops = list(tf.transforms)
    assert [type(o) for o in ops] == [ToRGB, T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert ops[1].size == 256  # short side to 256, as main_lincls.py
    assert tuple(ops[2].size) == (224, 224)
    assert tf(_img(400, 300)).shape == (3, 224, 224)
    assert tf(_img(32, 32)).shape == (3, 224, 224)


def test_eval_transform_32_is_demo_test_transform() -> None:
    tf = eval_transform(32, CIFAR_MEAN, CIFAR_STD)
    img = _img(32, 32, seed=3)
    demo = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    torch.testing.assert_close(tf(img), demo(img))
    assert tf(_img(50, 40)).shape == (3, 32, 32)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_eval_transform_takes_any_image_mode(mode: str) -> None:
    """Grayscale, palette, alpha, CMYK and 16-bit images give 3 channels, as their RGB
    conversion does."""
    rgb = _img(40, 36, seed=4)
    img = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    tf = eval_transform(32, CIFAR_MEAN, CIFAR_STD)
    x = tf(img)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, tf(img.convert("RGB")))


def test_eval_transform_is_deterministic() -> None:
    tf = eval_transform(32, CIFAR_MEAN, CIFAR_STD)
    img = _img(45, 37)
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(1)
    assert torch.equal(a, tf(img))


def test_both_augmentation_paths_are_built_from_the_one_recipe_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A change in moco.data.recipes.RECIPES reaches the PIL transform and the batched
    parameters alike: neither path keeps a table of its own."""
    import dataclasses

    from moco.data import recipes
    from moco.data.aug_params import sample_params
    from moco.data.batch_augment import BatchAugment

    changed = dataclasses.replace(recipes.RECIPES["v2"], blur_p=1.0, gray_p=0.0,
                                  jitter=(0.1, 0.2, 0.3, 0.05), order=("gray", "blur", "flip"))
    monkeypatch.setitem(recipes.RECIPES, "v2", changed)
    ops = pretrain_transform("v2", 32, 0.3, CIFAR_MEAN, CIFAR_STD).transforms
    names = [type(o).__name__ for o in ops]
    assert names == ["RandomResizedCrop", "RandomGrayscale", "RandomApply",
                     "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert ops[0].scale == (0.3, 1.0) and ops[1].p == 0.0 and ops[2].p == 1.0
    assert isinstance(ops[2].transforms[0], PILGaussianBlur)
    aug = BatchAugment("v2", 32, 0.3, CIFAR_MEAN, CIFAR_STD)
    assert aug.recipe == dataclasses.replace(changed, scale=(0.3, 1.0))
    assert aug.recipe.colour_steps == ("gray", "blur")
    p = sample_params(aug.recipe, torch.full((64,), 40), torch.full((64,), 40),
                      torch.Generator().manual_seed(0))
    assert bool(p.blur.all()) and not bool(p.gray.any())
    assert float(p.hue.abs().max()) <= 0.05 and float((p.brightness - 1).abs().max()) <= 0.1
