"""Each export loaded by its consumer: torchvision, detectron2's pickle (REFERENCE.md §9.1),
safetensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import (
    demo_state_dict,
    full_disk_for_exports,
    original_convert_to_detectron2,
    original_encoder,
    original_state_dict,
    save_original_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from moco.cli import main
from moco.core.backbones import build_backbone
from moco.eval.encoders import load_backbone
from moco.eval.export import EXPORT_FORMATS, detectron2_checkpoint, export_checkpoint
from moco.utils.checkpoint import load_checkpoint

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    path = tmp_path_factory.mktemp("export") / "moco_v2.pth.tar"
    enc = save_original_checkpoint(path, "resnet18", mlp=True, with_optimizer=False)
    return path, enc


def _features(net: nn.Module) -> torch.Tensor:
    net.fc = nn.Identity()
    with torch.no_grad():
        return net.eval()(X)


def test_torchvision_export(v2: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, enc = v2
    out = tmp_path / "r18.pth"
    assert main(["export", str(path), "--format", "torchvision", "--out", str(out)]) == 0
    sd = torch.load(out, map_location="cpu", weights_only=True)
    net = torchvision.models.resnet18()
    msg = net.load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
    ref = original_encoder("resnet18", mlp=True)  # same seed: the encoder in the file
    torch.testing.assert_close(_features(net), _features(ref), rtol=0, atol=0)


def test_torchvision_export_cifar_stem_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.pth.tar"
    save_original_checkpoint(path, "resnet18", cifar_stem=True, with_optimizer=False)
    out = tmp_path / "c.pth"
    assert main(["export", str(path), "-f", "torchvision", "-o", str(out)]) == 0
    assert "CIFAR stem" in capsys.readouterr().err
    sd = torch.load(out, map_location="cpu", weights_only=True)
    with pytest.raises(RuntimeError, match="conv1.weight"):
        torchvision.models.resnet18().load_state_dict(sd, strict=False)
    net = build_backbone("resnet18", cifar_stem=True).model
    msg = net.load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("mlp", [False, True])
def test_detectron2_resnet50_keys_and_shapes(mlp: bool) -> None:
    enc = original_encoder("resnet50", mlp=mlp)
    state = original_state_dict(enc, k=16, with_encoder_k=False)
    state["module.encoder_k.conv1.weight"] = torch.zeros(1)  # dropped like the rest of f_k
    obj = detectron2_checkpoint(state)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert len(model) == (322 if mlp else 320)
    table = {  # REFERENCE.md §9.1, worked example
        "stem.conv1.weight": (64, 3, 7, 7),
        "stem.conv1.norm.weight": (64,),
        "stem.conv1.norm.running_var": (64,),
        "stem.conv1.norm.num_batches_tracked": (),
        "res2.0.conv1.weight": (64, 64, 1, 1),
        "res2.0.conv1.norm.bias": (64,),
        "res2.0.conv3.norm.running_mean": (256,),
        "res2.0.shortcut.weight": (256, 64, 1, 1),
        "res2.0.shortcut.norm.running_var": (256,),
        "res3.3.conv2.weight": (128, 128, 3, 3),
        "res4.5.conv2.norm.weight": (256,),
        "res5.0.shortcut.norm.weight": (2048,),
        "res5.2.conv3.weight": (2048, 512, 1, 1),
    }
    table.update({"stem.fc.0.weight": (2048, 2048), "stem.fc.2.weight": (128, 2048)} if mlp
                 else {"stem.fc.weight": (128, 2048)})
    for name, shape in table.items():
        assert model[name].shape == shape, name
        assert isinstance(model[name], np.ndarray)
    assert model["stem.conv1.norm.num_batches_tracked"].dtype == np.int64
    assert model["res5.2.conv3.weight"].dtype == np.float32
    assert not any(k.startswith(("module.", "encoder_k", "queue")) or "layer" in k for k in model)
    # identical to the original script, order included
    ref = original_convert_to_detectron2({"state_dict": state})["model"]
    assert list(model) == list(ref)
    assert all(np.array_equal(model[k], ref[k]) for k in ref)


def test_detectron2_export_through_cli(v2: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, _ = v2
    out = tmp_path / "d2.pkl"
    assert main(["export", str(path), "--format", "detectron2", "--out", str(out)]) == 0
    with out.open("rb") as f:
        obj = pickle.load(f)
    ref = original_convert_to_detectron2(load_checkpoint(path))
    assert obj.keys() == ref.keys() and obj["__author__"] == "MOCO" and obj["matching_heuristics"]
    assert list(obj["model"]) == list(ref["model"])
    assert all(np.array_equal(obj["model"][k], v) for k, v in ref["model"].items())
    assert "stem.fc.0.weight" in obj["model"] and "res5.1.conv2.norm.running_var" in obj["model"]


def test_detectron2_from_demo_layout(tmp_path: Path) -> None:
    enc = original_encoder("resnet18", cifar_stem=True)
    torch.save({"epoch": 1, "state_dict": demo_state_dict(enc)}, tmp_path / "demo.pth")
    r = export_checkpoint(tmp_path / "demo.pth", "detectron2", tmp_path / "d2.pkl")
    assert r.warnings and "CIFAR stem" in r.warnings[0]
    with (tmp_path / "d2.pkl").open("rb") as f:
        model = pickle.load(f)["model"]
    assert model["stem.conv1.weight"].shape == (64, 3, 3, 3)
    assert model["stem.fc.weight"].shape == (128, 512)
    assert np.array_equal(model["res2.0.conv1.norm.running_mean"],
                          enc.state_dict()["layer1.0.bn1.running_mean"].numpy())


def test_safetensors_export(v2: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, enc = v2
    out = tmp_path / "r18.safetensors"
    assert main(["export", str(path), "--format", "safetensors", "--out", str(out)]) == 0
    tensors = load_file(str(out))
    ref = {k: v for k, v in enc.state_dict().items() if not k.startswith("fc.")}
    assert tensors.keys() == ref.keys()
    assert all(torch.equal(tensors[k], v) for k, v in ref.items())
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet18" and meta["cifar_stem"] == "false"
    assert meta["feature_dim"] == "512"
    model, info = load_backbone(out)  # and it is a pretrained backbone itself
    assert (info.layout, info.arch) == ("safetensors", "resnet18")
    with torch.no_grad():
        torch.testing.assert_close(model(X), _features(original_encoder("resnet18", mlp=True)),
                                   rtol=0, atol=0)


def test_export_errors(v2: tuple[Path, nn.Module], tmp_path: Path,
                       capsys: pytest.CaptureFixture) -> None:
    path, _ = v2
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export_checkpoint(path, "onnx", tmp_path / "x")
    assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert (f"expected --format to be one of {', '.join((*EXPORT_FORMATS, 'hf'))}, got onnx"
            in capsys.readouterr().err)
    assert main(["export", str(path), "-f", "torchvision", "-o", str(path)]) == 2
    assert "is the input checkpoint" in capsys.readouterr().err
    assert main(["export", str(path), "-f", "torchvision", "-o", str(tmp_path / "y"),
                 "--arch", "resnet50"]) == 2
    assert "resnet18 checkpoint but --arch is resnet50" in capsys.readouterr().err
    data = path.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) // 3])
    assert main(["export", str(tmp_path / "cut.pth.tar"), "-f", "safetensors", "-o",
                 str(tmp_path / "z.safetensors")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "z.safetensors").exists()


@pytest.mark.parametrize("fmt", ["torchvision", "detectron2", "safetensors"])
def test_a_full_disk_is_a_clear_error_and_leaves_no_file(
        v2: tuple[Path, nn.Module], tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    full_disk_for_exports(monkeypatch, 4096)
    out = tmp_path / f"out.{fmt}"
    assert main(["export", str(v2[0]), "-f", fmt, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free space" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_our_checkpoint_exports_like_the_original_script(tiny_data: Path, tmp_path: Path) -> None:
    import argparse

    from helpers import TINY_FLAGS

    from moco.cli.pretrain import add_parser, config_from_args
    from moco.engine.loop import Pretrainer

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["pretrain", str(tiny_data), *TINY_FLAGS, "--mlp", "--knn-every", "0",
                            "--output", str(tmp_path / "run")])
    trainer = Pretrainer(config_from_args(ns), progress=False, log=lambda _m: None)
    ckpt_path = trainer.save()
    trainer.runlog.close()
    out = tmp_path / "d2.pkl"
    assert main(["export", str(ckpt_path), "-f", "detectron2", "-o", str(out)]) == 0
    with out.open("rb") as f:
        obj = pickle.load(f)
    ref = original_convert_to_detectron2(load_checkpoint(ckpt_path))
    assert list(obj["model"]) == list(ref["model"])
    assert all(np.array_equal(obj["model"][k], v) for k, v in ref["model"].items())


def test_torchvision_and_timm_formats_in_timm(v2: tuple[Path, nn.Module], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """The torchvision file has no fc: timm loads it only with num_classes=0. --format timm
    adds timm's default head (a fresh init, said in the log) and loads strictly."""
    timm = pytest.importorskip("timm")
    path, enc = v2
    ref = _features(original_encoder("resnet18", mlp=True))
    tv = tmp_path / "tv.pth"
    assert main(["export", str(path), "-f", "torchvision", "-o", str(tv)]) == 0
    with pytest.raises(RuntimeError, match="fc.weight"):
        timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(tv)))
    net = timm.create_model("resnet18", pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(tv)))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(X), ref, rtol=0, atol=0)
    capsys.readouterr()
    tf = tmp_path / "timm.safetensors"
    assert main(["export", str(path), "-f", "timm", "-o", str(tf)]) == 0
    out = capsys.readouterr().out
    assert "fresh initialisation, not trained" in out and "pretrained_cfg_overlay" in out
    net = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(tf)))
    assert net.fc.out_features == 1000
    with torch.no_grad():
        torch.testing.assert_close(net.eval().forward_head(net.forward_features(X), pre_logits=True),
                                   ref, rtol=0, atol=0)


