"""scripts/demo.py (`make demo`): the CPU demo on tiny data, its verdict, the GPU recipe's dry
run on the CPU and (tier ``cuda``) the GPU path itself."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from helpers import make_image_folder
from PIL import Image

from moco.engine.config_sources import build_config
from moco.engine.run_state import PretrainResult
from moco.eval.authors_log import AUTHORS_CIFAR10_KNN, AUTHORS_PAIRS_PER_EPOCH
from moco.eval.knn import knn_evaluate
from moco.eval.neighbours import grid_pixels
from moco.utils.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moco_demo_script", ROOT / "scripts/demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo = _load_demo()

# The CPU recipe at tiny sizes (2 classes x 32 images per split).
TINY = ["--set", "batch_size=8", "--set", "moco_k=32", "--set", "bn_splits=2", "--set", "epochs=2",
        "--set", "train_subset=0", "--set", "workers=0", "--set", "knn_k=5",
        "--set", "precision=fp32", "--no-progress"]


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = demo.main(argv)
    return rc, out.getvalue()


def _table(text: str) -> list[list[str]]:
    """The epoch table's rows, split into cells (first cell: the epoch)."""
    rows = []
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit() and len(cells) >= 4:
            rows.append(cells)
    return rows


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", classes=2, per_class=32)


def test_cpu_demo_tiny(data: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    rc, text = _run(["--data", str(data), "--output", str(out_dir), "--device", "cpu", *TINY])
    assert rc == 0, text
    flat = " ".join(text.split())
    # The title names the mechanism when it is not MoCo's (the CPU recipe's is end-to-end).
    assert ("the authors' CIFAR-10 recipe with MoCo v1's end-to-end mechanism (not the momentum "
            "encoder + queue), scaled to a few CPU minutes") in flat
    # What changed from the authors' recipe is named, from the settings themselves.
    assert "batch 8 (authors: 512)" in flat and "K 32 (authors: 4096)" in flat
    assert "lr 0.06 kept at batch 8" in flat and "linear scaling rule" not in flat
    rows = _table(text)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    # 64 images, batch 8: 8 steps of 8 pairs per epoch.
    assert [r[1] for r in rows] == ["0", "64", "128"]
    metrics = read_metrics(out_dir / "metrics.jsonl")
    assert [f"{m['loss']:.3f}" for m in metrics] == [rows[1][3], rows[2][3]]
    # The run's health signals: effective rank and std x sqrt(d), none before training.
    assert [r[4] for r in rows] == ["-", *(f"{m['health_rank']:.1f}" for m in metrics)]
    assert [r[5] for r in rows] == ["-", *(f"{m['health_std_ratio']:.2f}" for m in metrics)]
    assert "rank, std: health of the embeddings" in text
    # The online probe saw the monitor's queries every epoch.
    assert all(m["probe_top1"] is not None for m in metrics)
    # Full protocol before and after training; the library's own figures.
    untrained = float(rows[0][7])
    final = float(rows[2][7])
    assert rows[0][8] == "untrained" and untrained == pytest.approx(metrics[0]["knn_random_init"], abs=0.005)
    assert final == pytest.approx(metrics[-1]["knn_top1"], abs=0.005)
    assert metrics[0]["knn_top1"] is None  # epoch 1 is not the last: monitor only
    # The monitor is the same kNN on subsets; here the subsets hold every image, so it must
    # agree with the full protocol where both ran.
    assert float(rows[0][6]) == pytest.approx(untrained, abs=0.005)
    assert float(rows[2][6]) == pytest.approx(final, abs=0.005)
    # The final figure is the one `moco knn` computes from the checkpoint.
    ckpt = sorted(out_dir.glob("checkpoint_*.pth.tar"))[-1]
    ref = knn_evaluate(data, ckpt, k=5, t=0.1, features="backbone", device="cpu", workers=0,
                       progress=False)
    assert final == pytest.approx(ref.top1, abs=0.005)
    # The verdict follows the numbers.
    verdict = next(line for line in text.splitlines() if "VERDICT" in line)
    assert f"{final:.2f}%" in verdict and f"{untrained:.2f}%" in verdict
    assert ("PASSED" in verdict) == (final - untrained >= 5.0)
    assert (out_dir / "demo.png").read_bytes()[:8] == PNG
    assert (out_dir / "plot.png").read_bytes()[:8] == PNG
    # The neighbour grids of the untrained and the trained network, named in the report:
    # 8 test images (4 of each class) and their 8 nearest of the 64 training images.
    before, after = out_dir / "neighbours-before.png", out_dir / "neighbours-after.png"
    assert f"neighbours: {before} (untrained) and {after.name} (trained)" in flat
    assert "of 64 training images" in flat and "neighbours of the query's class:" in flat
    size = grid_pixels(8, 1 + 8, title=True)
    for grid in (before, after):
        with Image.open(grid) as im:
            assert (im.height, im.width) == size


def test_the_grids_before_and_after_show_the_same_queries(data: Path, tmp_path: Path) -> None:
    cfg = build_config(yaml_path=ROOT / "configs/demo.yaml", overrides={
        "data": str(data), "output": str(tmp_path / "run"), "device": "cpu", "batch_size": 8,
        "moco_k": 32, "bn_splits": 2, "epochs": 1, "train_subset": 0, "workers": 0,
        "knn_k": 5, "health": False, "probe": "off"})
    run = demo.run_demo(cfg, gpu=False, progress=False)
    before, after = run.grids["before"], run.grids["after"]
    assert before.queries == after.queries and len(before.queries) == 8
    assert before.bank == after.bank == 64
    assert before.path.name == "neighbours-before.png" and after.path.is_file()
    assert "rank, std" not in "\n".join(demo.report(run, gpu=False, dry_run=False))


def test_the_demo_runs_the_mocov3_recipe(data: Path, tmp_path: Path) -> None:
    """``--recipe mocov3`` (the pilot of docs/demo.md) runs MoCo v3 through the same demo (no
    ``encoder_q``: the features and grids come from the method's evaluation encoder)."""
    out_dir = tmp_path / "v3"
    rc, text = _run(["--data", str(data), "--output", str(out_dir), "--device", "cpu",
                     "--recipe", "mocov3", *TINY, "--set", "mlp_dim=64", "--set", "moco_dim=32",
                     "--set", "epochs=1"])
    assert rc == 0, text
    flat = " ".join(text.split())
    assert "recipe with MoCo v3 (momentum encoder, no queue)" in flat
    assert "MLP projector + predictor (hidden 64, out 32)" in flat and "linear head" not in flat
    assert "mechanism mocov3 (authors: moco)" in flat and "optimizer lars (authors: sgd)" in flat
    assert "VERDICT" in flat
    assert (out_dir / "neighbours-after.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(("final", "untrained", "passed"), [
    (40.0, 37.0, False),   # above the untrained network, but by less than 5 points
    (31.9, 36.97, False),  # below it (the old demo)
    (41.96, 36.97, False),
    (41.97, 36.97, True),  # exactly +5
    (44.2, 36.97, True),
])
def test_verdict_cpu(final: float, untrained: float, passed: bool) -> None:
    v = demo.verdict_cpu(final, untrained)
    assert ("PASSED" in v) == passed and ("NOT passed" in v) == (not passed)
    assert f"{final - untrained:+.2f} points" in v


