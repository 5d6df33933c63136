"""Grid files of ``moco ablate``: runs from a grid and explicit runs, precedence of the
settings, and bad files that say what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moco.ablation.grid import AblationError, load_spec, parse_spec, run_config

ROOT = Path(__file__).resolve().parents[2]


def test_parse_grid_product_runs_and_sweep() -> None:
    spec = parse_spec({
        "base": {"preset": "cifar10", "epochs": 3, "train-subset": 100},
        "grid": {"moco_t": [0.07, 0.2], "mlp": [False, True]},
        "runs": [{"name": "extra", "moco-k": 256}],
    }, name="t")
    assert [r.name for r in spec.runs] == ["moco_t=0.07_mlp=false", "moco_t=0.07_mlp=true",
                                           "moco_t=0.2_mlp=false", "moco_t=0.2_mlp=true", "extra"]
    assert spec.runs[-1].settings == {"moco_k": 256}
    assert spec.sweep == ["moco_t", "mlp"] and spec.preset == "cifar10"
    cfg = run_config(spec, spec.runs[1], Path("/tmp/x/r"), {"epochs": 1})
    # preset <- base <- run <- overrides; the runner sets the folder.
    assert (cfg.arch, cfg.moco_t, cfg.mlp, cfg.train_subset, cfg.epochs) == ("resnet18", 0.07, True, 100, 1)
    assert cfg.output == "/tmp/x/r" and cfg.resume == ""


@pytest.mark.parametrize("raw, match", [
    ({"base": {}, "grid": {}}, "no runs"),
    ({"grid": {"moco_mm": [1]}}, "unknown setting"),
    ({"base": {"output": "x"}, "grid": {"moco_m": [0.9]}}, "set by the runner"),
    ({"grid": {"moco_m": 0.9}}, "non-empty list"),
    ({"runs": [{"name": "a"}, {"name": "a", "mlp": True}]}, "unique"),
    ({"runs": [{"name": "a"}], "colour": 1}, "top-level"),
    ({"runs": [{"name": "a"}], "cost": {"batch": [1]}}, "cost"),
])
def test_bad_grid_files_say_what_is_wrong(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(AblationError, match=match):
        parse_spec(raw)


def test_ready_made_grids_parse_and_validate() -> None:
    files = sorted((ROOT / "configs/ablations").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        spec = load_spec(f)
        assert spec.expect and spec.budget, f"{f.name}: say what it must show and how long it takes"
        for r in spec.runs:
            run_config(spec, r, Path("/tmp/unused") / r.name).validate()

