"""A command's flags generated from its declaration: every command (``pretrain``, ``lincls``,
``knn``, ``embed``, ``export``, ``shard``, ``cache``, ``neighbours``, ``detectron2-config``;
not yet ``ablate``, ``hub``, ``zoo``) lists the dataclasses that declare its
settings with :func:`moco.utils.settings.setting` (``DECLARED`` in its module), and
:func:`add_declared` turns each field into its argument: flags, help with the default, metavar
and choices.

Values stay text in the parser (``argparse.SUPPRESS``: a flag not given is absent) and are
checked by :func:`given_values` with the same :func:`moco.utils.settings.coerce` as a YAML
file's values, so a bad value gives one line naming the flag. A true/false setting is the same
kind everywhere: ``--cos`` alone means true, ``--cos false`` is accepted too
(:func:`expand_switches` lets the data folder follow such a flag).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moco.utils.settings import (
    FALSE_WORDS,
    TRUE_WORDS,
    Setting,
    coerce,
    declarations,
    defaults,
    from_command_line,
    setting,
)

#: ``parser.moco_switches``: the flags of true/false settings -> whether ``auto`` is a value.
SWITCHES = "moco_switches"


def default_text(s: Setting, default: Any) -> str:
    """The default of a setting as the help shows it."""
    if s.default_text is not None:
        return s.default_text
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return " ".join(str(v) for v in default) or "none"
    if default == "" or default is None:
        return "none"
    return str(default)


def help_text(s: Setting, default: Any) -> str:
    """The help of a setting: its text and, unless it must be given, its default."""
    text = s.help if s.required else f"{s.help} (default: {default_text(s, default)})"
    return text.replace("%", "%%")


def add_setting_argument(group: Any, name: str, s: Setting, default: Any,
                         switches: dict[str, bool] | None = None) -> None:
    """One generated argument: the values stay text here and are checked by
    :func:`given_values` (so a flag, a YAML key and ``--set`` are checked alike). The flags of
    a true/false setting are added to ``switches`` (:func:`expand_switches`)."""
    kw: dict[str, Any] = {"help": help_text(s, default), "default": argparse.SUPPRESS}
    if s.positional:
        group.add_argument(name, nargs=None if s.required else "?", metavar=s.metavar or
                           name.upper(), **kw)
        return
    if s.kind in ("bool", "bool_or_auto"):
        auto = s.kind == "bool_or_auto"
        kw.update(nargs="?", const=True, metavar="true|false" + ("|auto" if auto else ""))
        if switches is not None:
            switches.update(dict.fromkeys(s.flags, auto))
    elif s.kind in ("int_list", "float_list"):
        kw["nargs"] = s.length or "*"
    if s.choices is not None:  # shown, and checked with the other values (given_values)
        kw["metavar"] = "{" + ",".join(c for c in s.choices if c) + "}"
    if s.metavar is not None:
        kw["metavar"] = s.metavar
    group.add_argument(*s.flags, dest=name, required=s.required, **kw)
    for flag, value, text in s.shortcuts:
        group.add_argument(flag, dest=name, action="store_const", const=value, help=text,
                           default=argparse.SUPPRESS)


def command_settings(classes: Sequence[type]) -> dict[str, Setting]:
    """``{field name: Setting}`` of every class of a command's declaration, in order (a
    TypeError names a field declared twice)."""
    out: dict[str, Setting] = {}
    for cls in classes:
        for name, s in declarations(cls).items():
            if name in out:
                raise TypeError(f"{cls.__name__}.{name} is declared twice")
            out[name] = s
    return out


def add_declared(parser: argparse.ArgumentParser, classes: Sequence[type],
                 groups: Sequence[str] = ()) -> None:
    """The arguments of every setting of ``classes``: positionals on ``parser``, the others in
    one argument group per declared ``group`` (``groups`` first, in that order, then the others
    in order of first use)."""
    switches: dict[str, bool] = getattr(parser, SWITCHES, None) or {}
    setattr(parser, SWITCHES, switches)
    made: dict[str, Any] = {g: parser.add_argument_group(g) for g in groups}
    for cls in classes:
        values = defaults(cls)
        for name, s in declarations(cls).items():
            if s.positional:
                add_setting_argument(parser, name, s, values.get(name))
                continue
            if s.group not in made:
                made[s.group] = parser.add_argument_group(s.group)
            add_setting_argument(made[s.group], name, s, values.get(name), switches)


def given_values(args: argparse.Namespace, classes: Sequence[type]) -> dict[str, Any]:
    """The settings given on the command line (absent: not given), each checked by its
    declaration; a bad value is a ConfigError naming the flag."""
    given = vars(args)
    return {name: coerce(name, s, given[name], from_command_line)
            for name, s in command_settings(classes).items() if name in given}


def split_values(values: dict[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` split into those ``cls`` declares and the others."""
    names = declarations(cls)
    return ({k: v for k, v in values.items() if k in names},
            {k: v for k, v in values.items() if k not in names})


def expand_switches(argv: Sequence[str], switches: dict[str, bool]) -> list[str]:
    """``argv`` with ``true`` after each true/false flag followed by a file or folder that
    exists, so that ``--cos DATA`` (the original ``main_moco.py`` command lines) and ``-e DATA``
    read DATA as the positional argument; any other word after such a flag is its value,
    checked as such (``--mlp maybe`` is an error naming --mlp). ``--`` ends the options."""
    out: list[str] = []
    words = {*TRUE_WORDS, *FALSE_WORDS, "auto"}
    for i, token in enumerate(argv):
        out.append(token)
        if token == "--":
            return out + list(argv[i + 1:])
        if token in switches and i + 1 < len(argv):
            nxt = argv[i + 1]
            if nxt.strip().lower() not in words and not nxt.startswith("-") and \
                    os.path.lexists(nxt):
                out.append("true")
    return out


# ----- the flags of one invocation, shared by the commands ------------------------------------
RUN = "run"


@dataclass
class Progress:
    """``--no-progress``: the commands that show a progress bar."""

    no_progress: bool = setting(False, "--no-progress", group=RUN, role="runtime",
                                help="no progress bar")


@dataclass
class Overwrite:
    """``--overwrite``: the commands that write a run folder."""

    overwrite: bool = setting(False, "--overwrite", group=RUN, role="runtime",
                              help="replace a run already in --output")
