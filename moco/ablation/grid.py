"""Ablation grid files (the comparisons of MoCo v1 §4.1 / App. A.9 and MoCo v2 Tables 1-3;
MoCo v1 §3.3): the runs of a grid, their settings and the state of their folders.

A grid is a YAML file::

    name: momentum                       # optional; default: the file's stem
    title: Key-encoder momentum m        # optional, heads results.md
    expect: |                            # optional: what the papers say it must show
      m = 0 fails (loss oscillates) ...
    budget: about 40 min on 2 CPU cores  # optional, copied into results.md
    output: runs/ablations/momentum      # optional; --output overrides
    base:                                # any pretrain settings (keys as the long flags)
      preset: cifar10                    # optional preset, applied first
      config: ../demo.yaml               # optional pretrain YAML, relative to this file
      data: ../shared/data/cifar10
      epochs: 20
      train_subset: 5000
    grid:                                # every combination of these values ...
      moco_m: [0.0, 0.9, 0.99, 0.999]
    runs:                                # ... and/or explicit runs (name + settings)
      - {name: v1, mlp: false}
    sweep: [moco_m]                      # optional: x axis of sweep.png (default: grid keys)
    cost:                                # optional: peak memory and time per step
      mechanisms: [moco, end-to-end, memory-bank]
      batch_sizes: [32, 64, 128]
      steps: 3

Each run trains with :func:`moco.engine.loop.pretrain` in ``OUTPUT/<run name>/``. The grid is
resumable run by run: a finished run is skipped, an interrupted one is continued with
``resume=auto``, a run that diverged is recorded as failed (and skipped on re-runs unless
asked). Then ``OUTPUT`` gets ``results.md`` and ``results.json`` (table), ``knn.png``,
``pretext.png``, ``loss.png``, ``step_loss.png``, ``sweep.png`` and, with ``cost:``,
``cost.json`` and ``cost.png``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moco.core.errors import AblationError, ConfigError
from moco.engine.config import RUNTIME_SETTINGS, SETTINGS, MocoConfig
from moco.engine.config_sources import build_config, setting_key
from moco.utils.runlog import read_metrics
from moco.utils.settings import coerce, read_yaml_mapping, show_value

#: Settings a re-run may change without invalidating a finished run (declared in MocoConfig).
IGNORED_WHEN_COMPARING = RUNTIME_SETTINGS
FAILED_MARKER = "FAILED.txt"
MAX_RUNS = 10_000
RUNNER_KEYS = frozenset({"output", "resume"})




@dataclass
class RunSpec:
    """One run of a grid: its folder name, the settings it overrides over the base, and
    where the grid file declares it (``grid``: a combination of ``grid:``, ``runs[i]``)."""

    name: str
    settings: dict[str, Any]
    origin: str = ""


@dataclass
class CostSpec:
    """Peak memory and time per step at several batch sizes (the MoCo v2 Table 3 analogue)."""

    mechanisms: list[str] = field(default_factory=lambda: ["moco", "end-to-end", "memory-bank"])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    steps: int = 3
    warmup: int = 1
    isolate: bool = True
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class AblationSpec:
    """A parsed grid file."""

    name: str
    base: dict[str, Any]
    runs: list[RunSpec]
    sweep: list[str]
    title: str = ""
    expect: str = ""
    budget: str = ""
    output: str = ""
    preset: str = ""
    config_path: Path | None = None
    cost: CostSpec | None = None
    source: Path | None = None


def _norm_keys(d: dict[str, Any], where: str, source: Path | str | None = None,
               *, lists: bool = False) -> dict[str, Any]:
    """Settings of a grid section keyed by field name, each value checked by MocoConfig's
    declaration (with ``lists``: each value of a ``grid:`` list). Errors name the key and
    where it is (``source``: the grid file, or ``--set``)."""
    if not isinstance(d, dict):
        raise AblationError(f"{where} must map setting names to values, got {type(d).__name__}")
    out: dict[str, Any] = {}
    src = f" of {source}" if isinstance(source, Path) else ""
    for key, value in d.items():
        if str(key).replace("-", "_") == "config":
            out["config"] = value
            continue
        try:
            name = setting_key(key, f"in {where}{src}")
        except ConfigError as e:
            raise AblationError(str(e)) from None
        if name in RUNNER_KEYS:
            raise AblationError(f"{where}{src}: {name} is set by the runner (use the grid's "
                                "'output:' or --output for the folder); remove it")
        def said(_k: str, key: Any = key, value: Any = value) -> str:
            if source == "--set":
                return f"--set {key}={show_value(value)}"
            return f"key '{key}' in {where}{src}"
        if lists and (not isinstance(value, list) or not value):
            raise AblationError(f"{where}{src}: {key} needs a non-empty list of values, "
                                f"got {value!r}")
        try:
            out[name] = ([coerce(name, SETTINGS[name], v, said) for v in value] if lists
                         else coerce(name, SETTINGS[name], value, said))
        except ConfigError as e:
            raise AblationError(str(e)) from None
    return out


def check_set_values(values: dict[str, Any]) -> dict[str, Any]:
    """``moco ablate --set KEY=VALUE`` values, each checked by MocoConfig's declaration."""
    return _norm_keys(values, "--set", "--set")


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "-".join(fmt_value(x) for x in v)
    return str(v)