def test_verdict_cpu_without_knn() -> None:
    assert "NOT passed" in demo.verdict_cpu(None, 36.97)


def _stub_run(cfg_overrides: dict[str, Any], knn: list[float | None], monitor: dict[int, float],
              full: dict[int, float], tmp_path: Path, stopped: bool = False) -> Any:
    cfg = build_config(yaml_path=ROOT / "configs/demo.yaml", overrides=cfg_overrides)
    steps = 100
    hist = [{"epoch": e + 1, "step": steps * (e + 1), "loss": 7.0 - 0.1 * e, "acc1": 5.0,
             "lr": 0.06, "knn_top1": k, "images_per_s": 500.0, "seconds": 30.0}
            for e, k in enumerate(knn)]
    result = PretrainResult(tmp_path, tmp_path / "checkpoint_0001.pth.tar", hist, full.get(0), stopped)
    return demo.DemoRun(cfg, result, monitor, full, 280.0, 40.0, "bf16")


def test_report_says_not_passed_below_the_goal(tmp_path: Path) -> None:
    """A stubbed result 4 points above the untrained network: the demo says NOT passed."""
    run = _stub_run({"epochs": 2}, [None, 40.97], {0: 30.0, 1: 31.0, 2: 33.0}, {0: 36.97, 2: 40.97},
                    tmp_path)
    text = "\n".join(demo.report(run, gpu=False, dry_run=False))
    assert "NOT passed" in text and "+4.00 points" in text
    rows = _table(text)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    pairs = [0, 100 * run.cfg.batch_size, 200 * run.cfg.batch_size]
    assert [r[1] for r in rows] == [f"{p:,}" for p in pairs]
    assert "bf16 autocast (authors: fp32)" in " ".join(text.split())
    demo.plot(run, tmp_path / "demo.png", gpu=False)
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG


