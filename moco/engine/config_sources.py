"""A :class:`~moco.engine.config.MocoConfig` from its sources: the defaults, a preset, a YAML
file and the command line (or the caller's values), each over the one before, every value
checked by its declaration; and the run folder's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from moco.core.errors import ConfigError
from moco.engine.config import SETTINGS, MocoConfig, preset_values
from moco.utils.atomic import atomic_write_text
from moco.utils.settings import (
    Source,
    coerce,
    from_caller,
    from_yaml,
    read_yaml_mapping,
)

#: YAML / --set key spellings: field names, and every long flag without its dashes.
KEY_NAMES: dict[str, str] = {
    **{f.lstrip("-").replace("-", "_"): k for k, s in SETTINGS.items() for f in s.flags
       if f.startswith("--")},
    **{k: k for k in SETTINGS},
}


def setting_key(key: Any, where: str) -> str:
    """The field a YAML / ``--set`` key names (``moco-k``, ``moco_k``, ``learning_rate`` all
    accepted), else :class:`ConfigError` with the closest known names."""
    text = str(key).strip().replace("-", "_")
    if text in KEY_NAMES:
        return KEY_NAMES[text]
    close = difflib.get_close_matches(text, list(KEY_NAMES), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(f"unknown setting {str(key)!r} {where}{hint}; the keys are the long "
                      "pretrain flags without the dashes (moco_k or moco-k, batch_size, ...)")


def check_settings(values: dict[str, Any], source: Source, where: str) -> dict[str, Any]:
    """``values`` keyed by field name, each checked by its declaration; an unknown key or a
    bad value is a :class:`ConfigError` naming it and ``source``/``where``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = setting_key(key, where)

        def said(_name: str, key: Any = key) -> str:
            return source(str(key))

        out[name] = coerce(name, SETTINGS[name], value, said)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (dashes or underscores both accepted), each value
    checked by its declaration (errors name the key and the file)."""
    p = Path(path)
    raw = read_yaml_mapping(p, "config file")
    return check_settings(raw, from_yaml(p), f"in config file {p}")


def build_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    source: Source | None = None,
) -> MocoConfig:
    """Defaults <- preset <- YAML file <- overrides (flags). A YAML file may name a preset,
    and the overrides too (the last one wins); :class:`MocoConfig` applies it under the
    values. ``source`` names where the overrides came from in errors (default: the caller)."""
    file_values = load_yaml(yaml_path) if yaml_path else {}
    overrides = check_settings(dict(overrides or {}), source or from_caller("build_config"),
                               "in the overrides")
    preset = overrides.get("preset") or preset or file_values.get("preset") or ""
    if preset:
        preset_values(preset)  # an unknown name is refused as --preset
    cfg = MocoConfig(**{**file_values, **overrides, "preset": preset})
    if not cfg.data:
        cfg.data = default_data_dir()
    return cfg


def default_data_dir() -> str:
    """The data folder when none is given: ``$MOCO_DATA``, else empty (a run then asks for
    DATA)."""
    return os.environ.get("MOCO_DATA", "")


def save_yaml(cfg: MocoConfig, path: str | Path) -> None:
    """``cfg`` as YAML at ``path`` (the run folder's ``config.yaml``), written atomically."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_folder_config(cfg: MocoConfig) -> MocoConfig:
    """``cfg`` as the run folder's ``config.yaml`` keeps it: the paths (``data``, ``output``,
    ``cache_dir``) absolute, so that ``--resume auto`` from another working directory (a
    requeued job) finds them, and ``overwrite`` off (the file, reused as ``--config``, must
    not replace another run)."""
    def absolute(p: str) -> str:
        return os.path.abspath(os.path.expanduser(p)) if p else p

    return dataclasses.replace(cfg, data=absolute(cfg.data), output=absolute(cfg.output),
                               cache_dir=absolute(cfg.cache_dir), overwrite=False)