def run_name(settings: dict[str, Any]) -> str:
    """Folder name of a grid point: ``moco_t=0.07_mlp=true``."""
    return "_".join(f"{k}={fmt_value(v)}" for k, v in settings.items()) or "base"


TOP_LEVEL_KEYS = frozenset({"name", "title", "expect", "budget", "output", "base", "grid", "runs",
                            "sweep", "cost"})


def parse_spec(raw: dict[str, Any], name: str = "ablation", source: Path | None = None) -> AblationSpec:
    """Validate a grid mapping (as loaded from YAML) into an :class:`AblationSpec`."""
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise AblationError(f"unknown top-level key(s) {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}")
    base, preset, config_path = _base_settings(raw.get("base") or {}, source)
    grid = _grid_values(raw.get("grid") or {}, source)
    runs = _grid_runs(grid, source) + _explicit_runs(raw.get("runs") or [], source)
    _check_run_names(runs)
    sweep = [str(s).replace("-", "_") for s in (raw.get("sweep") or list(grid))]
    return AblationSpec(
        name=str(raw.get("name") or name), base=base, runs=runs, sweep=sweep,
        title=str(raw.get("title") or ""), expect=str(raw.get("expect") or "").strip(),
        budget=str(raw.get("budget") or "").strip(), output=str(raw.get("output") or ""),
        preset=preset, config_path=config_path, cost=_cost_spec(raw.get("cost"), source),
        source=source)


def _base_settings(raw: Any, source: Path | None) -> tuple[dict[str, Any], str, Path | None]:
    """The ``base:`` settings, its ``preset`` and its pretrain ``config`` file (relative to the
    grid file)."""
    base = _norm_keys(raw, "base", source)
    config_path = None
    if "config" in base:
        config_path = Path(str(base.pop("config")))
        if not config_path.is_absolute() and source is not None:
            config_path = source.parent / config_path
    preset = str(base.pop("preset", "") or "")
    return base, preset, config_path


def _grid_values(raw: Any, source: Path | None) -> dict[str, list[Any]]:
    """The ``grid:`` section: each setting's list of values, checked."""
    if not isinstance(raw, dict):
        raise AblationError("'grid' must map setting names to lists of values")
    grid = _norm_keys(raw, "grid", source, lists=True)
    grid.pop("config", None)
    return grid


def _grid_runs(grid: dict[str, list[Any]], source: Path | None) -> list[RunSpec]:
    """One run per combination of the grid's values, named by its settings."""
    if not grid:
        return []
    total = 1
    for v in grid.values():
        total *= len(v)
    if total > MAX_RUNS:
        raise AblationError(f"the grid of {source or 'the file'} has {total} combinations, "
                            f"more than {MAX_RUNS}: split it into smaller grids")
    runs = []
    for combo in itertools.product(*grid.values()):
        settings = dict(zip(grid, combo, strict=True))
        runs.append(RunSpec(run_name(settings), settings, "grid"))
    return runs


def _explicit_runs(raw: Any, source: Path | None) -> list[RunSpec]:
    """The ``runs:`` section: named runs with their settings (unnamed: named by them)."""
    runs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise AblationError(f"runs[{i}] must be a mapping with 'name' and settings")
        item = dict(item)
        rname = str(item.pop("name", "") or "")
        settings = _norm_keys(item, f"runs[{i}]", source)
        runs.append(RunSpec(rname or run_name(settings), settings, f"runs[{i}]"))
    return runs


def _check_run_names(runs: list[RunSpec]) -> None:
    """At least one run; names unique and usable as folder names."""
    if not runs:
        raise AblationError("the grid has no runs: give 'grid:' and/or 'runs:'")
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AblationError(f"run names must be unique; repeated: {dup}")
    for r in runs:
        if "/" in r.name or r.name in (".", ".."):
            raise AblationError(f"run name {r.name!r} cannot be a folder name")


