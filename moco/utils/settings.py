"""Declaring a setting once: its flags, help, type, choices, range, role and scope.

A config dataclass declares each field with :func:`setting`; the field's metadata holds a
:class:`Setting`. From it come the command-line flags (``moco/cli/pretrain.py``), the
check of every value from every source (:func:`coerce`), and the lists of settings that do
not change training (``role``) or may differ between ranks (``per_rank``).

A value is checked where it enters, with the name of that source in the error: the command
line, a key of a YAML file, a ``--set KEY=VALUE`` of ``moco ablate``, a preset, or the
dataclass itself. The source also decides how the setting is called: by its flag
(``--batch-size``) for the command line and the files, by its parameter name (``batch_size``)
for a value given in Python (:func:`from_parameters`). Strings are parsed (``"false"`` is False, ``"1e-4"`` a float), anything
else of the wrong type is refused (a float where an integer belongs is never rounded), and
NaN or an infinite number is never accepted.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from moco.core.errors import ConfigError, MocoError

#: How a field's annotation is checked.
KINDS = {"str": "str", "int": "int", "float": "float", "bool": "bool", "list[int]": "int_list",
         "list[float]": "float_list", "bool | str": "bool_or_auto"}
#: ``X | None``: the kind of X, and None accepted (a value "not given", e.g. taken later from
#: a checkpoint).
OPTIONAL_SUFFIX = " | None"
#: What a setting changes. ``training``: the trained weights (a resumed run warns when it
#: changes; an ablation refuses a finished run trained with another value). ``data``: where the
#: images are (a resumed run may find them elsewhere; an ablation compares it). ``evaluation``:
#: the reported figures, not the weights (kNN's k, t, features). ``runtime``: neither (workers,
#: logging, checkpoint cadence, device, output folder, per-invocation limits).
ROLES = ("training", "data", "evaluation", "runtime")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
MAX_YAML_BYTES = 1 << 20

Source = Callable[[str], str]
#: ``dataclasses.MISSING``: the default of a setting that must be given (a required flag).
REQUIRED: Any = MISSING


@dataclass(frozen=True)
class Setting:
    """The declaration of one field (its dataclass ``metadata["moco"]``)."""

    flags: tuple[str, ...]
    help: str
    group: str
    kind: str = ""  # from the annotation (KINDS), filled by :func:`declarations`
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    length: int | None = None  # lists of exactly this many values
    role: str = "training"
    per_rank: bool = False  # may differ between torchrun ranks (paths, worker counts)
    per_invocation: bool = False  # never taken from the resumed run's config.yaml
    metavar: str | tuple[str, ...] | None = None
    shortcuts: tuple[tuple[str, Any, str], ...] = ()  # (flag, value, help) store_const flags
    default_text: str | None = None  # the default as the help shows it, when not the value
    optional: bool = False  # None accepted (``X | None``), filled by :func:`declarations`
    required: bool = False  # no default: the flag must be given, filled by :func:`declarations`

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")

    @property
    def flag(self) -> str:
        """The name errors use: the first long flag (``--batch-size``), or ``DATA``."""
        if self.positional:
            return str(self.metavar or self.flags[0].upper())
        return next((f for f in self.flags if f.startswith("--")), self.flags[0])


def setting(default: Any, *flags: str, help: str, group: str, **kw: Any) -> Any:
    """A dataclass field declared with its :class:`Setting` (lists get a default factory;
    :data:`REQUIRED`: no default)."""
    meta = {"moco": Setting(flags=flags, help=help, group=group, **kw)}
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def declarations(cls: type) -> dict[str, Setting]:
    """``{field name: Setting}`` of a dataclass declared with :func:`setting`, in field
    order, with ``kind``, ``optional`` and ``required`` read from each field (a TypeError names
    an unsupported annotation)."""
    out: dict[str, Setting] = {}
    for f in fields(cls):
        s = f.metadata.get("moco")
        if s is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        optional = annotation.endswith(OPTIONAL_SUFFIX)
        annotation = annotation.removesuffix(OPTIONAL_SUFFIX)
        if annotation not in KINDS:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported type {annotation}")
        if s.role not in ROLES:
            raise TypeError(f"{cls.__name__}.{f.name}: role must be one of {ROLES}")
        required = f.default is MISSING and f.default_factory is MISSING
        out[f.name] = replace(s, kind=KINDS[annotation], optional=optional, required=required)
    return out


def defaults(cls: type) -> dict[str, Any]:
    """``{field name: default value}`` of a declared dataclass (required fields left out)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


_DECLARED: dict[type, dict[str, Setting]] = {}


def checked_instance(cls: type, what: str, values: dict[str, Any]) -> Any:
    """``cls(**values)``, each value checked first as given to ``what`` (a library function:
    errors name its parameter); a name ``cls`` does not declare is a TypeError naming ``what``
    and the names it takes."""
    declared = declarations(cls)
    unknown = [k for k in values if k not in declared]
    if unknown:
        raise TypeError(f"{what}() got an unexpected keyword argument {unknown[0]!r} (it takes "
                        f"{', '.join(declared)})")
    source = from_parameters(what)
    return cls(**{k: coerce(k, declared[k], v, source) for k, v in values.items()})


def check_fields(obj: Any, source: Source) -> None:
    """Check (and normalise: ``"false"`` -> False) every declared field of ``obj`` in place."""
    cls = type(obj)
    if cls not in _DECLARED:
        _DECLARED[cls] = declarations(cls)
    for name, s in _DECLARED[cls].items():
        setattr(obj, name, coerce(name, s, getattr(obj, name), source))


# ----- sources ---------------------------------------------------------------------------------
def from_command_line(key: str) -> str:
    return "from the command line"


