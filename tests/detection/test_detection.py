"""Detection transfer: the detectron2 configs, the exported weights against detectron2's ResNet
naming (built here from detectron2's construction rules), the training command, and, when
detectron2 is importable, the real thing: the configs merged by detectron2 and the export loaded
into its model."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import run_cli, save_original_checkpoint

from moco.core.backbones import build_backbone
from moco.core.heads import linear_head
from moco.detection.settings import (
    BASE_CONFIG,
    RESNETS_DEFAULTS,
    TASKS,
    Detectron2Error,
    c4_problem,
    config_dir,
    pixel_overrides,
    resnet_overrides,
    resnet_settings,
    training_command,
)
from moco.eval.export import export_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "moco" / "configs" / "detectron2"

# Keys of detectron2's config (detectron2/config/defaults.py) that the configs or the training
# command set. test_detectron2_knows_every_key checks this list against get_cfg() when
# detectron2 is installed.
DETECTRON2_KEYS = {
    "VERSION", "MODEL.META_ARCHITECTURE", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.WEIGHTS",
    "MODEL.MASK_ON", "MODEL.RPN.PRE_NMS_TOPK_TEST", "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.ROI_HEADS.NAME", "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.BACKBONE.FREEZE_AT",
    "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.STRIDE_IN_1X1", "MODEL.RESNETS.NORM",
    "MODEL.RESNETS.NUM_GROUPS", "MODEL.RESNETS.WIDTH_PER_GROUP",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "MODEL.RESNETS.RES2_OUT_CHANNELS", "INPUT.FORMAT",
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "DATASETS.TRAIN", "DATASETS.TEST",
    "TEST.PRECISE_BN.ENABLED", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.STEPS",
    "SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS", "OUTPUT_DIR",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def merged_config(task: str) -> dict[str, Any]:
    """The task's config over its base, flattened (``_BASE_`` resolved as detectron2 does)."""
    cfg = yaml.safe_load((CONFIGS / TASKS[task]).read_text())
    base_name = cfg.pop("_BASE_")
    assert base_name == BASE_CONFIG
    base = yaml.safe_load((CONFIGS / base_name).read_text())
    flat = _flatten(base)
    flat.update(_flatten(cfg))
    # detectron2 (yacs) reads "(480, 512)" strings as Python literals
    return {k: ast.literal_eval(v) if isinstance(v, str) and v.startswith("(") else v
            for k, v in flat.items()}


