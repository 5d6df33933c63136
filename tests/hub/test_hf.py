"""Hugging Face Hub model folders: ``moco export --format hf`` round-trips bit for bit through
``moco.from_pretrained``, timm loads the same folder, the model card comes from the run's own
metrics, Hub ids resolve through huggingface_hub (its offline cache, or a mock: never the
network), and ``moco hub push`` is one upload_folder call."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from builders import save_v3_checkpoint
from helpers import TINY_FLAGS, make_image_folder, run_cli, save_original_checkpoint
from safetensors.torch import load_file

import moco
from moco.core.backbones import build_backbone
from moco.core.errors import CheckpointError, HubError
from moco.eval.encoders import load_backbone
from moco.hub.hf import from_pretrained, push_to_hub, save_for_hf
from moco.hub.networks import TIMM_SAME_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real tiny MoCo v2 run (2 epochs) and a linear classification of its checkpoint."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCO_CACHE", str(root / "cache"))
        data = make_image_folder(root / "data")
        out = root / "run"
        rc, _, err = run_cli(["pretrain", str(data), "--output", str(out), *TINY_FLAGS,
                              "--mlp", "--aug-plus", "--cos", "--moco-t", "0.2"])
        assert rc == 0, err
        ckpt = out / "checkpoint_0001.pth.tar"
        rc, _, err = run_cli(["lincls", str(data), "--pretrained", str(ckpt), "--epochs", "2",
                              "-b", "8", "--fast", "-j", "0", "--no-progress", "--output",
                              str(out / "lincls")])
        assert rc == 0, err
        yield ckpt


def _x(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _export(ckpt: Path, out: Path) -> Path:
    rc, stdout, err = run_cli(["export", str(ckpt), "--format", "hf", "--out", str(out)])
    assert rc == 0, err
    assert "config.json, README.md" in stdout
    return out


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --- the round trip ----------------------------------------------------------------------------

def test_export_hf_round_trips_bit_exactly(run: Path, tmp_path: Path) -> None:
    folder = _export(run, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                       "model.safetensors"]
    ref, info = load_backbone(run)
    model = moco.from_pretrained(folder)
    want, got = ref.state_dict(), model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(load_file(str(folder / "model.safetensors"))) == sorted(want)  # torchvision
    with torch.no_grad():
        assert torch.equal(model(_x()), ref(_x()))
    assert model.moco_info.image_size == info.image_size == 32
    assert model.transform.transforms[-1].mean == list(info.mean)


def test_a_fresh_head_from_a_folder(run: Path, tmp_path: Path) -> None:
    folder = _export(run, tmp_path / "hf")
    model = from_pretrained(folder, num_classes=3)
    assert model.fc.out_features == 3 and model(_x()).shape == (2, 3)


def test_the_card_is_written_from_the_runs_metrics(run: Path, tmp_path: Path) -> None:
    folder = _export(run, tmp_path / "hf")
    card = (folder / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "other" and meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert {"moco", "mocov2", "self-supervised-learning"} <= set(meta["tags"])
    last = [json.loads(line) for line in (run.parent / "metrics.jsonl").read_text().splitlines()][-1]
    lin = [json.loads(line) for line in
           (run.parent / "lincls" / "metrics.jsonl").read_text().splitlines()]
    best = max(r["acc1"] for r in lin)
    assert f"| kNN monitor | {last['knn_top1']:.2f} | {last['knn_top5']:.2f} |" in card
    assert "k 5, t 0.1" in card and "moco pretrain data --config config.yaml" in card
    assert f"| linear classification | {best:.2f} |" in card
    assert ("moco lincls data --pretrained checkpoint_0001.pth.tar --epochs 2 -b 8 --lr 30.0 "
            "--wd 0.0 --momentum 0.9 --seed 0 --schedule 60 80 --fast") in card
    assert f"({last['step'] * 8:,} image pairs seen)" in card and "MoCo v2" in card
    section = json.loads((folder / "config.json").read_text())["moco"]
    assert section["recipe"]["moco_k"] == 32 and section["recipe"]["mlp"] is True
    assert section["pairs_seen"] == last["step"] * 8 and section["epochs"] == 2
    assert [r["top1"] for r in section["results"]] == [last["knn_top1"], best]
    assert str(run.parent) not in card  # a card is public: names, not the user's paths


def test_a_checkpoint_without_a_run_folder_says_so(tmp_path: Path) -> None:
    ckpt = tmp_path / "alone.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", mlp=True)
    r = save_for_hf(ckpt, tmp_path / "hf", licence="mit")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert r.summary.figures == [] and "No evaluation of this checkpoint" in card
    assert _front_matter(card)["license"] == "mit" and "MoCo v2" in card


# --- timm reads the same folder ----------------------------------------------------------------

def test_timm_loads_the_folder_bit_exactly(run: Path, tmp_path: Path) -> None:
    folder = _export(run, tmp_path / "hf")
    ref, _ = load_backbone(run)
    by_dir = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_file = timm.create_model("resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay={
        "file": str(folder / "model.safetensors")}).eval()
    with torch.no_grad():
        assert torch.equal(by_dir(_x()), ref(_x())) and torch.equal(by_file(_x()), ref(_x()))
    cfg = timm.data.resolve_data_config({}, model=by_dir)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and tuple(cfg["mean"]) == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("arch", TIMM_SAME_NAMES)
def test_timm_has_the_same_resnets_under_the_same_names(arch: str) -> None:
    with torch.device("meta"):
        ours = build_backbone(arch).model.state_dict()
        theirs = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    assert {k: v.shape for k, v in ours.items() if not k.startswith("fc.")} == \
        {k: v.shape for k, v in theirs.items()}


def test_a_cifar_stem_is_no_timm_model(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", cifar_stem=True)
    save_for_hf(ckpt, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "architecture" not in config and config["moco"]["cifar_stem"] is True
    assert "library_name" not in _front_matter((tmp_path / "hf" / "README.md").read_text())
    ref, _ = load_backbone(ckpt)
    assert torch.equal(from_pretrained(tmp_path / "hf")(_x()), ref(_x()))


# --- MoCo v3 files and released models ---------------------------------------------------------

def test_a_v3_checkpoint_exports_its_base_encoder(tmp_path: Path) -> None:
    base = save_v3_checkpoint(tmp_path / "v3.pth.tar", "resnet18")
    base.fc = torch.nn.Identity()
    r = save_for_hf(tmp_path / "v3.pth.tar", tmp_path / "hf")
    assert r.info.method == "MoCo v3" and r.info.feature_dim == 512 and r.info.epochs == 300
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architecture"] == "resnet18"
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "hf")(_x()), base(_x()))


def test_a_released_vit_exports_for_moco_and_timm(tmp_path: Path, server: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from builders import build_release, serve_entry

    from moco.hub.registry import REGISTRY

    built = build_release("v3-vit_small_patch16_224", tmp_path)
    entry = serve_entry(REGISTRY["mocov3_vit_small_300ep"], server, built)
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    save_for_hf(moco.load_pretrained(entry.name, progress=False), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224"
    assert config["model_args"]["num_heads"] == 12  # MoCo v3's ViT-S; timm's default has 6
    assert config["pretrained_cfg"]["classifier"] == "head"
    model = from_pretrained(tmp_path / "hf")
    t = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    ref = built[1]
    with torch.no_grad():
        assert torch.equal(model(_x()), ref(_x())) and torch.equal(t(_x()), ref(_x()))
    assert model.blocks[0].attn.num_heads == t.blocks[0].attn.num_heads == 12


def test_a_released_model_exports_with_the_authors_figures(
        tmp_path: Path, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from builders import build_release, serve_entry

    from moco.hub.registry import REGISTRY

    entry = serve_entry(REGISTRY["mocov2_r50_800ep"], server, build_release("v2", tmp_path))
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    model = moco.load_pretrained(entry.name, progress=False)
    save_for_hf(model, tmp_path / "hf", repo_id="me/mocov2")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert _front_matter(card)["license"] == "cc-by-nc-4.0"
    assert "linear top-1 **71.1%**" in card and "not checked against the file" in card
    assert 'moco.from_pretrained("me/mocov2")' in card and "hf-hub:me/mocov2" in card
    back = from_pretrained(tmp_path / "hf")
    assert torch.equal(back(_x(64)), model(_x(64)))


# --- Hub ids, offline and mocked ---------------------------------------------------------------

def _cached_repo(folder: Path, repo: str) -> None:
    """Put ``folder`` into the Hugging Face cache ($HF_HOME/hub) as the snapshot of
    ``repo``'s main branch, in huggingface_hub's cache layout."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_a_hub_id_from_the_offline_cache(run: Path, tmp_path: Path) -> None:
    folder = _export(run, tmp_path / "hf")
    _cached_repo(folder, "someone/moco-r18")
    ref, _ = load_backbone(run)
    for name in ("someone/moco-r18", "hf-hub:someone/moco-r18"):
        assert torch.equal(moco.from_pretrained(name)(_x()), ref(_x()))


