"""``moco pretrain DATA``: MoCo v1/v2/v3 pretraining with the original ``main_moco.py`` flags.

The flags are generated (:mod:`moco.cli.declared`) from :class:`moco.engine.config.MocoConfig`'s
declaration and :class:`PretrainFlags`: each field's flags, help, default and choices. They keep
their text as given (``argparse.SUPPRESS``), and :func:`config_from_args` checks them with the
same code as a YAML file's values.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moco.cli.declared import (
    Progress,
    add_declared,
    given_values,
    split_values,
)
from moco.core.errors import ConfigError
from moco.engine.config import DEFAULTS, GROUPS, PER_INVOCATION, MocoConfig
from moco.engine.config_sources import build_config, load_yaml
from moco.utils.paths import check_output
from moco.utils.settings import from_command_line, setting


@dataclass
class PretrainFlags:
    """The flags of one ``moco pretrain`` invocation that are not settings of the run."""

    config_file: str = setting(
        "", "--config", group="recipe", metavar="FILE.yaml", role="runtime",
        help="YAML file of settings (keys as the long flags), applied over the preset")
    print_config: bool = setting(
        False, "--print-config", group="recipe", role="runtime",
        help="print the resolved settings as YAML (the run's config.yaml) and exit, without "
        "training or writing anything")


#: The declaration of every flag of ``moco pretrain``.
DECLARED = (MocoConfig, PretrainFlags, Progress)


def add_parser(sub: Any) -> None:
    from moco.cli import COMMANDS

    p = sub.add_parser(
        "pretrain", help=COMMANDS["pretrain"],
        description="Pretrain a ResNet with MoCo. Settings come from the defaults (main_moco.py's, "
        "MoCo v1), then --preset, then --config FILE.yaml, then the flags given here; every "
        "value is checked before anything is written.",
    )
    add_declared(p, DECLARED, groups=GROUPS)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> MocoConfig:
    """Defaults <- preset <- --config FILE <- flags; with --resume, the run folder's saved
    config.yaml comes first, so only the flags given change it."""
    values, flags = split_values(given_values(args, DECLARED), MocoConfig)
    yaml_path = flags.get("config_file") or None
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
    cfg = config_from_args(args)
    flags = split_values(given_values(args, DECLARED), MocoConfig)[1]
    if flags.get("print_config"):
        cfg.validate()
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from moco.engine.loop import pretrain

    config_file = flags.get("config_file")
    if config_file and not cfg.resume:  # the run rewrites its config.yaml
        check_output(Path(cfg.output) / "config.yaml", "--output",
                     files={"the --config file": config_file})
    progress = not flags.get("no_progress", False) and sys.stderr.isatty()
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
