"""Every command's flags come from one declaration: the parser derived from the declared
settings (flags, help with the default, type and range), nothing undeclared, the shared flags
declared once, and the same kind of true/false flag everywhere."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

from moco.cli import COMMANDS, build_parser
from moco.cli.declared import command_settings, default_text, expand_switches
from moco.utils import common_settings as common
from moco.utils.settings import Setting, defaults

#: The commands whose flags are generated (ablate, hub and zoo declare theirs by hand: KEY=VALUE
#: lists and sub-commands with flags of their own).
DECLARED_COMMANDS = ("pretrain", "lincls", "knn", "embed", "export", "shard", "cache", "neighbours",
                     "detectron2_config")
SHARED = {"workers": ("-j", "--workers"), "device": ("--device",),
          "image_size": ("--image-size",), "batch_size": ("-b", "--batch-size"),
          "precision": ("--precision",), "seed": ("--seed",)}


def subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser(command)._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command.replace("_", "-")]


def declared(command: str) -> tuple[type, ...]:
    return importlib.import_module(f"moco.cli.{command}").DECLARED  # type: ignore[no-any-return]


def all_defaults(classes: tuple[type, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in classes:
        out.update(defaults(cls))
    return out


def test_the_list_covers_every_generated_command() -> None:
    generated = {c for c in COMMANDS if hasattr(importlib.import_module(f"moco.cli.{c}"),
                                                "DECLARED")}
    assert generated == set(DECLARED_COMMANDS)


@pytest.mark.parametrize("command", DECLARED_COMMANDS)
def test_the_parser_is_derived_from_the_declaration(command: str) -> None:
    p = subparser(command)
    classes = declared(command)
    settings, values = command_settings(classes), all_defaults(classes)
    by_dest = {a.dest: a for a in p._actions if isinstance(a, argparse._StoreAction)}
    flags = {f for a in p._actions for f in a.option_strings} - {"-h", "--help"}
    declared_flags = {f for s in settings.values() if not s.positional for f in s.flags}
    shortcuts = {flag for s in settings.values() for flag, _, _ in s.shortcuts}
    assert flags == declared_flags | shortcuts, "a flag that is not declared, or one missing"
    for name, s in settings.items():
        action = by_dest[name]
        assert action.default is argparse.SUPPRESS, name  # not given: absent, the dataclass's
        if s.positional:
            assert not action.option_strings and action.metavar == s.metavar
            continue
        assert tuple(action.option_strings) == s.flags, name
        assert action.required == s.required, name
        text = action.help.replace("%%", "%")
        assert text.startswith(s.help), name
        if not s.required:
            assert text.endswith(f"(default: {default_text(s, values.get(name))})"), name
        if s.kind in ("bool", "bool_or_auto"):
            assert action.nargs == "?" and action.const is True, name
        if s.choices is not None and s.metavar is None:
            assert action.metavar == "{" + ",".join(c for c in s.choices if c) + "}", name


@pytest.mark.parametrize("command", DECLARED_COMMANDS)
def test_help_shows_each_default_once_and_never_none(command: str) -> None:
    text = subparser(command).format_help()
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text)


def _below(s: Setting) -> str | None:
    """A value just outside the range of a numeric setting, as typed."""
    if s.kind not in ("int", "float") or s.min is None:
        return None
    return str(int(s.min) - 1) if s.kind == "int" else str(s.min - 1)


@pytest.mark.parametrize("command", DECLARED_COMMANDS)
def test_every_numeric_flag_is_checked_against_its_range(command: str) -> None:
    """A value out of range is refused with one line naming the flag, before any work: the
    positionals given are names that do not exist, so any later step would fail otherwise."""
    settings = command_settings(declared(command))
    positionals = [str(Path("/nonexistent") / n) for n, s in settings.items() if s.positional
                   and s.required]
    if command == "cache":
        positionals = ["list"]
    required = [x for n, s in settings.items() if s.required and not s.positional
                for x in (s.flag, "torchvision" if n == "format" else "/nonexistent/x.npy")]
    checked = 0
    for name, s in settings.items():
        bad = _below(s)
        if bad is None or s.positional:
            continue
        rc, _, err = run_cli([command.replace("_", "-"), *positionals, *required, s.flag, bad])
        assert rc == 2 and f"expected {s.flag}" in err and f"got {bad}" in err, (name, err)
        assert err.count("\n") == 1, err
        checked += 1
    assert checked or command in ("export",)


@pytest.mark.parametrize("name", sorted(SHARED))
def test_the_shared_flags_are_declared_once(name: str) -> None:
    """-j, --device, --image-size, -b, --precision and --seed: the same flags, type and range
    in every command that has them."""
    seen: list[Setting] = []
    for command in DECLARED_COMMANDS:
        s = command_settings(declared(command)).get(name)
        if s is not None:
            seen.append(s)
            assert s.flags == SHARED[name], (command, s.flags)
    assert len(seen) >= 2
    assert len({(s.kind, s.min, s.max, s.min_open, s.max_open) for s in seen}) == 1, seen


def test_a_huge_seed_gives_the_same_line_in_every_command() -> None:
    says = f"expected --seed in [0, {common.MAX_SEED}], got 99999999999 (from the command line)"
    for argv in (["shard", "d", "o"], ["pretrain", "d"], ["lincls", "d", "--pretrained", "c"],
                 ["export", "c", "-f", "torchvision", "-o", "x"]):
        rc, _, err = run_cli([*argv, "--seed", "99999999999"])
        assert rc == 2 and says in err and err.count("\n") == 1, (argv, err)


# ----- true/false flags -------------------------------------------------------------------------

def test_true_false_flags_are_the_same_kind_in_every_command(tmp_path: Path) -> None:
    from moco.cli.declared import given_values
    from moco.cli.lincls import DECLARED as LINCLS
    from moco.cli.pretrain import DECLARED as PRETRAIN

    for command, classes in (("pretrain", PRETRAIN), ("lincls", LINCLS)):
        p = subparser(command)
        positional = ["d"]
        assert given_values(p.parse_args([*positional, "--cos"]), classes)["cos"] is True
        assert given_values(p.parse_args([*positional, "--cos", "false"]), classes)["cos"] is False
        assert given_values(p.parse_args([*positional, "--cos", "no"]), classes)["cos"] is False


def test_a_folder_after_a_true_false_flag_is_the_positional(tmp_path: Path) -> None:
    switches = {"-e": False, "--cos": False, "--channels-last": True}
    data = str(tmp_path)
    assert expand_switches(["-e", data], switches) == ["-e", "true", data]
    assert expand_switches(["--cos", "false", data], switches) == ["--cos", "false", data]
    assert expand_switches(["--cos", "--lr", "1"], switches) == ["--cos", "--lr", "1"]
    assert expand_switches(["--cos", "maybe"], switches) == ["--cos", "maybe"]  # its value
    assert expand_switches(["--channels-last", "auto"], switches) == ["--channels-last", "auto"]
    assert expand_switches(["--", "-e", data], switches) == ["--", "-e", data]
    p = subparser("lincls")
    args = p.parse_args(["-e", data, "--resume", "x"])
    assert (args.evaluate, args.data) == ("true", data)
    rc, _, err = run_cli(["pretrain", str(tmp_path / "d"), "--mlp", "maybe"])
    assert rc == 2 and "expected --mlp to be true or false, got maybe" in err


# ----- library calls: errors name the parameter -------------------------------------------------

def test_library_errors_name_the_parameter_not_the_flag(tmp_path: Path) -> None:
    from moco import ConfigError, LinclsConfig, embed_images, knn_evaluate

    with pytest.raises(ConfigError, match=r"^expected k >= 1, got 0 \(given to knn_evaluate\)$"):
        knn_evaluate(tmp_path, tmp_path / "c.pth", k=0)
    with pytest.raises(ConfigError, match=r"^expected batch_size >= 1, got 0"):
        embed_images(tmp_path, tmp_path / "c.pth", tmp_path / "e.npy", batch_size=0)
    with pytest.raises(ConfigError, match=r"^out .*e\.csv: the file must end in .npy"):
        embed_images(tmp_path, tmp_path / "c.pth", tmp_path / "e.csv")
    with pytest.raises(ConfigError, match=r"^expected epochs >= 1, got 0 \(given to "
                       r"LinclsConfig\)$"):
        LinclsConfig(data="d", pretrained="c", epochs=0)
    with pytest.raises(ConfigError, match="^give pretrained .* or resume"):
        LinclsConfig(data="d").validate()
    with pytest.raises(TypeError, match=r"knn_evaluate\(\) got an unexpected keyword argument "
                       "'kk'"):
        knn_evaluate(tmp_path, tmp_path / "c.pth", kk=3)