def from_yaml(path: str | Path) -> Source:
    return lambda key: f"key '{key}' in {path}"


def from_caller(what: str) -> Source:
    """Values given in Python, named by their flag in errors."""
    return lambda key: f"given to {what}"


@dataclass(frozen=True)
class ParameterSource:
    """Values given in Python to ``what`` (a function or a class): errors name the parameter
    (``k``), not the flag of the command that has one (``--k``)."""

    what: str
    names_parameters: bool = True

    def __call__(self, key: str) -> str:
        return f"given to {self.what}"


def from_parameters(what: str) -> Source:
    """The source of the arguments of a library call: errors name the parameter."""
    return ParameterSource(what)


def label(name: str, s: Setting, source: Source) -> str:
    """How an error calls setting ``name``: its parameter name for a value given in Python
    (:func:`from_parameters`), else its flag."""
    return name if getattr(source, "names_parameters", False) else s.flag


# ----- checking one value ----------------------------------------------------------------------
def show_value(value: Any) -> str:
    """A value as an error shows it: text as typed (quoted when empty or with spaces)."""
    plain = isinstance(value, str) and value.strip() == value and value and " " not in value
    text = value if plain else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def range_text(s: Setting) -> str:
    """``>= 1``, ``> 0``, ``in [0, 1)``, ``<= 1024`` or '' for no bound."""
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if s.min is not None and s.max is not None:
        return (f"in {'(' if s.min_open else '['}{num(s.min)}, {num(s.max)}"
                f"{')' if s.max_open else ']'}")
    if s.min is not None:
        return f"{'>' if s.min_open else '>='} {num(s.min)}"
    if s.max is not None:
        return f"{'<' if s.max_open else '<='} {num(s.max)}"
    return ""


def _in_range(s: Setting, x: float) -> bool:
    if s.min is not None and (x <= s.min if s.min_open else x < s.min):
        return False
    return not (s.max is not None and (x >= s.max if s.max_open else x > s.max))


def expectation(s: Setting) -> str:
    """What a value of ``s`` must be, as in 'expected --lr to be ...'."""
    rng = range_text(s)
    rng = f" {rng}" if rng else ""
    if s.choices is not None:
        return f"to be one of {', '.join(c or repr(c) for c in s.choices)}"
    return {
        "bool": "to be true or false",
        "bool_or_auto": "to be true, false or auto",
        "int": f"to be an integer{rng}",
        "float": f"to be a finite number{rng}",
        "str": "to be text",
        "int_list": f"to be a list of {s.length or ''} integers{rng}".replace("  ", " "),
        "float_list": f"to be a list of {s.length or ''} finite numbers{rng}".replace("  ", " "),
    }[s.kind]


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, numbers.Real):
            x = float(value)
        elif isinstance(value, str) and value.strip():
            x = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    return None


def coerce(name: str, s: Setting, value: Any, source: Source) -> Any:
    """``value`` as the declared type of setting ``name``, checked against its choices and
    range; else :class:`ConfigError` "expected --flag ..., got X (source)" (the parameter
    name instead of the flag for a :func:`from_parameters` source). None is accepted for an
    optional setting."""
    def fail(what: str | None = None) -> ConfigError:
        return ConfigError(f"expected {label(name, s, source)} {what or expectation(s)}, got "
                           f"{show_value(value)} ({source(name)})")

    if value is None and s.optional:
        return None
    kind = s.kind
    if kind in ("bool", "bool_or_auto"):
        if kind == "bool_or_auto" and isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        b = _bool(value)
        if b is None:
            raise fail()
        return b
    if kind == "str":
        if isinstance(value, os.PathLike):  # a pathlib.Path given for a path setting
            value = os.fspath(value)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and s.choices is None:
            value = str(value)
        if not isinstance(value, str):
            raise fail()
        if "\0" in value:
            raise fail("to be text without NUL characters")
        if s.choices is not None and value not in s.choices:
            raise fail()
        return value
    if kind in ("int", "float"):
        x = _int(value) if kind == "int" else _float(value)
        if x is None:
            raise fail()
        if not _in_range(s, x):
            raise fail(range_text(s))
        return x
    # lists
    if not isinstance(value, (list, tuple)):
        raise fail()
    items = [(_int(v) if kind == "int_list" else _float(v)) for v in value]
    if any(x is None for x in items) or (s.length is not None and len(items) != s.length):
        raise fail()
    if not all(_in_range(s, x) for x in items if x is not None):
        raise fail(f"to hold values {range_text(s)}")
    return items


# ----- YAML files ------------------------------------------------------------------------------
class NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (``*name``, ``<<: *name``): a few lines of anchors and
    aliases can expand into a structure of billions of items; and a key given twice (which
    of the two was meant cannot be told)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not accepted; write the values out",
                event.start_mark)
        return super().compose_node(parent, index)


def read_yaml_mapping(path: str | Path, what: str, error: type[MocoError] = ConfigError
                      ) -> dict[str, Any]:
    """A YAML file holding one mapping (empty file: {}), read safely: at most
    :data:`MAX_YAML_BYTES`, no aliases, no Python objects. ``what`` names the file in errors
    ("config file", "grid file")."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a folder, not a YAML file")
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if not p.is_file():
        raise error(f"{what} {p} is not a regular file (a device or a pipe?)")
    try:
        size = p.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error(f"{what} {p} is {size} bytes, more than a settings file can be "
                        f"({MAX_YAML_BYTES} bytes): is it the right file?")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not a UTF-8 text file") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        raw = yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise error(f"{what} {p} is not valid YAML: {msg}") from None
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply to be a settings file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{what} {p} must hold a mapping of settings (key: value lines), not a "
                    f"{type(raw).__name__}")
    return raw
