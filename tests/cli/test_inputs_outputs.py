"""No command writes what it reads: an output that is an input file (the same path, a symbolic
link, a hard link) or lies in a data folder is refused before anything is computed or written,
and every setting is checked before an old run is deleted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_FLAGS, make_image_folder, run_cli, save_original_checkpoint

from moco.core.errors import OutputError
from moco.utils.checkpoint import atomic_save
from moco.utils.paths import check_output, is_inside, same_file

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = ["-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32"]


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def contents(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its hash."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("io") / "moco.pth.tar"
    save_original_checkpoint(path, "resnet18", with_optimizer=False)
    return path


def one_line_error(rc: int, err: str, command: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"moco {command}: error: "), err
    return line


def links(target: Path, folder: Path, name: str) -> dict[str, Path]:
    """The same file as ``target`` under three other names: symbolic link, hard link, and the
    path itself written another way (``folder/../folder/name``)."""
    folder.mkdir(parents=True, exist_ok=True)
    sym, hard = folder / f"sym-{name}", folder / f"hard-{name}"
    sym.symlink_to(target)
    os.link(target, hard)
    return {"same": target, "symlink": sym, "hardlink": hard,
            "dotted": target.parent / ".." / target.parent.name / target.name}


# ----- the identity checks themselves ----------------------------------------------------------

def test_same_file_by_path_link_and_inode(tmp_path: Path) -> None:
    a = tmp_path / "a.bin"
    a.write_bytes(b"x")
    for how, p in links(a, tmp_path / "l", "a.bin").items():
        assert same_file(p, a), how
    other = tmp_path / "b.bin"
    other.write_bytes(b"x")
    assert not same_file(other, a) and not same_file(tmp_path / "missing", a)
    assert is_inside(tmp_path / "d" / "x" / "new.png", tmp_path / "d")
    (tmp_path / "to_d").symlink_to(tmp_path / "d")
    (tmp_path / "d").mkdir()
    assert is_inside(tmp_path / "to_d" / "run", tmp_path / "d")  # through a link
    assert not is_inside(tmp_path / "dd", tmp_path / "d") and not is_inside(tmp_path, tmp_path / "d")
    with pytest.raises(OutputError, match=r"hard-a.bin is the input .*a.bin \(a link to it\): a "
                       "command never writes over its input"):
        check_output(tmp_path / "l" / "hard-a.bin", "--out", files={"the input": a})


# ----- pretrain ----------------------------------------------------------------------------

def old_run(out: Path) -> dict[str, str]:
    out.mkdir(parents=True)
    atomic_save({"epoch": 3, "w": torch.ones(2)}, out / "checkpoint_0002.pth.tar")
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    (out / "config.yaml").write_text("epochs: 3\n")
    return contents(out)


@pytest.mark.parametrize("bad", [
    ["-p", "0"],
    ["--moco-t", "inf"],
    ["--epochs", "2.5"],
    ["--moco-k", str(10**12)],
    ["-b", "8", "--bn-splits", "8"],  # 1 image per BN split, 1x1 feature maps at 32 px
    ["--seed", str(2**70)],
    ["--device", "foo"],
])
def test_overwrite_with_a_bad_setting_keeps_the_old_run(tiny_data: Path, tmp_path: Path,
                                                       bad: list[str]) -> None:
    out = tmp_path / "run"
    before = old_run(out)
    rc, _, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out),
                          "--overwrite", *bad])
    one_line_error(rc, err, "pretrain")
    assert contents(out) == before


def test_output_inside_the_data_folder_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    before = contents(tiny_data)
    (tmp_path / "to_data").symlink_to(tiny_data)
    for out in (tiny_data / "runs", tiny_data / "train" / "class_0", tiny_data,
                tmp_path / "to_data" / "run"):
        rc, _, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out)])
        line = one_line_error(rc, err, "pretrain")
        assert "is inside the data folder" in line and "--output" in line
    assert contents(tiny_data) == before  # no plot.png to become a training image


def test_config_file_is_not_the_config_yaml_the_run_rewrites(tiny_data: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = old_run(out)
    rc, _, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out),
                          "--config", str(out / "config.yaml"), "--overwrite"])
    assert "is the --config file" in one_line_error(rc, err, "pretrain")
    assert contents(out) == before


def test_resume_auto_never_starts_over_unreadable_checkpoints(tiny_data: Path,
                                                             tmp_path: Path) -> None:
    """Every checkpoint exists but none loads: an error that says so, and every file (the
    metrics included) as it was; no checkpoint is pruned."""
    out = tmp_path / "run"
    out.mkdir()
    for i in range(3):
        (out / f"checkpoint_{i:04d}.pth.tar").write_bytes(b"PK\x03\x04 cut short by a crash")
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    before = contents(out)
    rc, _, err = run_cli(["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(out),
                          "--resume", "auto", "--keep-last", "1"])
    line = one_line_error(rc, err, "pretrain")
    assert "cannot read any of the 3 checkpoint(s)" in line and "nothing was changed" in line
    assert contents(out) == before


# ----- knn, embed, export: the output file against the input checkpoint ------------------------

@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_knn_json_is_never_the_checkpoint(ckpt: Path, tmp_path: Path, how: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    before = digest(ckpt)
    target = links(ckpt, tmp_path / "l", "k.pth.tar")[how] if how != "same" else ckpt
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(ckpt), "--json", str(target),
                          *EVAL])
    line = one_line_error(rc, err, "knn")
    assert "--json" in line and "the input checkpoint (--pretrained)" in line
    assert digest(ckpt) == before


def test_knn_json_inside_the_data_folder_is_refused(ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    before = contents(data)
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(ckpt), "--json",
                          str(data / "train" / "knn.json"), *EVAL])
    assert "is inside the data folder" in one_line_error(rc, err, "knn")
    assert contents(data) == before


def test_knn_json_is_written_atomically(ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    out = tmp_path / "r.json"
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(ckpt), "--json", str(out), *EVAL])
    assert rc == 0, err
    assert json.loads(out.read_text())["bank_size"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_embed_out_is_never_the_checkpoint(tmp_path: Path, how: str) -> None:
    images = make_image_folder(tmp_path / "imgs", per_class=2, size=8, splits=("a",))
    enc = tmp_path / "enc.safetensors"
    save_original_checkpoint(tmp_path / "ckpt.pth.tar", "resnet18", with_optimizer=False)
    rc, _, err = run_cli(["export", str(tmp_path / "ckpt.pth.tar"), "-f", "safetensors", "-o",
                          str(enc)])
    assert rc == 0, err
    before = digest(enc)
    target = links(enc, tmp_path / "l", "e.safetensors")[how] if how != "same" else enc
    if how == "hardlink":  # an .npy name linked to the checkpoint file
        target = tmp_path / "l" / "hard.npy"
        os.link(enc, target)
    rc, _, err = run_cli(["embed", str(images), "--pretrained", str(enc), "--out", str(target),
                          *EVAL])
    line = one_line_error(rc, err, "embed")
    assert "the input checkpoint (--pretrained)" in line
    assert digest(enc) == before


def test_embed_out_inside_the_image_folder_is_refused(ckpt: Path, tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "imgs", per_class=2, size=8, splits=("a",))
    before = contents(images)
    rc, _, err = run_cli(["embed", str(images), "--pretrained", str(ckpt), "--out",
                          str(images / "a" / "emb.npy"), *EVAL])
    assert "is inside the image folder" in one_line_error(rc, err, "embed")
    assert contents(images) == before


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_export_out_is_never_the_checkpoint(ckpt: Path, tmp_path: Path, how: str) -> None:
    before = digest(ckpt)
    target = links(ckpt, tmp_path / "l", "x.pth.tar")[how] if how != "same" else ckpt
    rc, _, err = run_cli(["export", str(ckpt), "-f", "torchvision", "-o", str(target)])
    assert "is the input checkpoint" in one_line_error(rc, err, "export")
    assert digest(ckpt) == before


@pytest.mark.parametrize("command", ["knn", "export", "embed"])
def test_an_output_that_is_a_device_is_never_replaced(ckpt: Path, tmp_path: Path,
                                                      command: str) -> None:
    """An atomic write renames a temporary file over the output: over /dev/null it would
    replace the device (as root). Refused."""
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    argv = {"knn": ["knn", str(data), "--pretrained", str(ckpt), "--json", "/dev/null", *EVAL],
            "export": ["export", str(ckpt), "-f", "torchvision", "-o", "/dev/null"],
            "embed": ["embed", str(data), "--pretrained", str(ckpt), "-o", str(fifo), *EVAL]}
    rc, _, err = run_cli(argv[command])
    assert "is not a regular file" in one_line_error(rc, err, command)
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()


def test_evaluation_batches_that_cannot_fit_are_refused(ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(ckpt), "-j", "0", "--device",
                          "cpu", "--image-size", "100000"])
    line = one_line_error(rc, err, "knn")
    assert "one batch (-b 256 images of --image-size 100000 px, float32) would take" in line


def test_a_file_given_as_the_data_folder(ckpt: Path, tiny_data: Path, tmp_path: Path) -> None:
    rc, _, err = run_cli(["pretrain", str(ckpt), *TINY_FLAGS, "--output", str(tmp_path / "r")])
    assert "is a file, not a folder" in one_line_error(rc, err, "pretrain")


def test_output_folder_that_does_not_exist_is_refused_before_the_work(ckpt: Path,
                                                                      tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2, size=8)
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(ckpt), "--json",
                          str(tmp_path / "nope" / "r.json"), *EVAL])
    assert "the folder" in one_line_error(rc, err, "knn") and "does not exist" in err


# ----- ablate ---------------------------------------------------------------------------------

def test_ablate_output_inside_the_data_folder_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"base": {"data": str(tiny_data), "epochs": 1},
                                    "grid": {"moco_m": [0.9]}}))
    before = contents(tiny_data)
    rc, _, err = run_cli(["ablate", str(grid), "--output", str(tiny_data / "abl"), "--no-cost"])
    assert "is inside the data folder" in one_line_error(rc, err, "ablate")
    assert contents(tiny_data) == before
