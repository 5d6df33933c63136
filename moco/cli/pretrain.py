"""``moco pretrain DATA``: MoCo v1/v2 pretraining with the original ``main_moco.py`` flags.

The flags are generated from :class:`moco.engine.config.MocoConfig`'s declaration: each field's
flags, help, default and choices. They keep their text as given (``argparse.SUPPRESS``), and
:func:`config_from_args` checks them with the same code as a YAML file's values.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from moco.core.errors import ConfigError
from moco.engine.config import DEFAULTS, GROUPS, PER_INVOCATION, SETTINGS, MocoConfig
from moco.engine.config_sources import build_config, check_settings, load_yaml
from moco.utils.paths import check_output
from moco.utils.settings import Setting, from_command_line

# Command-line switches that are not settings of the run.
_NOT_CONFIG = {"command", "run", "config_file", "no_progress"}


def default_text(name: str, s: Setting) -> str:
    """The default of setting ``name`` as the help shows it."""
    if s.default_text is not None:
        return s.default_text
    value = DEFAULTS[name]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "none"
    if value == "":
        return "none"
    return str(value)


def help_text(name: str, s: Setting) -> str:
    text = f"{s.help} (default: {default_text(name, s)})"
    return text.replace("%", "%%")


def add_setting_argument(group: Any, name: str, s: Setting) -> None:
    """One generated argument: the values stay text here and are checked by
    :func:`config_from_args` (so a flag, a YAML key and ``--set`` are checked alike)."""
    kw: dict[str, Any] = {"help": help_text(name, s)}
    if s.kind in ("bool", "bool_or_auto"):
        kw.update(nargs="?", const=True, metavar="true|false" + ("|auto" if s.kind ==
                                                                 "bool_or_auto" else ""))
    elif s.kind in ("int_list", "float_list"):
        kw["nargs"] = s.length or "*"
    if s.choices is not None:  # shown, and checked with the other values (config_from_args)
        kw["metavar"] = "{" + ",".join(c for c in s.choices if c) + "}"
    if s.metavar is not None and not s.positional:
        kw["metavar"] = s.metavar
    if s.positional:
        group.add_argument(name, nargs="?", metavar=s.metavar, help=kw["help"])
        return
    group.add_argument(*s.flags, dest=name, **kw)
    for flag, value, text in s.shortcuts:
        group.add_argument(flag, dest=name, action="store_const", const=value, help=text)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a ResNet with MoCo v1/v2 on a folder of images",
        description="Pretrain a ResNet with MoCo. Settings come from the defaults (main_moco.py's, "
        "MoCo v1), then --preset, then --config FILE.yaml, then the flags given here; every "
        "value is checked before anything is written.",
        argument_default=argparse.SUPPRESS,
    )
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    groups["recipe"].add_argument(
        "--config", dest="config_file", metavar="FILE.yaml",
        help="YAML file of settings (keys as the long flags), applied over the preset")
    for name, s in SETTINGS.items():
        add_setting_argument(p if s.positional else groups[s.group], name, s)
    groups["monitoring"].add_argument("--no-progress", action="store_true",
                                      help="no progress bar (there is none unless stderr is a "
                                      "terminal)")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> MocoConfig:
    """Defaults <- preset <- --config FILE <- flags; with --resume, the run folder's saved
    config.yaml comes first, so only the flags given change it."""
    raw = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    values = check_settings(raw, from_command_line, "on the command line")
    yaml_path = getattr(args, "config_file", None)
    if values.get("resume"):
        file_values = load_yaml(yaml_path) if yaml_path else {}
        saved = saved_run_settings(values, file_values)
        if saved:
            return build_config(overrides={**saved, **file_values, **values},
                                source=from_command_line)
    return build_config(yaml_path=yaml_path, overrides=values, source=from_command_line)


def saved_run_settings(flags: dict[str, Any], file_values: dict[str, Any]) -> dict[str, Any]:
    """The settings in ``config.yaml`` of the run being resumed ({} if there is none or it is
    not valid YAML, e.g. written by an older version cut short by a kill). A value of the wrong
    type or out of range is an error naming the key and the file. The run folder: --output,
    else the config file's, else the folder of the --resume checkpoint, else the default."""
    resume = str(flags.get("resume", ""))
    output = flags.get("output") or file_values.get("output")
    if not output:
        output = str(Path(resume).parent) if resume != "auto" else DEFAULTS["output"]
    path = Path(output) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        saved = load_yaml(path)
    except ConfigError as e:
        if "not valid YAML" not in str(e) and "must hold a mapping" not in str(e):
            raise ConfigError(f"{e}; this is the saved configuration of the run being resumed: "
                              "fix that value (or give it as a flag)") from None
        print(f"warning: ignoring {path}: {e}", file=sys.stderr)
        return {}
    return {k: v for k, v in saved.items() if k not in PER_INVOCATION}


def run(args: argparse.Namespace) -> int:
    from moco.engine.loop import pretrain

    cfg = config_from_args(args)
    config_file = getattr(args, "config_file", None)
    if config_file and not cfg.resume:  # the run rewrites its config.yaml
        check_output(Path(cfg.output) / "config.yaml", "--output",
                     files={"the --config file": config_file})
    progress = not getattr(args, "no_progress", False) and sys.stderr.isatty()
    result = pretrain(cfg, log=print, progress=progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    last = result.history[-1] if result.history else {}
    print(f"checkpoint: {result.checkpoint}")
    if result.stopped_early:
        return 0
    if last:
        print(f"final: loss {last['loss']:.4f}, pretext acc@1 {last['acc1']:.1f}%"
              + (f", kNN top-1 {last['knn_top1']:.2f}%" if last.get("knn_top1") is not None else ""))
    return 0