# ----- configs ------------------------------------------------------------------------------
def test_config_dir_is_found() -> None:
    assert config_dir() == CONFIGS
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([BASE_CONFIG, *TASKS.values()])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_configs_use_detectron2_keys_and_the_papers_settings(task: str) -> None:
    c = merged_config(task)
    assert set(c) <= DETECTRON2_KEYS, sorted(set(c) - DETECTRON2_KEYS)
    # The original release's detection settings (on top of detectron2's R-C4 defaults).
    assert c["MODEL.META_ARCHITECTURE"] == "GeneralizedRCNN"
    assert c["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"
    assert c["MODEL.BACKBONE.FREEZE_AT"] == 0
    assert c["MODEL.RESNETS.NORM"] == "naiveSyncBN"
    assert c["MODEL.RESNETS.STRIDE_IN_1X1"] is False and c["MODEL.RESNETS.DEPTH"] == 50
    assert c["INPUT.FORMAT"] == "RGB"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, x 255
    assert c["MODEL.PIXEL_MEAN"] == pytest.approx([255 * m for m in mean], abs=1e-3)
    assert c["MODEL.PIXEL_STD"] == pytest.approx([255 * s for s in std], abs=1e-3)
    assert c["TEST.PRECISE_BN.ENABLED"] is True
    assert (c["SOLVER.IMS_PER_BATCH"], c["SOLVER.BASE_LR"]) == (16, 0.02)
    assert (c["MODEL.RPN.PRE_NMS_TOPK_TEST"], c["MODEL.RPN.POST_NMS_TOPK_TEST"]) == (6000, 1000)
    assert c["INPUT.MIN_SIZE_TEST"] == 800
    schedule = {"voc": ((18000, 22000), 24000), "coco-1x": ((60000, 80000), 90000),
                "coco-2x": ((120000, 160000), 180000)}[task]
    assert (c["SOLVER.STEPS"], c["SOLVER.MAX_ITER"]) == schedule
    if task == "voc":
        assert c["MODEL.MASK_ON"] is False and c["MODEL.ROI_HEADS.NUM_CLASSES"] == 20
        assert c["DATASETS.TRAIN"] == ("voc_2007_trainval", "voc_2012_trainval")
        assert c["DATASETS.TEST"] == ("voc_2007_test",) and c["SOLVER.WARMUP_ITERS"] == 100
        assert c["INPUT.MIN_SIZE_TRAIN"] == tuple(range(480, 801, 32))
    else:
        assert c["MODEL.MASK_ON"] is True
        assert (c["DATASETS.TRAIN"], c["DATASETS.TEST"]) == (("coco_2017_train",), ("coco_2017_val",))
        assert c["INPUT.MIN_SIZE_TRAIN"] == tuple(range(640, 801, 32))


# ----- backbone settings and exported names -------------------------------------------------
def detectron2_resnet_layout(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of detectron2's bottleneck ResNet (stem + res2..res5) from its config,
    by the rules of build_resnet_backbone / BottleneckBlock: stem conv1 (7x7, 3 ->
    STEM_OUT_CHANNELS); per stage, bottleneck width NUM_GROUPS x WIDTH_PER_GROUP and output
    RES2_OUT_CHANNELS, both doubled after each stage; conv1 1x1, conv2 3x3 grouped, conv3 1x1;
    a 1x1 ``shortcut`` on a stage's first block when its input width differs; every conv
    followed by ``.norm`` (a BN)."""
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[s["MODEL.RESNETS.DEPTH"]]
    groups = s["MODEL.RESNETS.NUM_GROUPS"]
    width = groups * s["MODEL.RESNETS.WIDTH_PER_GROUP"]
    out = s["MODEL.RESNETS.RES2_OUT_CHANNELS"]
    layout: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int, g: int = 1) -> None:
        layout[f"{name}.weight"] = (c_out, c_in // g, k, k)
        for t in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.norm.{t}"] = (c_out,)
        layout[f"{name}.norm.num_batches_tracked"] = ()

    conv("stem.conv1", s["MODEL.RESNETS.STEM_OUT_CHANNELS"], 3, 7)
    c_in = s["MODEL.RESNETS.STEM_OUT_CHANNELS"]
    for i, n in enumerate(blocks):
        for b in range(n):
            p = f"res{i + 2}.{b}"
            if b == 0 and c_in != out:
                conv(f"{p}.shortcut", out, c_in, 1)
            conv(f"{p}.conv1", width, c_in if b == 0 else out, 1)
            conv(f"{p}.conv2", width, width, 3, groups)
            conv(f"{p}.conv3", out, width, 1)
        c_in, out, width = out, out * 2, width * 2
    return layout


def test_resnet_settings() -> None:
    assert resnet_settings("resnet50") == RESNETS_DEFAULTS and resnet_overrides("resnet50") == []
    w2 = resnet_settings("resnet50w2")
    assert (w2["MODEL.RESNETS.STEM_OUT_CHANNELS"], w2["MODEL.RESNETS.RES2_OUT_CHANNELS"],
            w2["MODEL.RESNETS.WIDTH_PER_GROUP"], w2["MODEL.RESNETS.DEPTH"]) == (128, 512, 128, 50)
    assert resnet_overrides("resnet50w4") == [
        "MODEL.RESNETS.WIDTH_PER_GROUP", "256", "MODEL.RESNETS.STEM_OUT_CHANNELS", "256",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "1024"]
    x = resnet_settings("resnext101_32x8d")
    assert (x["MODEL.RESNETS.DEPTH"], x["MODEL.RESNETS.NUM_GROUPS"],
            x["MODEL.RESNETS.WIDTH_PER_GROUP"]) == (101, 32, 8)
    wrn = resnet_settings("wide_resnet50_2")  # torchvision's: only the bottleneck is wider
    assert (wrn["MODEL.RESNETS.WIDTH_PER_GROUP"], wrn["MODEL.RESNETS.STEM_OUT_CHANNELS"],
            wrn["MODEL.RESNETS.RES2_OUT_CHANNELS"]) == (128, 64, 256)
    assert c4_problem("resnet50w2") is None
    assert "basic blocks" in (c4_problem("resnet18") or "")
    assert "RES2_OUT_CHANNELS 64" in (c4_problem("resnet18w2") or "")
    assert "CIFAR stem" in (c4_problem("resnet50", cifar_stem=True) or "")
    with pytest.raises(Detectron2Error, match="torchvision-style ResNets only"):
        resnet_settings("timm:resnet26d")


def _checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    """A checkpoint in the original layout (v1 head) with random weights of ``arch``."""
    torch.manual_seed(seed)
    net = build_backbone(arch).model
    net.fc = linear_head(net.fc.in_features, 128)
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 200, "arch": arch, "state_dict": state}, path)
    return path


@pytest.mark.parametrize("arch", ["resnet50", "resnet50w2", "resnext50_32x4d"])
def test_export_matches_detectron2_resnet_naming(arch: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt.pth.tar", arch)
    r = export_checkpoint(ckpt, "detectron2", tmp_path / "d2.pkl")
    assert r.warnings == []
    with (tmp_path / "d2.pkl").open("rb") as f:
        obj = pickle.load(f)
    got = {k: tuple(v.shape) for k, v in obj["model"].items() if not k.startswith("stem.fc")}
    want = detectron2_resnet_layout(resnet_settings(arch))
    assert got == want
    assert sorted(k for k in obj["model"] if k.startswith("stem.fc")) == ["stem.fc.bias",
                                                                          "stem.fc.weight"]


def test_training_command(tmp_path: Path) -> None:
    cfg = CONFIGS / TASKS["voc"]
    argv = training_command(cfg, "w.pkl", "resnet50")
    assert argv == ["python", "-m", "moco.detection.train_net", "--config-file", str(cfg),
                    "--num-gpus", "8", "MODEL.WEIGHTS", "w.pkl"]
    argv = training_command(cfg, "w.pkl", "resnet50w2", num_gpus=4, output_dir="out",
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert argv[5:] == ["--num-gpus", "4", "MODEL.WEIGHTS", "w.pkl",
                        "MODEL.RESNETS.WIDTH_PER_GROUP", "128", "MODEL.RESNETS.STEM_OUT_CHANNELS",
                        "128", "MODEL.RESNETS.RES2_OUT_CHANNELS", "512", "OUTPUT_DIR", "out"]
    assert pixel_overrides((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)) == [
        "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD", "[63.75, 63.75, 63.75]"]
    with pytest.raises(Detectron2Error, match="num-gpus"):
        training_command(cfg, "w.pkl", "resnet50", num_gpus=0)


def test_detectron2_config_command(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "checkpoint_0199.pth.tar", "resnet50w2")
    rc, out, _ = run_cli(["detectron2-config", str(ckpt), "--task", "coco-1x", "--num-gpus", "8"])
    assert rc == 0
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    weights = tmp_path / "checkpoint_0199_detectron2.pkl"
    assert lines[0] == f"moco export {ckpt} --format detectron2 --out {weights}"
    assert lines[1] == (
        f"python -m moco.detection.train_net --config-file {CONFIGS / TASKS['coco-1x']} "
        f"--num-gpus 8 MODEL.WEIGHTS {weights} MODEL.RESNETS.WIDTH_PER_GROUP 128 "
        "MODEL.RESNETS.STEM_OUT_CHANNELS 128 MODEL.RESNETS.RES2_OUT_CHANNELS 512")
    # Following the first printed line makes the weights; then only the training command is left.
    assert run_cli(lines[0].split()[1:])[0] == 0 and weights.is_file()
    rc, out, _ = run_cli(["detectron2-config", str(ckpt)])
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1 and TASKS["voc"] in lines[0]


def test_detectron2_config_refuses_what_c4_cannot_use(tmp_path: Path) -> None:
    r18 = _checkpoint(tmp_path / "r18.pth.tar", "resnet18")
    rc, _, err = run_cli(["detectron2-config", str(r18)])
    assert rc == 2 and "basic blocks" in err and "Traceback" not in err
    cifar = tmp_path / "cifar.pth.tar"
    save_original_checkpoint(cifar, "resnet50", cifar_stem=True, with_optimizer=False)
    rc, _, err = run_cli(["detectron2-config", str(cifar)])
    assert rc == 2 and "CIFAR stem" in err
    rc, _, err = run_cli(["detectron2-config", str(r18), "--config-dir", str(tmp_path)])
    assert rc == 2


# ----- with detectron2 ----------------------------------------------------------------------
def test_detectron2_knows_every_key() -> None:
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    cfg = get_cfg()
    flat = set(_flatten(dict(cfg)))
    assert flat >= DETECTRON2_KEYS, sorted(DETECTRON2_KEYS - flat)
    for k, v in RESNETS_DEFAULTS.items():
        node = cfg
        for part in k.split("."):
            node = node[part]
        assert node == v, k


@pytest.mark.parametrize("arch", ["resnet50", "resnet50w2"])
def test_export_loads_into_detectron2(arch: str, tmp_path: Path) -> None:
    """The configs merged by detectron2 itself, the C4 model built with the extra-norm head, and
    every exported tensor loaded into it (backbone res2-4 and the ROI head's res5)."""
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import moco.detection.roi_heads  # noqa: F401  (registers the head)

    ckpt = _checkpoint(tmp_path / "ckpt.pth.tar", arch, seed=1)
    export_checkpoint(ckpt, "detectron2", tmp_path / "w.pkl")
    argv = training_command(CONFIGS / TASKS["voc"], tmp_path / "w.pkl", arch)
    cfg = get_cfg()
    cfg.merge_from_file(argv[argv.index("--config-file") + 1])
    cfg.merge_from_list(argv[argv.index("MODEL.WEIGHTS"):] + ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"
    assert model.roi_heads.res5.norm.num_features == resnet_settings(arch)[
        "MODEL.RESNETS.RES2_OUT_CHANNELS"] * 8
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    state = model.state_dict()
    with (tmp_path / "w.pkl").open("rb") as f:
        exported = pickle.load(f)["model"]
    loaded = 0
    for k, v in exported.items():
        if k.startswith("stem.fc"):
            continue
        name = f"roi_heads.{k}" if k.startswith("res5.") else f"backbone.{k}"
        assert name in state, name
        assert np.array_equal(state[name].numpy(), v), name
        loaded += 1
    assert loaded == len(detectron2_resnet_layout(resnet_settings(arch)))


# ----- the --weights file of detectron2-config ------------------------------------------------
def test_detectron2_config_refuses_weights_that_are_not_an_export(tmp_path: Path) -> None:
    import torchvision

    ckpt = _checkpoint(tmp_path / "checkpoint_0199.pth.tar", "resnet50")
    tv = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet18().state_dict(), tv)
    legacy = tmp_path / "legacy.pkl"
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    text = tmp_path / "notes.pkl"
    text.write_text("not weights\n")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": {"conv.weight": np.zeros(2)}}))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Path("x")}}))
    for bad, why in ((ckpt, "torch.save zip"), (tv, "torch.save zip"),
                     (legacy, "legacy format"), (text, "not a pickle"),
                     (plain, "no detectron2 ResNet names"), (evil, "pathlib")):
        rc, out, err = run_cli(["detectron2-config", str(ckpt), "--weights", str(bad)])
        assert rc == 2 and out == "", bad
        line = err.strip().splitlines()[-1]
        assert f"--weights {bad} is not a detectron2 export" in line and why in line, line
        assert "moco export --format detectron2" in line and "Traceback" not in err


def test_detectron2_config_exports_again_when_the_checkpoint_is_newer(tmp_path: Path) -> None:
    import os

    ckpt = _checkpoint(tmp_path / "checkpoint_0199.pth.tar", "resnet50")
    weights = tmp_path / "w.pkl"
    export_checkpoint(ckpt, "detectron2", weights)
    rc, out, _ = run_cli(["detectron2-config", str(ckpt), "--weights", str(weights)])
    assert rc == 0 and [ln for ln in out.splitlines() if ln.startswith("moco export")] == []
    t = weights.stat().st_mtime
    os.utime(ckpt, (t + 10, t + 10))  # the run wrote the checkpoint again after the export
    rc, out, _ = run_cli(["detectron2-config", str(ckpt), "--weights", str(weights)])
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert rc == 0 and lines[0] == f"moco export {ckpt} --format detectron2 --out {weights}"
    assert "older than the checkpoint" in out
