"""What the input pipeline reads of a run: :class:`InputSettings`.

The data package never sees a command's whole configuration: the training loaders
(:mod:`moco.data.loaders`) and the evaluation pipeline take this small frozen object. A
pretraining run builds it from its configuration (``MocoConfig.input_settings()``), ``moco knn``
from the settings a checkpoint's run recorded (``moco.eval.features.eval_config``), tests
directly. The defaults are declared here once; the pretraining configuration's fields take
theirs from :data:`INPUT_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moco.data.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPES

AUGMENTATIONS = tuple(RECIPES)  # v1, v2, cifar-demo
LOADERS = ("auto", "tensor", "pil")
BAD_IMAGE_POLICIES = ("stop", "skip")
CROPS = ("auto", "original", "short-side")
DECODES = ("auto", "cpu", "gpu")

_CHOICES = {"aug": AUGMENTATIONS, "loader": LOADERS, "on_bad_image": BAD_IMAGE_POLICIES,
            "crops": CROPS, "decode": DECODES}


@dataclass(frozen=True)
class InputSettings:
    """The settings the input pipeline reads; defaults are ``main_moco.py``'s (MoCo v1).

    ``batch_size`` is the batch of the process that reads (a pretraining run passes its
    per-rank slice of the global batch). ``workers`` -1: the caller's default count.
    ``channels_last``: True, False or ``"auto"`` (on CUDA only, :meth:`channels_last_on`).
    """

    image_size: int = 224
    batch_size: int = 256
    seed: int = 0
    aug: str = "v1"
    crop_min_scale: float = 0.2
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    loader: str = "auto"
    crops: str = "auto"
    decode: str = "auto"
    shuffle_buffer: int = 1000
    cache_dir: str = ""
    on_bad_image: str = "stop"
    workers: int = -1
    channels_last: bool | str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                from moco.core.errors import ConfigError

                raise ConfigError(f"expected {name} to be one of {', '.join(choices)}, got "
                                  f"{getattr(self, name)!r} (given to InputSettings)")

    def channels_last_on(self, device_type: str) -> bool:
        """Whether to use the channels_last memory format on a ``device_type`` device."""
        return device_type == "cuda" if self.channels_last == "auto" else bool(self.channels_last)

    @classmethod
    def of(cls, values: Any) -> InputSettings:
        """The settings of ``values`` (an object or a mapping with at least these names)."""
        if isinstance(values, dict):
            return cls(**{k: values[k] for k in INPUT_SETTINGS})
        return cls(**{k: getattr(values, k) for k in INPUT_SETTINGS})


#: The default of every input setting (what a command's declaration of it starts from).
INPUT_DEFAULTS = InputSettings()
#: The names of the input settings.
INPUT_SETTINGS = tuple(f.name for f in dataclasses.fields(InputSettings))