def test_wide_resnet_export_names_its_builder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moco.core.heads import linear_head

    net = build_backbone("resnet18w2").model
    net.fc = linear_head(1024, 8)
    ckpt = tmp_path / "w2.pth.tar"
    torch.save({"arch": "resnet18w2", "state_dict": {f"module.encoder_q.{k}": v for k, v in
                                                     net.state_dict().items()}}, ckpt)
    assert main(["export", str(ckpt), "-f", "torchvision", "-o", str(tmp_path / "w2.pth")]) == 0
    assert "moco.core.wide_resnet.resnet18w2()" in capsys.readouterr().out
    assert main(["export", str(ckpt), "-f", "timm", "-o", str(tmp_path / "t.pth")]) == 2
    assert "timm has no model named resnet18w2" in capsys.readouterr().err


# ----- the formats' registry ----------------------------------------------------------------
def test_a_new_format_is_one_function(v2: tuple[Path, nn.Module], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import moco.eval.export_formats as formats
    from moco.eval.export import ExportJob

    def write_keys(job: ExportJob) -> int:
        job.out.write_text("\n".join(job.backbone) + "\n")
        job.notes.append(f"{job.info.arch}: names only")
        return len(job.backbone)

    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))
    formats.register_format(formats.ExportFormat("keys", "the tensor names", write_keys))
    assert "keys" in formats.export_formats()
    r = export_checkpoint(v2[0], "keys", tmp_path / "k.txt")
    names = (tmp_path / "k.txt").read_text().split()
    assert r.num_tensors == len(names) and "layer4.1.bn2.running_var" in names
    assert not any(n.startswith("fc") for n in names) and r.notes == ["resnet18: names only"]
    with pytest.raises(ValueError, match="registered already"):
        formats.register_format(formats.ExportFormat("keys", "again", write_keys))
    # a writer named "module:function" is imported when used (a format above moco.eval)
    formats.register_format(formats.ExportFormat("later", "lazy", "json:dumps"))
    assert formats.get_format("later").load() is __import__("json").dumps


