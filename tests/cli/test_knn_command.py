"""``moco knn``: a hand-computed example through the command, and the real pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_image_folder, save_original_checkpoint

import moco.eval.features
from moco.cli import main
from moco.data.datasets import EvalDataset
from moco.eval.encoders import load_backbone
from moco.eval.knn import extract_features, knn_accuracy


def image_batches(source: Any, transform: Any, batch_size: int) -> Any:
    """The per-image PIL evaluation transform in plain DataLoader batches: a reference for
    the monitor's pipeline (the decoded cache, resized and cropped by tensor ops)."""
    from torch.utils.data import DataLoader

    return DataLoader(EvalDataset(source, transform), batch_size=batch_size)


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Bank (DATA/train, sorted by class folder): class 0 = A, D; class 1 = B, C.
A, D, B, C = _unit(0), _unit(180), _unit(30), _unit(40)
BANK = [A, D, B, C]
# Queries (DATA/test): class 0 = q0, q1; class 1 = q2, q3.
Q0, Q1, Q2 = _unit(10), _unit(180), [0.6, 0.8]
QUERIES = [Q0, Q1, Q2, Q2]
# Hand computation, k = 3 (cosine similarities; weights exp(s / t)):
#  q0 = 10 deg: A cos10 = .985 (c0), B cos20 = .940 (c1), C cos30 = .866 (c1)
#     t = 1:    c0 e^.985 = 2.68 < c1 e^.940 + e^.866 = 2.56 + 2.38 = 4.94 -> class 1 (wrong)
#     t = 0.02: c0 e^49.2 > c1 e^47.0 + e^43.3 -> class 0 (right)
#  q1 = 180 deg: D 1 (c0), C -.766 (c1), B -.866 (c1): c0 e^1 = 2.72 > .47 + .42 -> right
#  q2 = q3 = (.6, .8): C .974, B .920 (c1), A .6 (c0) -> class 1 (right) at any t
# So top-1 = 75 % at t = 1 and 100 % at t = 0.02; with k = 1 q0's neighbour is A: 100 %.
# Two classes: top-5 is 100 %.
CASES = [(3, 1.0, 75.0), (3, 0.02, 100.0), (1, 1.0, 100.0)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("knn") / "moco.pth.tar"
    save_original_checkpoint(path, "resnet18", with_optimizer=False)
    return path


@pytest.mark.parametrize(("k", "t", "top1"), CASES)
def test_hand_computed_example(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               k: int, t: float, top1: float) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2, size=8)
    calls: list[int] = []

    def fake_extract(model: Any, batches: Any, device: Any, **kw: Any):
        labels = torch.cat([torch.as_tensor(y) for _, y in batches])
        feats = torch.tensor(BANK if not calls else QUERIES)
        calls.append(kw["n"])
        assert kw.get("normalize", True) is True and labels.tolist() == [0, 0, 1, 1]
        return feats.to(kw.get("dtype", torch.float32)), labels

    monkeypatch.setattr(moco.eval.features, "extract_features", fake_extract)
    out = tmp_path / "knn.json"
    rc = main(["knn", str(data), "--pretrained", str(ckpt), "--k", str(k), "--t", str(t),
               "-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32",
               "--json", str(out)])
    assert rc == 0 and calls == [4, 4]
    r = json.loads(out.read_text())
    assert r["top1"] == pytest.approx(top1) and r["top5"] == 100.0
    assert (r["k"], r["t"], r["bank_size"], r["num_queries"]) == (k, t, 4, 4)