COST_KEYS = ("mechanisms", "batch_sizes", "steps", "warmup", "isolate", "settings")


def _cost_spec(raw: Any, source: Path | None) -> CostSpec | None:
    """The optional ``cost:`` section, each value checked (the mechanisms and batch sizes by
    MocoConfig's declarations)."""
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise AblationError(f"cost must map {', '.join(COST_KEYS)} to values, got "
                            f"{type(raw).__name__}")
    unknown = sorted(set(raw) - set(COST_KEYS))
    if unknown:
        raise AblationError(f"cost: unknown key(s) {unknown}; allowed keys: {', '.join(COST_KEYS)}")
    src = f" of {source}" if source is not None else ""
    cost = CostSpec(settings=_norm_keys(raw.get("settings") or {}, "cost.settings", source))
    for key, name in (("mechanisms", "mechanism"), ("batch_sizes", "batch_size")):
        if key not in raw:
            continue
        values = raw[key]
        if not isinstance(values, list) or not values:
            raise AblationError(f"cost.{key}{src}: expected a non-empty list, got {values!r}")
        def said(_name: str, key: str = key) -> str:
            return f"cost.{key}{src}"

        try:
            setattr(cost, key, [coerce(name, SETTINGS[name], v, said) for v in values])
        except ConfigError as e:
            raise AblationError(str(e)) from None
    for key, low in (("steps", 1), ("warmup", 0)):
        value = raw.get(key, getattr(cost, key))
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise AblationError(f"cost.{key}{src}: expected an integer >= {low}, got "
                                f"{show_value(value)}")
        setattr(cost, key, value)
    cost.isolate = raw.get("isolate", cost.isolate)
    if not isinstance(cost.isolate, bool):
        raise AblationError(f"cost.isolate{src}: expected true or false, got "
                            f"{show_value(cost.isolate)}")
    return cost


def load_spec(path: str | Path) -> AblationSpec:
    """Read a grid YAML file (see the module docstring)."""
    p = Path(path)
    raw = read_yaml_mapping(p, "grid file", AblationError)
    return parse_spec(raw, name=p.stem, source=p)


def run_config(spec: AblationSpec, run: RunSpec, run_dir: Path,
               overrides: dict[str, Any] | None = None, resume: str = "") -> MocoConfig:
    """The run's :class:`MocoConfig`: defaults <- preset <- base config file <- base <- the
    run's settings <- ``overrides`` (command-line ``--set``), in ``run_dir``."""
    values = {**spec.base, **run.settings, **(overrides or {}),
              "output": str(run_dir), "resume": resume}
    if spec.preset and "preset" not in values:
        values["preset"] = spec.preset
    if spec.config_path is not None and not spec.config_path.is_file():
        raise AblationError(f"base config {spec.config_path} does not exist")
    return build_config(yaml_path=spec.config_path, overrides=values)



def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*.pth.tar"))


def run_status(run_dir: Path, epochs: int) -> str:
    """``done`` (all epochs in metrics.jsonl and a checkpoint), ``failed`` (diverged earlier),
    ``partial`` (a started run to resume) or ``new``."""
    if (run_dir / FAILED_MARKER).is_file():
        return "failed"
    history = read_metrics(run_dir / "metrics.jsonl")
    if history and int(history[-1]["epoch"]) >= epochs and _checkpoints(run_dir):
        return "done"
    if any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl")) or _checkpoints(run_dir):
        return "partial"
    return "new"


def settings_mismatch(run_dir: Path, cfg: MocoConfig) -> list[str]:
    """Settings in ``run_dir/config.yaml`` that differ from ``cfg`` (ignoring those in
    :data:`IGNORED_WHEN_COMPARING`): ``['moco_m: 0.9 -> 0.99', ...]``."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = read_yaml_mapping(path, "config file")
    except ConfigError:
        return ["config.yaml: unreadable"]
    now = cfg.to_dict()
    diffs = []
    for k, v in now.items():
        if k in IGNORED_WHEN_COMPARING or k not in saved:
            continue
        old = saved[k]
        if isinstance(v, tuple):
            v = list(v)
        if old != v:
            diffs.append(f"{k}: {old!r} -> {v!r}")
    return diffs


def default_output(spec: AblationSpec) -> Path:
    return Path(spec.output) if spec.output else Path("runs/ablations") / spec.name