# ----- MoCo v3 checkpoints: ResNet and ViT ----------------------------------------------------
@pytest.fixture(scope="module")
def v3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    pytest.importorskip("timm")
    from helpers import mocov3_resnet, mocov3_vit, save_mocov3_checkpoint

    d = tmp_path_factory.mktemp("v3")
    r18 = mocov3_resnet("resnet18", hidden=64, dim=16)
    save_mocov3_checkpoint(d / "r18.pth.tar", r18, "resnet18", hidden=64, dim=16)
    vit = mocov3_vit(depth=2, patch=8, img=32, hidden=64, dim=16)
    save_mocov3_checkpoint(d / "vit.pth.tar", vit, "vit_small", vit=True, hidden=64, dim=16)
    return {"resnet": (d / "r18.pth.tar", r18), "vit": (d / "vit.pth.tar", vit)}


def _vit_features(vit: nn.Module) -> torch.Tensor:
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=384, depth=2, num_heads=12,
                            num_classes=0)
    ref.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")})
    with torch.no_grad():
        return ref.eval()(X)


def test_mocov3_resnet_exports(v3: dict, tmp_path: Path) -> None:
    path, enc = v3["resnet"]
    r = export_checkpoint(path, "torchvision", tmp_path / "r18.pth")
    net = torchvision.models.resnet18()
    msg = net.load_state_dict(torch.load(r.path, weights_only=True), strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
    torch.testing.assert_close(_features(net), _features(enc), rtol=0, atol=0)
    r = export_checkpoint(path, "detectron2", tmp_path / "d2.pkl")
    with r.path.open("rb") as f:
        model = pickle.load(f)["model"]
    assert model["stem.fc.0.weight"].shape == (64, 512) and "stem.fc.4.running_var" in model
    assert model["res5.1.conv2.norm.running_mean"].shape == (512,)


def test_mocov3_vit_exports(v3: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """timm (with num_heads=12 and the small ViT's sizes), DeiT's layout and safetensors, each
    loaded by its consumer with the same [CLS] features."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    path, vit = v3["vit"]
    ref = _vit_features(vit)
    assert main(["export", str(path), "-f", "timm", "-o", str(tmp_path / "t.pth")]) == 0
    out = capsys.readouterr().out
    assert "timm.create_model('vit_small_patch16_224', pretrained=True, img_size=32" in out
    assert "num_heads=12" in out and "depth=2" in out and "patch_size=8" in out
    net = timm.create_model("vit_small_patch16_224", pretrained=True, img_size=32, patch_size=8,
                            depth=2, num_heads=12,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "t.pth")))
    with torch.no_grad():
        got = net.eval().forward_head(net.forward_features(X), pre_logits=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)

    r = export_checkpoint(path, "deit", tmp_path / "deit.pth")
    obj = torch.load(r.path, weights_only=True)
    assert list(obj) == ["model"] and not any(k.startswith("head") for k in obj["model"])
    assert any("num_heads=12" in n for n in r.notes)
    deit = VisionTransformer(img_size=32, patch_size=8, embed_dim=384, depth=2, num_heads=12,
                             num_classes=10)
    msg = deit.load_state_dict(obj["model"], strict=False)  # DeiT's main.py --finetune
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys
    deit.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(deit.eval()(X), ref, rtol=0, atol=0)

    st = export_checkpoint(path, "safetensors", tmp_path / "v.safetensors")
    with safe_open(str(st.path), framework="pt") as f:
        assert '"num_heads": 12' in f.metadata()["vit"]
    model, info = load_backbone(st.path)
    assert (info.arch, info.feature_dim) == ("vit_small", 384)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref, rtol=0, atol=0)
    for fmt in ("torchvision", "detectron2"):
        with pytest.raises(ValueError, match="Vision Transformer: --format"):
            export_checkpoint(path, fmt, tmp_path / f"x.{fmt}")


# ----- file names and contents ---------------------------------------------------------------
def test_files_are_read_by_content_whatever_their_name(
        v2: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = v2
    ref, _ = load_backbone(path)
    with torch.no_grad():
        want = ref(X)
    # a safetensors export under another name: said at export, read back by its content
    assert main(["export", str(path), "-f", "safetensors", "-o", str(tmp_path / "x.out")]) == 0
    assert "does not end in .safetensors" in capsys.readouterr().err
    model, info = load_backbone(tmp_path / "x.out")
    assert info.layout == "safetensors"
    # a torch file named .safetensors (a checkpoint copied under that name) loads as torch
    (tmp_path / "ckpt.safetensors").write_bytes(path.read_bytes())
    model2, info2 = load_backbone(tmp_path / "ckpt.safetensors")
    assert info2.layout == "original"
    # --format torchvision to a .safetensors name writes safetensors
    assert main(["export", str(path), "-f", "torchvision", "-o", str(tmp_path / "tv.safetensors")]) == 0
    tensors = load_file(str(tmp_path / "tv.safetensors"))
    msg = torchvision.models.resnet18().load_state_dict(tensors, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
    model3, _ = load_backbone(tmp_path / "tv.safetensors")
    with torch.no_grad():
        for m in (model, model2, model3):
            torch.testing.assert_close(m(X), want, rtol=0, atol=0)
    # the formats read by pickle-only consumers refuse a .safetensors name
    assert main(["export", str(path), "-f", "detectron2", "-o", str(tmp_path / "d.safetensors")]) == 2
    assert "name the file d.pkl" in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()
