"""``moco neighbours``: the grid through the command, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_image_folder, run_cli, save_original_checkpoint
from PIL import Image

from moco.eval.neighbours import grid_pixels

FLAGS = ["-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neighbours-cli") / "moco.pth.tar"
    save_original_checkpoint(path, "resnet18", with_optimizer=False)
    return path


def test_neighbours_writes_the_grid(ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=5, size=16)
    out = tmp_path / "grid.png"
    rc, stdout, stderr = run_cli(["neighbours", str(ckpt), str(data), "-o", str(out),
                                  "--queries", "2", "--k", "3", *FLAGS])
    assert rc == 0, stderr
    assert f"wrote {out}: 2 queries (heldout) x 3 neighbours from a bank of 10 images" in stdout
    assert "share the query's class" in stdout
    with Image.open(out) as im:
        assert im.size[::-1] == grid_pixels(2, 4)


@pytest.mark.parametrize(("extra", "message"), [
    (["--k", "0"], "expected --k"),
    (["--queries", "1000"], "expected --queries"),
    (["--bank-images", "-1"], "expected --bank-images"),
    (["--queries-from", "heldout"], "no val/ or test/"),
])
def test_neighbours_errors_are_one_line(ckpt: Path, tmp_path: Path, extra: list[str],
                                        message: str) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=16, splits=("train",))
    rc, _, stderr = run_cli(["neighbours", str(ckpt), str(data / "train"), "-o",
                             str(tmp_path / "g.png"), *extra, *FLAGS])
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("moco neighbours: error: ")
    assert message in errors[0]
    assert not (tmp_path / "g.png").exists()


def test_neighbours_never_writes_into_the_data(ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=16)
    rc, _, stderr = run_cli(["neighbours", str(ckpt), str(data), "-o", str(data / "g.png"),
                             *FLAGS])
    assert rc == 2 and "data folder" in stderr and not (data / "g.png").exists()
