"""Configuration: defaults < preset < YAML < flags, presets per REFERENCE.md, validation."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from moco.cli import build_parser, main
from moco.cli.pretrain import config_from_args
from moco.core.errors import ConfigError
from moco.engine.config import (
    CIFAR_MEAN,
    CIFAR_STD,
    DEFAULTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PER_INVOCATION,
    PER_RANK_SETTINGS,
    PRESETS,
    RESUME_FREE,
    RUNTIME_SETTINGS,
    SETTINGS,
    MocoConfig,
)
from moco.engine.config_sources import build_config, load_yaml, save_yaml


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
    with pytest.raises(ConfigError,
                       match=r"expected --mlp to be true or false, got maybe \(from the command line\)"):
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
    ({"aug": "v4"}, "aug"),
    ({"shuffle_bn": "sync"}, "shuffle-bn"),
    ({"crop_min_scale": 0.0}, "crop-min-scale"),
]


@pytest.mark.parametrize(("values", "flag"), BAD)
def test_invalid_values_raise_clear_errors(values: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        build_config(overrides=values).validate()


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
    with pytest.raises(ConfigError, match="expected --channels-last to be true, false or auto, "
                       "got sometimes"):
        build_config(overrides={"data": "d", "channels_last": "sometimes"}).validate()


# ----- one declaration: the flags, the help and the derived lists come from MocoConfig ---------

def _pretrain_parser() -> Any:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["pretrain"]


def test_every_setting_has_its_generated_flag_help_default_and_choices() -> None:
    actions = {a.dest: a for a in _pretrain_parser()._actions if a.const is None or a.nargs == "?"}
    for name, s in SETTINGS.items():
        a = actions[name]
        if s.positional:
            assert a.option_strings == []
        else:
            assert tuple(a.option_strings) == s.flags, name
        default = DEFAULTS[name]
        shown = (s.default_text if s.default_text is not None else
                 str(default).lower() if isinstance(default, bool) else
                 " ".join(map(str, default)) or "none" if isinstance(default, list) else
                 "none" if default == "" else str(default))
        assert f"(default: {shown})" in a.help.replace("%%", "%"), name
        assert s.help in a.help.replace("%%", "%")
        if s.choices is not None:
            assert a.metavar == "{" + ",".join(c for c in s.choices if c) + "}", name
    # Parsing no flags gives the dataclass's defaults (a flag never carries a default of its own).
    assert _cfg("d") == MocoConfig(data="d")
    help_text = _pretrain_parser().format_help()
    assert "(default: 65536)" in help_text and "(default: 0.999)" in help_text


def test_the_original_flag_names_and_aliases_are_kept() -> None:
    opts = {o for a in _pretrain_parser()._actions for o in a.option_strings}
    for flag in ("-a", "--arch", "-b", "--batch-size", "--lr", "--learning-rate", "--wd",
                 "--weight-decay", "-j", "--workers", "-p", "--print-freq", "--epochs",
                 "--schedule", "--momentum", "--seed", "--resume", "--moco-dim", "--moco-k",
                 "--moco-m", "--moco-t", "--mlp", "--aug-plus", "--cos", "--stop-after-epochs",
                 "--time-limit", "--preset", "--config", "--overwrite", "--no-progress"):
        assert flag in opts, flag


def test_the_lists_of_settings_that_do_not_change_training_are_derived() -> None:
    import moco.ablation.grid as grid
    import moco.engine.run_state as run_state
    import moco.engine.world as world

    assert run_state.RESUME_FREE is RESUME_FREE
    assert grid.IGNORED_WHEN_COMPARING is RUNTIME_SETTINGS
    assert world.PER_RANK_SETTINGS is PER_RANK_SETTINGS
    # The sets the three modules had written out, now one declaration (the ablation ignores
    # the per-invocation limits and the cache folder too, the ranks may differ in cache folder).
    old_resume_free = {"resume", "output", "data", "workers", "print_freq", "keep_last",
                       "save_every_steps", "dist_timeout", "cache_dir", "knn_every", "knn_k",
                       "knn_t", "knn_features", "staleness_every", "staleness_batches", "preset",
                       "device", "stop_after_epochs", "time_limit"}
    old_ignored = {"resume", "output", "workers", "print_freq", "keep_last", "save_every_steps",
                   "knn_every", "device", "dist_timeout", "staleness_every", "staleness_batches"}
    assert old_resume_free <= RESUME_FREE and old_ignored <= RUNTIME_SETTINGS < RESUME_FREE
    assert {"data", "knn_k", "knn_t", "knn_features"}.isdisjoint(RUNTIME_SETTINGS)
    assert {"data", "workers", "cache_dir"} <= PER_RANK_SETTINGS
    assert {"resume", "stop_after_epochs", "time_limit", "overwrite"} == PER_INVOCATION
    for name, s in SETTINGS.items():
        assert (name in RESUME_FREE) == (s.role != "training"), name
    assert {"lr", "moco_k", "arch", "seed"}.isdisjoint(RESUME_FREE)


def test_presets_pass_the_declared_checks() -> None:
    for name, values in PRESETS.items():
        cfg = MocoConfig(preset=name)
        for k, v in values.items():
            assert getattr(cfg, k) == v, (name, k)
        cfg.validate()


def test_the_dataclass_applies_a_preset_or_refuses_it() -> None:
    assert MocoConfig(preset="mocov2", data="d") == build_config(preset="mocov2",
                                                                 overrides={"data": "d"})
    c = MocoConfig(preset="mocov2", moco_t=0.5, cos=False)
    assert (c.moco_t, c.cos, c.mlp, c.aug) == (0.5, False, True, "v2")  # given values win
    assert MocoConfig(preset="cifar10").mean == pytest.approx(list(CIFAR_MEAN))
    with pytest.raises(ConfigError, match="--preset .*mocov1, mocov2, cifar10.*'mocov3'"):
        MocoConfig(preset="mocov3")


# ----- every value from every source: the same checks, the source named ------------------------

HOSTILE = [  # (key, value, what the error says)
    ("print_freq", 0, "expected --print-freq >= 1, got 0"),
    ("moco_t", float("inf"), "expected --moco-t to be a finite number > 0"),
    ("moco_t", float("nan"), "expected --moco-t to be a finite number > 0"),
    ("lr", "abc", "expected --lr to be a finite number >= 0, got abc"),
    ("epochs", 3.5, "expected --epochs to be an integer >= 1, got 3.5"),
    ("epochs", 2.0, "expected --epochs to be an integer >= 1, got 2.0"),
    ("epochs", True, "expected --epochs to be an integer >= 1, got True"),
    ("seed", 2**70, "expected --seed in [0, 4294967295], got 1180591620717411303424"),
    ("seed", -1, "expected --seed in [0, 4294967295], got -1"),
    ("mlp", "maybe", "expected --mlp to be true or false, got maybe"),
    ("mlp", 2, "expected --mlp to be true or false, got 2"),
    ("mean", [0.5, 0.5], "expected --mean to be a list of 3 finite numbers"),
    ("std", [0.2, 0.0, 0.2], "expected --std to hold values > 0"),
    ("dist_timeout", 1e300, "expected --dist-timeout in (0, 525600]"),
    ("workers", 10**9, "expected --workers in [-1, 1024]"),
    ("aug", "v4", "expected --aug to be one of v1, v2, cifar-demo, v3, cifar-v3, got v4"),
    ("schedule", [120, "x"], "expected --schedule to be a list of integers"),
    ("output", ["a"], "expected --output to be text, got ['a']"),
    ("crop_min_scale", 0, "expected --crop-min-scale in (0, 1], got 0"),
]


@pytest.mark.parametrize(("key", "value", "says"), HOSTILE)
def test_yaml_values_are_checked_naming_the_flag_key_and_file(tmp_path: Path, key: str,
                                                                value: Any, says: str) -> None:
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError) as e:
        build_config(yaml_path=y)
    assert says in str(e.value) and f"(key '{key}' in {y})" in str(e.value)


@pytest.mark.parametrize(("key", "value", "says"), HOSTILE)
def test_python_values_are_checked_too(key: str, value: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        MocoConfig(**{key: value})
    with pytest.raises(ConfigError, match=re.escape(says)):
        build_config(overrides={key: value})
    cfg = MocoConfig()
    setattr(cfg, key, value)  # assigned after construction: validate() checks again
    with pytest.raises(ConfigError, match=re.escape(says)):
        cfg.validate()


@pytest.mark.parametrize(("argv", "says"), [
    (["-p", "0"], "expected --print-freq >= 1, got 0 (from the command line)"),
    (["--moco-t", "inf"], "expected --moco-t to be a finite number > 0, got inf"),
    (["--moco-t", "nan"], "expected --moco-t to be a finite number > 0, got nan"),
    (["--epochs", "2.5"], "expected --epochs to be an integer >= 1, got 2.5"),
    (["--seed", "99999999999999999999999"], "expected --seed in [0, 4294967295]"),
    (["--lr", "0x"], "expected --lr to be a finite number >= 0, got 0x"),
    (["--time-limit", "inf"], "expected --time-limit to be a finite number >= 0"),
    (["--schedule", "1", "b"], "expected --schedule to be a list of integers"),
    (["--output", "a\0b"], "to be text without NUL characters"),
])
def test_flags_are_checked_by_the_same_declaration(argv: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        _cfg("d", *argv)


def test_yaml_strings_are_parsed_never_truthy(tmp_path: Path) -> None:
    y = _yaml(tmp_path, {"mlp": "false", "cos": "no", "symmetric": "TRUE", "lr": "1e-4",
                         "epochs": "7", "channels_last": "Auto"})
    c = build_config(yaml_path=y)
    assert (c.mlp, c.cos, c.symmetric, c.lr, c.epochs, c.channels_last) == (
        False, False, True, 1e-4, 7, "auto")
    unquoted = tmp_path / "u.yaml"
    unquoted.write_text("wd: 1e-4\nmlp: off\n")  # YAML 1.1 reads 1e-4 as text, off as False
    c = build_config(yaml_path=unquoted)
    assert c.wd == 1e-4 and c.mlp is False


def test_unknown_keys_name_the_closest_setting(tmp_path: Path) -> None:
    y = _yaml(tmp_path, {"learning_rat": 0.2})
    with pytest.raises(ConfigError, match=r"unknown setting 'learning_rat' in config file .*"
                       r"did you mean 'learning_rate'"):
        build_config(yaml_path=y)
    y = _yaml(tmp_path, {"learning-rate": 0.2, "weight_decay": 0.001}, "aliases.yaml")
    c = build_config(yaml_path=y)
    assert (c.lr, c.wd) == (0.2, 0.001)  # the long flags' aliases are keys too


def test_yaml_aliases_and_huge_files_are_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    lines.append("schedule: *i")
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: aliases \(\*a\) are not accepted"):
        build_config(yaml_path=bomb)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\nepochs: 1\n")
    with pytest.raises(ConfigError, match="more than a settings file can be"):
        build_config(yaml_path=big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("schedule: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=str(deep)):
        build_config(yaml_path=deep)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        build_config(yaml_path=folder)
    with pytest.raises(ConfigError, match="/dev/zero is not a regular file"):
        build_config(yaml_path="/dev/zero")  # never read (it has no end)
    twice = _yaml(tmp_path, {}, "twice.yaml")
    twice.write_text("epochs: 1\nlr: 0.1\nepochs: 2\n")
    with pytest.raises(ConfigError, match="the key 'epochs' is given twice"):
        build_config(yaml_path=twice)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00epochs")
    with pytest.raises(ConfigError, match="is not a UTF-8 text file"):
        build_config(yaml_path=binary)
    code = _yaml(tmp_path, {}, "code.yaml")
    code.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        build_config(yaml_path=code)


def test_sizes_that_cannot_fit_in_memory_are_refused_before_allocation() -> None:
    with pytest.raises(ConfigError, match=r"the queue \(--moco-k 1000000000000 x --moco-dim 128 "
                       r"float32\) would take 466 TiB, more than the .* of memory available.*"
                       "lower --moco-k"):
        build_config(overrides={"moco_k": 10**12}).validate()
    with pytest.raises(ConfigError, match=r"one batch .* --image-size 1000000 px.* would take"):
        build_config(overrides={"image_size": 10**6}).validate()
    # Within the memory: accepted.
    build_config(overrides={"moco_k": 65536, "moco_dim": 128}).validate()


def test_check_sizes_uses_the_memory_given() -> None:
    from moco.engine.config import check_sizes

    cfg = MocoConfig(moco_k=4096, moco_dim=128, batch_size=8, image_size=32)
    check_sizes(cfg, available=4096 * 128 * 4)  # exactly fits
    with pytest.raises(ConfigError, match=r"would take 2 MiB, more than the 2 MiB"):
        check_sizes(cfg, available=4096 * 128 * 4 - 1)


def test_a_bad_value_in_the_resumed_runs_config_is_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(build_config(overrides={"data": "d"}), run / "config.yaml")
    text = (run / "config.yaml").read_text().replace("print_freq: 10", "print_freq: 0")
    (run / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"expected --print-freq >= 1, got 0 \(key 'print_freq' "
                       rf"in {re.escape(str(run / 'config.yaml'))}\); this is the saved "
                       "configuration of the run being resumed"):
        _cfg("d", "--output", str(run), "--resume", "auto")


def test_empty_output_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected --output to name a run folder"):
        build_config(overrides={"output": " "}).validate()


def test_device_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="expected --device to be auto, cpu, cuda, cuda:N"):
        build_config(overrides={"device": "foo"}).validate()
    build_config(overrides={"device": "cpu"}).validate()


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    y = _yaml(tmp_path, {"moco_t": "inf"})
    out = tmp_path / "out"
    for argv in (["--seed", str(2**70)], ["--config", str(y)], ["-p", "0"], ["--aug", "v9"],
                 ["--epochs"], ["--bogus"]):
        try:
            rc = main(["pretrain", str(tmp_path), "--output", str(out), *argv])
        except SystemExit as e:  # argparse's own errors (a flag without its value)
            rc = int(e.code or 0)
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("moco pretrain: error: ")
    assert not out.exists()
