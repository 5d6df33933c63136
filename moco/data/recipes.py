"""The image recipes, declared once: the pretraining augmentations, the evaluation resize and
the normalisation constants. Both augmentation paths are built from the :data:`RECIPES`
table: the per-image PIL transform (:func:`moco.data.augment.pretrain_transform`) and the
batched one (:mod:`moco.data.aug_params`, :mod:`moco.data.batch_augment`).

The recipes (one view; the two views of a pair are independent draws):

* ``v1``, MoCo v1 (He et al., CVPR 2020, §4; ``main_moco.py`` without ``--aug-plus``): random
  resized crop, grayscale p 0.2, ColorJitter(0.4, 0.4, 0.4, 0.4) always, horizontal flip;
* ``v2``, MoCo v2's "aug+" (Chen et al. 2020, §2; ``main_moco.py --aug-plus``): crop,
  ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, Gaussian blur σ ~ U(0.1, 2.0) p 0.5
  (``moco/loader.py``'s GaussianBlur), flip;
* ``cifar-demo``, the authors' CIFAR-10 notebook: crop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1)
  p 0.8, grayscale p 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moco.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the authors' CIFAR-10 notebook's constants
CIFAR_STD = (0.2023, 0.1994, 0.2010)

BLUR_SIGMA = (0.1, 2.0)
#: Inputs up to this size (CIFAR's 32 px, STL's 96 px is above) are resized to the crop size
#: itself before the center crop, as the CIFAR-10 notebook's test transform.
SMALL_INPUT = 64


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation after the random resized crop (area ``scale``, aspect
    ``ratio``). ``order``: the steps in the order the per-image pipeline applies them, among
    ``flip``, ``jitter``, ``gray`` and ``blur``. ``jitter_p`` 1 is a ColorJitter applied
    always (not wrapped in RandomApply: no draw for it)."""

    name: str
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    flip_p: float = 0.5
    order: tuple[str, ...] = ("jitter", "gray", "blur", "flip")

    @property
    def colour_steps(self) -> tuple[str, ...]:
        """``order`` without the flip: the batched path flips inside its crop matrix (a flip
        commutes with the per-pixel, global-mean and symmetric-blur steps)."""
        return tuple(s for s in self.order if s != "flip")


#: The recipes by ``--aug`` name, with the crop's area from 0.2 (``--crop-min-scale``).
RECIPES: dict[str, Recipe] = {
    "v1": Recipe("v1", (0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                 order=("gray", "jitter", "flip")),
    "v2": Recipe("v2", (0.2, 1.0), blur_p=0.5, order=("jitter", "gray", "blur", "flip")),
    "cifar-demo": Recipe("cifar-demo", (0.2, 1.0), order=("flip", "jitter", "gray")),
}


def make_recipe(aug: str, crop_min_scale: float) -> Recipe:
    """The recipe ``aug`` of :data:`RECIPES` with crops of area ``crop_min_scale`` to 1."""
    if aug not in RECIPES:
        raise ConfigError(f"unknown augmentation {aug!r}; choose v1, v2 or cifar-demo")
    return replace(RECIPES[aug], scale=(crop_min_scale, 1.0))


def resized_short_side(image_size: int) -> int:
    """``image_size`` scaled by 256/224: the short side of Resize(256) + CenterCrop(224) of
    ``main_lincls.py``'s evaluation, for any crop size."""
    return round(image_size * 256 / 224)


def eval_resize_size(image_size: int) -> int:
    """The short side an evaluation image is resized to before its ``image_size`` center
    crop: :func:`resized_short_side` (256 for 224 px), the crop size itself for small
    inputs."""
    return image_size if image_size <= SMALL_INPUT else resized_short_side(image_size)
