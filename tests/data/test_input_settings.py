"""What the input pipeline reads of a run (moco.data.input_settings): one declaration of the
defaults, the pretraining configuration's view of it, and the checks of its choices."""

from __future__ import annotations

import dataclasses

import pytest

from moco.core.errors import ConfigError
from moco.data.input_settings import INPUT_DEFAULTS, INPUT_SETTINGS, InputSettings
from moco.engine.config import DEFAULTS, MocoConfig
from moco.eval.features import eval_config


def test_the_pretraining_defaults_are_the_input_defaults() -> None:
    for name in INPUT_SETTINGS:
        got = DEFAULTS[name]
        want = getattr(INPUT_DEFAULTS, name)
        assert (tuple(got) if isinstance(got, list) else got) == want, name
    assert MocoConfig().input_settings() == INPUT_DEFAULTS


def test_a_config_gives_its_values_and_nothing_else() -> None:
    cfg = MocoConfig(preset="cifar10", workers=3, shuffle_buffer=7, on_bad_image="skip")
    s = cfg.input_settings()
    assert (s.image_size, s.batch_size, s.aug, s.workers, s.shuffle_buffer, s.on_bad_image) == (
        32, 512, "cifar-demo", 3, 7, "skip")
    assert s.mean == tuple(cfg.mean) and isinstance(s.mean, tuple)
    assert {f.name for f in dataclasses.fields(s)} == set(INPUT_SETTINGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("channels_last,cpu,cuda", [("auto", False, True), (True, True, True),
                                                     (False, False, False)])
def test_channels_last_on(channels_last: bool | str, cpu: bool, cuda: bool) -> None:
    s = InputSettings(channels_last=channels_last)
    assert (s.channels_last_on("cpu"), s.channels_last_on("cuda")) == (cpu, cuda)


def test_a_choice_outside_the_declared_ones_is_refused() -> None:
    with pytest.raises(ConfigError, match="loader.*fast"):
        InputSettings(loader="fast")


def test_a_checkpoints_evaluation_settings() -> None:
    recorded = {"image_size": 64, "loader": "pil", "precision": "bf16", "lr": 0.5,
                "mean": [0.1, 0.2, 0.3], "channels_last": True}
    ev = eval_config(recorded, image_size=48, mean=[0.5] * 3, std=[0.25] * 3, workers=2)
    assert ev.precision == "bf16"
    assert (ev.inputs.image_size, ev.inputs.loader, ev.inputs.workers) == (48, "pil", 2)
    assert ev.inputs.mean == (0.5, 0.5, 0.5) and ev.inputs.channels_last is True
    assert eval_config(None, image_size=32, mean=[0] * 3, std=[1] * 3,
                       precision="fp32").precision == "fp32"
