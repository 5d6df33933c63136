"""``moco embed``: one vector per image of any folder, with the file list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import full_disk_for_exports, save_original_checkpoint
from PIL import Image
from safetensors import safe_open

from moco.cli import main
from moco.data.augment import eval_transform
from moco.data.source import open_rgb
from moco.eval.encoders import load_backbone

FLAGS = ["-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32", "-b", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("embed") / "moco_v2.pth.tar"
    save_original_checkpoint(path, "resnet18", mlp=True, with_optimizer=False)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Images at several depths, plus files that must be ignored."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for rel in ("b.png", "a/x.jpg", "a/deep/y.png", "c/z.PNG"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + len(rel), 24, 3), dtype=np.uint8)).save(p)
    (root / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".cache" / "hidden.png")
    return root


EXPECTED = ["a/deep/y.png", "a/x.jpg", "b.png", "c/z.PNG"]


def test_embed_npy(ckpt: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.npy"
    assert main(["embed", str(images), "--pretrained", str(ckpt), "--out", str(out), *FLAGS]) == 0
    emb = np.load(out)
    side = json.loads((tmp_path / "emb.npy.json").read_text())
    assert emb.shape == (4, 512) and emb.dtype == np.float32
    assert side["files"] == EXPECTED and side["arch"] == "resnet18" and side["feature_dim"] == 512
    # row i is the encoder's feature of file i
    model, info = load_backbone(ckpt)
    tf = eval_transform(32, info.mean, info.std)
    with torch.no_grad():
        ref = model(tf(open_rgb(images / EXPECTED[1]))[None])[0].numpy()
    np.testing.assert_allclose(emb[1], ref, rtol=1e-5, atol=1e-5)


def test_embed_safetensors_head_normalized(ckpt: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.safetensors"
    assert main(["embed", str(images), "--pretrained", str(ckpt), "--out", str(out), "--features",
                 "head", "--normalize", *FLAGS]) == 0
    with safe_open(str(out), framework="pt") as f:
        emb = f.get_tensor("embeddings")
        meta = f.metadata()
    assert emb.shape == (4, 128)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert json.loads(meta["files"]) == EXPECTED and meta["features"] == "head"


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_embed_on_a_full_disk_is_a_clear_error(ckpt: Path, images: Path, tmp_path: Path,
                                               suffix: str, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    full_disk_for_exports(monkeypatch, 64)
    out = tmp_path / "out" / f"emb{suffix}"
    out.parent.mkdir()
    assert main(["embed", str(images), "--pretrained", str(ckpt), "--out", str(out), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_embed_bad_images(ckpt: Path, images: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    (images / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "e.npy"
    assert main(["embed", str(images), "--pretrained", str(ckpt), "--out", str(out), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "--skip-bad" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["embed", str(images), "--pretrained", str(ckpt), "--out", str(out), "--skip-bad",
                 *FLAGS]) == 0
    side = json.loads((tmp_path / "e.npy.json").read_text())
    assert side["files"] == EXPECTED and side["skipped"] == ["a/broken.png"]
    assert np.load(out).shape == (4, 512)
    assert "skipped unreadable image a/broken.png" in capsys.readouterr().err


def test_embed_errors(ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["embed", str(images), "--pretrained", str(ckpt), "--out", str(tmp_path / "e.csv")]) == 2
    assert ".npy or .safetensors" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["embed", str(tmp_path / "empty"), "--pretrained", str(ckpt), "--out",
                 str(tmp_path / "e.npy")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["embed", str(images), "--pretrained", str(tmp_path / "nope.pth"), "--out",
                 str(tmp_path / "e.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
