"""The image recipes, declared once: the pretraining augmentations, the evaluation resize and
the normalisation constants. Both augmentation paths are built from the :data:`RECIPES`
table: the per-image PIL transform (:func:`moco.data.augment.pretrain_transform`) and the
batched one (:mod:`moco.data.aug_params`, :mod:`moco.data.batch_augment`).

A recipe describes one view; an asymmetric recipe (``v3``) holds the other view's in
``second``. The two views of a pair are independent draws. The recipes:

* ``v1``, MoCo v1 (He et al., CVPR 2020, §4; ``main_moco.py`` without ``--aug-plus``): random
  resized crop, grayscale p 0.2, ColorJitter(0.4, 0.4, 0.4, 0.4) always, horizontal flip;
* ``v2``, MoCo v2's "aug+" (Chen et al. 2020, §2; ``main_moco.py --aug-plus``): crop,
  ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, Gaussian blur σ ~ U(0.1, 2.0) p 0.5
  (``moco/loader.py``'s GaussianBlur), flip;
* ``cifar-demo``, the authors' CIFAR-10 notebook: crop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1)
  p 0.8, grayscale p 0.2;
* ``v3``, MoCo v3's (Appendix A; BYOL's recipe, Grill et al. 2020, Appendix B), asymmetric:
  crop of area 0.08 to 1, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian
  blur σ ~ U(0.1, 2.0) with p 1.0 on the first view and 0.1 on the second, solarize
  (threshold 128) with p 0.2 on the second view only, flip;
* ``cifar-v3``, ``v3`` for 32-px images: the blur off on both views, the rest (and the
  asymmetric solarize) kept. σ of 0.1-2 pixels was chosen for 224-px crops, where it is at
  most 1 % of the crop; on a 32-px crop σ 2 is 6 % and blurs away most of an object's
  detail. SimCLR (Chen et al. 2020, Appendix B.9) leaves the blur out on CIFAR-10, and so
  does the MoCo CIFAR-10 notebook (``cifar-demo``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moco.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the authors' CIFAR-10 notebook's constants
CIFAR_STD = (0.2023, 0.1994, 0.2010)

BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default: levels >= 128 are inverted
#: Inputs up to this size (CIFAR's 32 px, STL's 96 px is above) are resized to the crop size
#: itself before the center crop, as the CIFAR-10 notebook's test transform.
SMALL_INPUT = 64


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation after the random resized crop (area ``scale``, aspect
    ``ratio``). ``order``: the steps in the order the per-image pipeline applies them, among
    ``flip``, ``jitter``, ``gray``, ``blur`` and ``solarize``. ``jitter_p`` 1 is a ColorJitter
    applied always (not wrapped in RandomApply: no draw for it). ``solarize_threshold`` is in
    uint8 levels (inverted from it up).

    ``second``: the other view's recipe when the two views differ (MoCo v3's blur and
    solarize); None for a symmetric recipe. Both views apply the same steps in the same
    order (only their probabilities and ranges differ), and crop alike.
    """

    name: str
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    flip_p: float = 0.5
    solarize_p: float = 0.0
    solarize_threshold: float = SOLARIZE_THRESHOLD
    order: tuple[str, ...] = ("jitter", "gray", "blur", "flip")
    second: Recipe | None = None

    def __post_init__(self) -> None:
        unknown = set(self.order) - set(STEPS)
        if unknown:
            raise ConfigError(f"recipe {self.name!r}: unknown step(s) {sorted(unknown)}; the steps "
                              f"are {', '.join(STEPS)}")
        o = self.second
        if o is not None and (o.second is not None or o.order != self.order
                              or (o.scale, o.ratio) != (self.scale, self.ratio)):
            raise ConfigError(f"recipe {self.name!r}: the second view must apply the same steps "
                              "in the same order and crop alike (only probabilities and ranges "
                              "may differ), and hold no second view of its own")

    def views(self) -> tuple[Recipe, Recipe]:
        """The recipes of the first and the second view (the same one when symmetric)."""
        return self, self.second if self.second is not None else self

    @property
    def asymmetric(self) -> bool:
        return self.second is not None

    @property
    def colour_steps(self) -> tuple[str, ...]:
        """``order`` without the flip: the batched path flips inside its crop matrix (a flip
        commutes with the per-pixel, global-mean and symmetric-blur steps)."""
        return tuple(s for s in self.order if s != "flip")


STEPS = ("flip", "jitter", "gray", "blur", "solarize")


def _asymmetric(first: Recipe, **second: object) -> Recipe:
    """``first`` with a second view that differs from it in the fields ``second``."""
    return replace(first, second=replace(first, **second))  # type: ignore[arg-type]


_BYOL_ORDER = ("jitter", "gray", "blur", "solarize", "flip")

#: The recipes by ``--aug`` name, with the crop's area from 0.2 (``--crop-min-scale``; MoCo
#: v3's recipes declare 0.08, the value of their presets).
RECIPES: dict[str, Recipe] = {
    "v1": Recipe("v1", (0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                 order=("gray", "jitter", "flip")),
    "v2": Recipe("v2", (0.2, 1.0), blur_p=0.5, order=("jitter", "gray", "blur", "flip")),
    "cifar-demo": Recipe("cifar-demo", (0.2, 1.0), order=("flip", "jitter", "gray")),
    "v3": _asymmetric(Recipe("v3", (0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0,
                             order=_BYOL_ORDER), blur_p=0.1, solarize_p=0.2),
    "cifar-v3": _asymmetric(Recipe("cifar-v3", (0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1),
                                   order=("jitter", "gray", "solarize", "flip")),
                            solarize_p=0.2),
}


def make_recipe(aug: str, crop_min_scale: float) -> Recipe:
    """The recipe ``aug`` of :data:`RECIPES` with crops of area ``crop_min_scale`` to 1 (both
    views)."""
    if aug not in RECIPES:
        raise ConfigError(f"unknown augmentation {aug!r}; choose {', '.join(RECIPES)}")
    r = RECIPES[aug]
    scale = (crop_min_scale, 1.0)
    second = None if r.second is None else replace(r.second, scale=scale)
    return replace(r, scale=scale, second=second)


def resized_short_side(image_size: int) -> int:
    """``image_size`` scaled by 256/224: the short side of Resize(256) + CenterCrop(224) of
    ``main_lincls.py``'s evaluation, for any crop size."""
    return round(image_size * 256 / 224)


def eval_resize_size(image_size: int) -> int:
    """The short side an evaluation image is resized to before its ``image_size`` center
    crop: :func:`resized_short_side` (256 for 224 px), the crop size itself for small
    inputs."""
    return image_size if image_size <= SMALL_INPUT else resized_short_side(image_size)