def test_a_hub_id_missing_offline_is_one_line() -> None:
    with pytest.raises(HubError) as e:
        from_pretrained("someone/not-cached")
    assert "\n" not in str(e.value) and "someone/not-cached" in str(e.value)


def test_a_hub_id_goes_through_snapshot_download(run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    folder = _export(run, tmp_path / "hf")
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake(repo_id: str, **kw: Any) -> str:
        calls.append((repo_id, kw))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    from_pretrained("someone/moco-r18@v1")
    assert calls == [("someone/moco-r18", {"revision": "v1", "allow_patterns": [
        "config.json", "model.safetensors", "README.md"]})]


def test_without_huggingface_hub_a_hub_id_says_how_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(HubError, match=r"momentum-contrast\[hub\]"):
        from_pretrained("someone/x")


def test_folders_that_are_not_model_folders(tmp_path: Path, run: Path) -> None:
    with pytest.raises(HubError, match="no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(HubError, match="neither a folder nor"):
        from_pretrained("no/such/folder/here")
    folder = _export(run, tmp_path / "hf")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        from_pretrained(folder)
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


# --- moco hub push -----------------------------------------------------------------------------

def test_push_is_one_upload_folder_call(run: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    folder = _export(run, tmp_path / "hf")
    calls: list[tuple[str, Any, dict[str, Any]]] = []
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.append(("create_repo", repo_id, kw)))

    class Commit:
        commit_url = "https://huggingface.co/someone/r18/commit/abc"

    def upload(**kw: Any) -> Commit:
        calls.append(("upload_folder", None, kw))
        return Commit()

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload)
    rc, out, err = run_cli(["hub", "push", str(folder), "someone/r18", "--private", "-m", "v1"])
    assert rc == 0, err and Commit.commit_url in out
    assert calls == [("create_repo", "someone/r18", {"private": True, "exist_ok": True}),
                     ("upload_folder", None, {"repo_id": "someone/r18",
                                              "folder_path": str(folder), "revision": None,
                                              "commit_message": "v1"})]


def test_push_offline_or_of_a_wrong_folder_is_one_line(run: Path, tmp_path: Path) -> None:
    folder = _export(run, tmp_path / "hf")
    rc, _, err = run_cli(["hub", "push", str(folder), "someone/r18"])  # HF_HUB_OFFLINE=1
    assert rc == 2 and err.count("\n") == 1 and "cannot upload" in err
    with pytest.raises(HubError, match="lacks model.safetensors, config.json, README.md"):
        push_to_hub(tmp_path, "someone/r18")


def test_a_timm_backbone_exports_under_timms_names(tmp_path: Path) -> None:
    enc = build_backbone("timm:resnet10t").model  # body = the timm model, fc = MoCo's head
    ckpt = tmp_path / "t.pth.tar"
    torch.save({"epoch": 3, "arch": "timm:resnet10t", "state_dict": {
        f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}, ckpt)
    r = save_for_hf(ckpt, tmp_path / "hf")
    assert r.info.family == "timm" and r.info.arch == "resnet10t"
    body = enc.body.eval()
    t = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "hf")(_x()), body(_x()))
        assert torch.equal(t(_x()), body(_x()))