def test_command_matches_library(ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, per_class=3)
    base = ["knn", str(data), "--pretrained", str(ckpt), "--k", "4", "--t", "0.07", "-j", "0",
            "--device", "cpu", "--no-progress", "--image-size", "32"]
    assert main([*base, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*base, "--bank-chunk", "2", "--half-bank", "-b", "2",
                 "--json", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    # by hand: the library's own extraction and kNN
    from moco.data.augment import eval_transform
    from moco.data.splits import find_dataset

    model, info = load_backbone(ckpt)
    splits = find_dataset(data)
    tf = eval_transform(32, info.mean, info.std)
    dev = torch.device("cpu")
    assert splits.test is not None
    bank, bl = extract_features(model, image_batches(splits.train, tf, 4), dev)
    q, ql = extract_features(model, image_batches(splits.test, tf, 4), dev)
    top1, top5 = knn_accuracy(q, ql, bank, bl, k=4, t=0.07)
    assert (a["top1"], a["top5"]) == pytest.approx((top1, top5))
    assert (b["top1"], b["top5"]) == pytest.approx((top1, top5))
    assert a["features"] == "backbone" and a["feature_dim"] == 512


def test_knn_needs_labels(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "flat"
    make_image_folder(tmp_path / "tmp", classes=1, per_class=2, splits=("train",))
    (data / "train").mkdir(parents=True)
    for p in (tmp_path / "tmp/train/class_0").iterdir():
        p.rename(data / "train" / p.name)
    assert main(["knn", str(data), "--pretrained", str(ckpt)]) == 2
    assert "unlabeled" in capsys.readouterr().err
    assert main(["knn", str(data), "--pretrained", str(ckpt), "--k", "0"]) == 2


def _noise_folder(root: Path, classes: int, per_class: int, split: str, seed: int) -> None:
    """Random-noise images of 36 x 40 px in class folders: the kNN figure is near chance and
    depends on every feature value, and the eval transform resizes and crops them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / split / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.parametrize("extra", [[], ["--loader", "pil", "--mlp", "--knn-features", "head"]],
                         ids=["decoded-cache", "pil-head"])
def test_the_monitor_and_moco_knn_give_the_same_figure(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       extra: list[str]) -> None:
    """The training monitor's kNN at the last epoch and `moco knn` on the checkpoint saved
    then: the same bank and query features to the bit (one extractor, one evaluation
    pipeline with the run's recorded transform), the same split check, the same figure."""
    from helpers import TINY_FLAGS, run_cli

    import moco.engine.evaluation
    import moco.eval.knn
    from moco.engine.rundir import newest_checkpoint

    data = tmp_path / "data"
    _noise_folder(data, 6, 6, "train", 1)
    _noise_folder(data, 6, 4, "test", 2)
    seen: dict[str, list[tuple[torch.Tensor, ...]]] = {"monitor": [], "knn": []}
    real = moco.eval.knn.knn_accuracy

    def spy(name: str) -> Any:
        def knn_accuracy(q: torch.Tensor, ql: torch.Tensor, b: torch.Tensor, bl: torch.Tensor,
                         **kw: Any) -> tuple[float, float]:
            seen[name].append((q.clone(), ql.clone(), b.clone(), bl.clone()))
            return real(q, ql, b, bl, **kw)
        return knn_accuracy

    monkeypatch.setattr(moco.engine.evaluation, "knn_accuracy", spy("monitor"))
    monkeypatch.setattr(moco.eval.knn, "knn_accuracy", spy("knn"))
    out = tmp_path / "run"
    rc, _, err = run_cli(["pretrain", str(data), *TINY_FLAGS, "--epochs", "1", "--knn-t", "0.07",
                          *extra, "--output", str(out)])
    assert rc == 0, err
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(newest_checkpoint(out)), "--k",
                          "5", "--t", "0.07", "-j", "0", "--no-progress",
                          "--json", str(tmp_path / "knn.json")])
    assert rc == 0, err
    r = json.loads((tmp_path / "knn.json").read_text())
    monitor, knn = seen["monitor"][-1], seen["knn"][-1]
    for a, b in zip(monitor, knn, strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    assert r["top1"] == last["knn_top1"] and 0 < r["top1"] < 100
    assert r["features"] == ("head" if "head" in extra else "backbone")
