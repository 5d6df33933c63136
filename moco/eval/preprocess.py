"""The preprocessing a loaded encoder expects, as torchvision's ``weights.transforms()``::

    model, info = load_backbone("runs/pretrain/checkpoint_0199.pth.tar")
    preprocess = info.transforms()
    features = model(preprocess(Image.open("cat.png"))[None])  # [1, D]

Any PIL image (any mode: grayscale, palette with or without transparency, RGBA, CMYK, 16-bit)
or image file is converted to 8-bit RGB, its short side resized and the center cropped to the
pretraining run's image size (as ``main_lincls.py``'s validation transform:
:func:`moco.data.augment.eval_transform`), scaled to [0, 1] and normalised with the run's
mean and std: a float tensor [3, S, S].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from moco.data.augment import eval_transform
from moco.data.recipes import eval_resize_size
from moco.data.source import open_rgb, to_rgb


class Preprocess:
    """Image (PIL, any mode, or a path) -> normalised tensor [3, image_size, image_size]."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._transform = eval_transform(self.image_size, self.mean, self.std)

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        rgb = open_rgb(image) if isinstance(image, str | Path) else to_rgb(image)
        out: torch.Tensor = self._transform(rgb)
        return out

    def __repr__(self) -> str:
        return (f"Preprocess(RGB, Resize({eval_resize_size(self.image_size)}), "
                f"CenterCrop({self.image_size}), ToTensor, Normalize(mean={list(self.mean)}, "
                f"std={list(self.std)}))")
