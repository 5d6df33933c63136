"""Configuration: defaults < preset < YAML < flags, presets per REFERENCE.md, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moco.cli import build_parser, main
from moco.commands.pretrain import config_from_args
from moco.config import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MocoConfig,
    build_config,
    load_yaml,
    save_yaml,
)


def _cfg(*argv: str) -> MocoConfig:
    args = build_parser().parse_args(["pretrain", *argv])
    return config_from_args(args)


def _yaml(tmp_path: Path, values: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(values))
    return p


# ----- defaults and presets ---------------------------------------------------------------

def test_defaults_are_main_moco_py() -> None:
    c = MocoConfig()
    assert (c.arch, c.epochs, c.batch_size, c.lr) == ("resnet50", 200, 256, 0.03)
    assert c.schedule == [120, 160] and c.cos is False
    assert (c.momentum, c.wd) == (0.9, 1e-4)
    assert (c.moco_dim, c.moco_k, c.moco_m, c.moco_t) == (128, 65536, 0.999, 0.07)
    assert c.mlp is False and c.aug == "v1"
    assert (c.image_size, c.crop_min_scale) == (224, 0.2)
    assert c.mean == pytest.approx(list(IMAGENET_MEAN)) and c.std == pytest.approx(list(IMAGENET_STD))
    c.validate()


def test_preset_mocov1() -> None:
    c = build_config(preset="mocov1")
    assert (c.arch, c.lr, c.batch_size, c.epochs, c.schedule, c.cos) == (
        "resnet50", 0.03, 256, 200, [120, 160], False)
    assert (c.moco_dim, c.moco_k, c.moco_m, c.moco_t, c.mlp, c.aug) == (128, 65536, 0.999, 0.07, False, "v1")
    assert (c.momentum, c.wd, c.image_size, c.crop_min_scale) == (0.9, 1e-4, 224, 0.2)
    assert c.preset == "mocov1"
    c.validate()


def test_preset_mocov2() -> None:
    c = build_config(preset="mocov2")
    assert (c.arch, c.lr, c.batch_size, c.epochs, c.cos) == ("resnet50", 0.03, 256, 200, True)
    assert (c.moco_dim, c.moco_k, c.moco_m, c.moco_t, c.mlp, c.aug) == (128, 65536, 0.999, 0.2, True, "v2")
    assert (c.momentum, c.wd, c.image_size, c.crop_min_scale) == (0.9, 1e-4, 224, 0.2)
    assert c.cos_one_based is False
    c.validate()


def test_preset_cifar10_is_the_demo() -> None:
    c = build_config(preset="cifar10")
    assert (c.arch, c.cifar_stem) == ("resnet18", True)
    assert (c.moco_dim, c.moco_k, c.moco_m, c.moco_t) == (128, 4096, 0.99, 0.1)
    assert (c.bn_splits, c.symmetric, c.mlp) == (8, False, False)
    assert c.shuffle_bn in ("split", "auto")  # auto = SplitBatchNorm in one process
    assert (c.lr, c.batch_size, c.momentum, c.wd, c.epochs) == (0.06, 512, 0.9, 5e-4, 200)
    assert (c.cos, c.cos_one_based, c.schedule) == (True, True, [])
    assert (c.aug, c.image_size, c.crop_min_scale) == ("cifar-demo", 32, 0.08)
    assert c.mean == pytest.approx(list(CIFAR_MEAN)) and c.std == pytest.approx(list(CIFAR_STD))
    assert (c.knn_k, c.knn_t, c.knn_features) == (200, 0.1, "head")
    c.validate()


def test_presets_do_not_share_mutable_state() -> None:
    a = build_config(preset="cifar10")
    a.mean[0] = 9.0
    a.schedule.append(5)
    b = build_config(preset="cifar10")
    assert b.mean == pytest.approx(list(CIFAR_MEAN)) and b.schedule == []


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="preset"):
        build_config(preset="mocov3")


# ----- precedence ----------------------------------------------------------------------------

def test_precedence_defaults_preset_yaml_flags(tmp_path: Path) -> None:
    y = _yaml(tmp_path, {"lr": 0.1, "moco-k": 1024, "moco_t": 0.3, "batch_size": 64})
    c = _cfg("data", "--preset", "mocov2", "--config", str(y), "--lr", "0.5", "--moco-m", "0.9")
    assert c.lr == 0.5  # flag over YAML
    assert c.moco_m == 0.9  # flag over preset
    assert c.moco_k == 1024 and c.batch_size == 64  # YAML over preset/defaults
    assert c.moco_t == 0.3  # YAML over preset (0.2)
    assert c.mlp is True and c.aug == "v2" and c.cos is True  # preset over defaults
    assert c.wd == 1e-4 and c.arch == "resnet50"  # defaults
    assert c.data == "data"


def test_flags_not_given_do_not_override(tmp_path: Path) -> None:
    y = _yaml(tmp_path, {"epochs": 7, "mlp": True})
    c = _cfg("data", "--config", str(y))
    assert c.epochs == 7 and c.mlp is True
    assert c.lr == 0.03


def test_yaml_can_name_preset_and_flag_preset_wins(tmp_path: Path) -> None:
    y = _yaml(tmp_path, {"preset": "cifar10", "epochs": 3})
    c = build_config(yaml_path=y)
    assert c.preset == "cifar10" and c.moco_k == 4096 and c.epochs == 3
    c = _cfg("data", "--config", str(y), "--preset", "mocov2")
    assert c.preset == "mocov2" and c.moco_k == 65536 and c.epochs == 3 and c.mlp is True


def test_boolean_flags() -> None:
    assert _cfg("d", "--preset", "mocov2", "--cos", "false").cos is False
    assert _cfg("d", "--preset", "mocov2", "--mlp", "no").mlp is False
    assert _cfg("d", "--mlp").mlp is True
    assert _cfg("d", "--cos").cos is True
    assert _cfg("d", "--symmetric", "true").symmetric is True
    assert _cfg("d", "--aug-plus").aug == "v2"
    assert _cfg("d", "--aug", "cifar-demo").aug == "cifar-demo"
    assert _cfg("d", "--schedule", "30", "40").schedule == [30, 40]
    assert _cfg("d", "--channels-last", "false").channels_last is False
    assert _cfg("d", "--channels-last", "auto").channels_last == "auto"
    with pytest.raises(SystemExit):
        _cfg("d", "--mlp", "maybe")


def test_original_flag_aliases() -> None:
    c = _cfg("d", "-a", "resnet18", "-b", "32", "--learning-rate", "0.2", "--weight-decay", "0.001",
             "-j", "0", "-p", "5")
    assert (c.arch, c.batch_size, c.lr, c.wd, c.workers, c.print_freq) == ("resnet18", 32, 0.2, 0.001, 0, 5)


def test_cli_only_flags_are_not_config(tmp_path: Path) -> None:
    y = _yaml(tmp_path, {"epochs": 2})
    c = _cfg("d", "--config", str(y), "--overwrite", "--no-progress")
    assert c.epochs == 2


def test_config_yaml_round_trip(tmp_path: Path) -> None:
    c = build_config(preset="cifar10", overrides={"epochs": 5, "data": "somewhere"})
    save_yaml(c, tmp_path / "config.yaml")
    again = build_config(yaml_path=tmp_path / "config.yaml")
    assert again == c


# ----- errors ---------------------------------------------------------------------------------

def test_unknown_yaml_key(tmp_path: Path) -> None:
    y = _yaml(tmp_path, {"lr": 0.1, "learning_rat": 0.2})
    with pytest.raises(ValueError, match="learning_rat"):
        build_config(yaml_path=y)
    with pytest.raises(ValueError, match="learning_rat"):
        load_yaml(y)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        build_config(yaml_path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(ValueError, match="YAML"):
        build_config(yaml_path=bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        build_config(yaml_path=listing)


def test_unknown_override_key() -> None:
    with pytest.raises(ValueError, match="bogus"):
        build_config(overrides={"bogus": 1})


BAD = [
    ({"moco_m": 1.0}, "moco-m"),
    ({"moco_m": -0.1}, "moco-m"),
    ({"moco_t": 0.0}, "moco-t"),
    ({"moco_t": -0.2}, "moco-t"),
    ({"lr": -0.01}, "lr"),
    ({"epochs": 0}, "epochs"),
    ({"moco_dim": 0}, "moco-dim"),
    ({"moco_k": 0}, "moco-k"),
    ({"moco_k": 4, "batch_size": 8, "bn_splits": 1}, "moco-k"),
    ({"moco_k": 12, "batch_size": 8, "bn_splits": 1, "symmetric": True}, "symmetric"),
    ({"batch_size": 10, "bn_splits": 4, "moco_k": 64, "shuffle_bn": "split"}, "bn-splits"),
    ({"bn_splits": 0}, "bn-splits"),
    ({"wd": -1.0}, "wd"),
    ({"batch_size": 0}, "batch-size"),
    ({"aug": "v3"}, "aug"),
    ({"shuffle_bn": "sync"}, "shuffle-bn"),
    ({"crop_min_scale": 0.0}, "crop-min-scale"),
]


@pytest.mark.parametrize(("values", "flag"), BAD)
def test_invalid_values_raise_clear_errors(values: dict, flag: str) -> None:
    cfg = build_config(overrides=values)
    with pytest.raises(ValueError, match=flag):
        cfg.validate()


def test_valid_edge_values() -> None:
    build_config(overrides={"moco_m": 0.0}).validate()  # m = 0 is allowed (the ablation)
    build_config(overrides={"lr": 0.0}).validate()
    build_config(overrides={"moco_k": 8, "batch_size": 8, "bn_splits": 2,
                            "shuffle_bn": "split"}).validate()  # K == N
    build_config(overrides={"moco_k": 12, "batch_size": 8, "bn_splits": 2,
                            "shuffle_bn": "split"}).validate()  # N does not divide K: fine
    # Not divisible by bn-splits is fine without SplitBatchNorm (--bn-splits 1 or syncbn)...
    build_config(overrides={"batch_size": 10, "bn_splits": 1, "shuffle_bn": "none",
                            "moco_k": 64}).validate()
    build_config(overrides={"batch_size": 10, "bn_splits": 4, "shuffle_bn": "syncbn",
                            "moco_k": 64}).validate()
    # ... but --shuffle-bn none keeps the sub-batches, so they must be equal.
    with pytest.raises(ValueError, match="not divisible by --bn-splits 4"):
        build_config(overrides={"batch_size": 10, "bn_splits": 4, "shuffle_bn": "none",
                                "moco_k": 64}).validate()


def test_cli_reports_invalid_value_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["pretrain", str(tmp_path), "--moco-m", "1.5", "--output", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--moco-m" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written before validation


def test_channels_last_auto_is_cuda_only() -> None:
    auto = build_config(overrides={"data": "d"})
    assert auto.channels_last == "auto"
    assert not auto.channels_last_on("cpu") and auto.channels_last_on("cuda")
    forced = build_config(overrides={"data": "d", "channels_last": True})
    assert forced.channels_last_on("cpu") and forced.channels_last_on("cuda")
    off = build_config(overrides={"data": "d", "channels_last": False})
    assert not off.channels_last_on("cuda")
    with pytest.raises(ValueError, match="--channels-last must be true, false or auto"):
        build_config(overrides={"data": "d", "channels_last": "sometimes"}).validate()