def test_gpu_report_against_the_authors_log(tmp_path: Path) -> None:
    """Per epoch, the authors' kNN at the same pairs seen (97 steps of 512 per epoch)."""
    cfg = build_config(yaml_path=ROOT / "configs/demo-gpu.yaml")
    assert cfg.batch_size == 512 and cfg.cifar_stem and cfg.moco_k == 4096 and cfg.moco_t == 0.1
    hist = [{"epoch": e, "step": 97 * e, "loss": 7.0, "acc1": 5.0, "lr": 0.06,
             "knn_top1": k, "images_per_s": 9000.0, "seconds": 6.0}
            for e, k in ((1, 32.5), (2, 33.0), (3, 30.0))]
    full = {0: 30.1, 1: 32.5, 2: 33.0, 3: 30.0}
    run = demo.DemoRun(cfg, PretrainResult(tmp_path, tmp_path / "c.pth.tar", hist, 30.1, True),
                       {}, full, 60.0, 10.0, "bf16")
    assert run.pairs(3) == 3 * AUTHORS_PAIRS_PER_EPOCH
    text = "\n".join(demo.report(run, gpu=True, dry_run=False))
    rows = _table(text)
    assert [r[-1] for r in rows] == ["-", *(f"{a:.2f}" for a in AUTHORS_CIFAR10_KNN[:3])]
    verdict = next(line for line in text.splitlines() if "VERDICT" in line)
    assert f"{AUTHORS_CIFAR10_KNN[2]:.2f}%" in verdict and "BELOW the authors' log by 4.71" in verdict
    assert "tracks the authors' log" in demo.verdict_gpu(3, 3 * AUTHORS_PAIRS_PER_EPOCH, 35.0, 30.1)
    assert "stopped after epoch 3 of 200" in text
    demo.plot(run, tmp_path / "demo.png", gpu=True)
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG


def test_gpu_recipe_dry_run_on_cpu(data: Path, tmp_path: Path) -> None:
    """The GPU path (the authors' recipe, full kNN every epoch, the authors' column) runs on
    the CPU with tiny sizes and says it is a dry run."""
    out_dir = tmp_path / "dry"
    rc, text = _run(["--gpu-recipe-dry-run", "--data", str(data), "--output", str(out_dir),
                     "--no-progress"])
    assert rc == 0, text
    assert "DRY RUN" in text and "NOT a result" in text
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    # The authors' recipe, only the sizes made tiny.
    assert saved["preset"] == "cifar10" and saved["cifar_stem"] is True
    assert (saved["moco_t"], saved["moco_m"], saved["lr"], saved["epochs"]) == (0.1, 0.99, 0.06, 200)
    assert saved["cos"] is True and saved["knn_features"] == "head"
    assert (saved["batch_size"], saved["moco_k"], saved["device"]) == (16, 64, "cpu")
    rows = _table(text)
    assert [r[0] for r in rows] == ["0", "1", "2"]  # stopped after 2 of the 200 epochs
    assert all(len(r) >= 5 for r in rows[1:])  # a kNN figure after every epoch
    assert [r[-1] for r in rows] == ["-", "-", "-"]  # 64 pairs: before the authors' first epoch
    assert "stopped after epoch 2 of 200" in text and "no comparison" in text
    assert (out_dir / "demo.png").read_bytes()[:8] == PNG


def test_bad_set_value_is_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = demo.main(["--data", str(data), "--output", str(tmp_path / "r"), "--device", "cpu",
                    "--set", "moco_kk=3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("demo: ") and "moco_kk" in err and len(err.strip().splitlines()) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_demo_on_cuda(data: Path, tmp_path: Path) -> None:
    """The GPU path on a real GPU at tiny sizes: CUDA, autocast, kNN each epoch."""
    out_dir = tmp_path / "gpu"
    rc, text = _run(["--data", str(data), "--output", str(out_dir), "--no-progress",
                     "--set", "train_subset=64", "--set", "batch_size=16", "--set", "moco_k=64",
                     "--set", "stop_after_epochs=2", "--set", "workers=0"])
    assert rc == 0, text
    assert "the authors' CIFAR-10 recipe, 2 of its 200 epochs" in text and "DRY RUN" not in text
    metrics = read_metrics(out_dir / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["knn_top1"] is not None for m in metrics)
    assert "device cuda" in text  # the run's own description of itself
    assert re.search(r"(bf16|float16) autocast \(authors: fp32\)", " ".join(text.split()))


def test_cpu_demo_downloads_cifar10_when_none_is_given(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CIFAR-10: no --data, no $MOCO_DATA, no copy beside the checkout; the
    demo downloads the python-version archive (here a small one from a local server, its md5
    patched in) into the user cache folder and runs on it."""
    import hashlib

    from helpers import LocalServer, small_cifar_archive

    import moco.data.cifar_download as cd

    body = small_cifar_archive(per_batch=8)
    monkeypatch.setattr(cd, "CIFAR10_MD5", hashlib.md5(body).hexdigest())
    monkeypatch.setattr(demo, "DEV_COPY", tmp_path / "no-such-copy")
    monkeypatch.delenv("MOCO_DATA", raising=False)
    monkeypatch.setenv("MOCO_CACHE", str(tmp_path / "cache"))
    with LocalServer() as srv:
        srv.served.files["/cifar-10-python.tar.gz"] = body
        monkeypatch.setenv(cd.URL_ENV, srv.url("/cifar-10-python.tar.gz"))
        rc, text = _run(["--output", str(tmp_path / "run"), "--device", "cpu", *TINY])
    assert rc == 0, text
    assert (tmp_path / "cache/datasets/cifar-10-batches-py/test_batch").is_file()
    assert "VERDICT" in text and [r[0] for r in _table(text)][:1] == ["0"]
