"""What the tests share: tiny image folders built in a temporary folder, the small model's
flags, the ``moco`` command run in-process, full-disk simulations, and checkpoints built by
hand in the layouts of the original code (``moco/builder.py``, ``main_moco.py``, the CIFAR-10
notebook, ``main_lincls.py``, the detectron2 conversion script) without going through ``moco``:
torchvision encoders, the builder's head surgery, the DDP ``module.`` prefix, the queue buffers
and an SGD state over f_q + f_k in one group."""

from __future__ import annotations

import contextlib
import copy
import errno
import http.server
import io
import json
import math
import os
import pickle
import signal
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import moco.engine.loop as train_mod
from moco.cli import build_parser, main
from moco.cli.pretrain import config_from_args
from moco.data.cifar_download import CIFAR10_FILES, CIFAR10_FOLDER
from moco.data.crop_loader import CropTrainLoader, FileReader, Meta
from moco.data.folders import image_folder
from moco.data.input_plan import source_headers
from moco.data.input_settings import InputSettings
from moco.engine.config import MocoConfig
from moco.engine.loop import Pretrainer
from moco.engine.run_state import PretrainResult
from moco.engine.rundir import newest_checkpoint
from moco.engine.training_step import StepResult
from moco.utils.checkpoint import load_checkpoint
from moco.utils.distributed import init_distributed, shutdown_distributed


def make_image_folder(root: Path, classes: int = 2, per_class: int = 16, size: int = 32,
                      splits: tuple[str, ...] = ("train", "test"), seed: int = 0) -> Path:
    """DATA/{train,test}/class_i/NNN.png with class-dependent colours plus noise."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, size=3)
            for i in range(per_class):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                arr = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


# Settings for a tiny, fast pretraining run on ``tiny_data``.
TINY_FLAGS = ["-a", "resnet18", "--image-size", "32", "-b", "8", "--moco-k", "32",
              "--bn-splits", "2", "--epochs", "2", "--workers", "0", "--no-progress",
              "--knn-k", "5", "--channels-last", "false"]


def fill_disk_after(f: Any, nbytes: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the writes of the open file ``f`` fail with ENOSPC once ``nbytes`` are written, as
    on a disk that fills up mid-write; returns ``f``."""
    left = {"n": nbytes}
    real_write = f.write

    def write(b: Any) -> int:
        if len(b) > left["n"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        left["n"] -= len(b)
        return int(real_write(b))

    monkeypatch.setattr(f, "write", write, raising=False)
    return f


def full_disk_for_exports(monkeypatch: pytest.MonkeyPatch, after_bytes: int) -> None:
    """A full disk for the files that the exports and embeddings write: the one atomic write's
    files (``moco.utils.atomic``) fail after ``after_bytes`` (``fill_disk_after``), and
    ``safetensors.torch.save_file``, which writes from Rust, fails as it does on a full disk
    (measured on a 1 MB tmpfs: SafetensorError, no file left)."""
    import safetensors.torch
    from safetensors import SafetensorError

    import moco.utils.atomic as atomic_mod

    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic_mod.os, "fdopen", lambda *a, **k: fill_disk_after(
        real_fdopen(*a, **k), after_bytes, monkeypatch))

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``moco ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# ----- checkpoints in the original layouts ----------------------------------------------------
def original_encoder(arch: str = "resnet18", dim: int = 128, mlp: bool = False,
                     cifar_stem: bool = False, seed: int = 0) -> nn.Module:
    """``models.<arch>(num_classes=dim)``, with ``fc`` -> Sequential(Linear(d,d), ReLU, fc)
    for ``--mlp`` (moco/builder.py); the demo's stem for ``cifar_stem``."""
    torch.manual_seed(seed)
    enc = getattr(torchvision.models, arch)(num_classes=dim)
    if mlp:
        d = enc.fc.weight.shape[1]
        enc.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), enc.fc)
    if cifar_stem:
        enc.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        enc.maxpool = nn.Identity()
    # Make BN statistics non-trivial so that exact-equality checks mean something.
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.9, 1.1)
            m.num_batches_tracked.fill_(7)
    return enc


def original_state_dict(encoder_q: nn.Module, k: int = 32, dim: int = 128,
                        with_encoder_k: bool = True) -> dict[str, torch.Tensor]:
    """The DDP-wrapped MoCo's state dict: ``module.queue``, ``module.queue_ptr``, then
    ``module.encoder_q.*`` and ``module.encoder_k.*`` (REFERENCE.md §7)."""
    state: dict[str, torch.Tensor] = {
        "module.queue": F.normalize(torch.randn(dim, k), dim=0),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    state.update({f"module.encoder_q.{n}": v.clone() for n, v in encoder_q.state_dict().items()})
    if with_encoder_k:
        enc_k = copy.deepcopy(encoder_q)
        state.update({f"module.encoder_k.{n}": v.clone() for n, v in enc_k.state_dict().items()})
    return state


def original_optimizer_state(encoder_q: nn.Module) -> dict[str, Any]:
    """``SGD(model.parameters())`` of the original after one step: one group listing f_q's
    then f_k's parameters, momentum buffers only for f_q."""
    enc_k = copy.deepcopy(encoder_q)
    for p in enc_k.parameters():
        p.requires_grad = False
    params = list(encoder_q.parameters()) + list(enc_k.parameters())
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)
    for p in encoder_q.parameters():
        p.grad = torch.full_like(p, 1e-3)
    saved = [p.detach().clone() for p in encoder_q.parameters()]
    opt.step()
    with torch.no_grad():  # keep the weights the state dict was taken from
        for p, s in zip(encoder_q.parameters(), saved, strict=True):
            p.copy_(s)
    return opt.state_dict()


def save_original_checkpoint(path: Path, arch: str = "resnet18", *, dim: int = 128, k: int = 32,
                             mlp: bool = False, cifar_stem: bool = False, epoch: int = 1,
                             with_optimizer: bool = True, with_arch: bool = True,
                             seed: int = 0) -> nn.Module:
    """Write a ``main_moco.py`` checkpoint; returns the query encoder it holds."""
    enc = original_encoder(arch, dim, mlp, cifar_stem, seed)
    ckpt: dict[str, Any] = {"epoch": epoch}
    if with_arch:
        ckpt["arch"] = arch
    ckpt["state_dict"] = original_state_dict(enc, k, dim)
    if with_optimizer:
        ckpt["optimizer"] = original_optimizer_state(enc)
    torch.save(ckpt, path)
    return enc


def demo_state_dict(encoder_q: nn.Module, k: int = 32, dim: int = 128) -> dict[str, torch.Tensor]:
    """The CIFAR notebook's ModelBase layout: ``encoder_q.net.N`` (no ``module.``),
    ``queue``, ``queue_ptr`` (REFERENCE.md §6.2). ``encoder_q`` must have the CIFAR stem."""
    names = {"conv1": "0", "bn1": "1", "layer1": "3", "layer2": "4", "layer3": "5",
             "layer4": "6", "fc": "9"}
    out: dict[str, torch.Tensor] = {}
    for enc in ("encoder_q", "encoder_k"):
        for n, v in encoder_q.state_dict().items():
            head, rest = n.split(".", 1)
            out[f"{enc}.net.{names[head]}.{rest}"] = v.clone()
    out["queue"] = F.normalize(torch.randn(dim, k), dim=0)
    out["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return out


def original_lincls_load(state_dict: dict[str, torch.Tensor], arch: str) -> tuple[nn.Module, Any]:
    """``main_lincls.py``'s loading logic, verbatim (REFERENCE.md §8.2)."""
    model = getattr(torchvision.models, arch)()
    state_dict = dict(state_dict)
    for k in list(state_dict.keys()):
        # retain only encoder_q up to before the embedding layer
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            # remove prefix
            state_dict[k[len("module.encoder_q."):]] = state_dict[k]
        # delete renamed or unused k
        del state_dict[k]
    msg = model.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    return model, msg


def original_convert_to_detectron2(obj: dict[str, Any]) -> dict[str, Any]:
    """``detection/convert-pretrain-to-detectron2.py``, verbatim (REFERENCE.md §9.1)."""
    obj = obj["state_dict"]
    newmodel = {}
    for k, v in obj.items():
        if not k.startswith("module.encoder_q."):
            continue
        old_k = k
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        del old_k
        newmodel[k] = v.numpy()
    return {"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}


# ----- checkpoints in MoCo v3's layout (main_moco.py of v3: base, momentum encoder, predictor) ---
def mocov3_mlp(num_layers: int, in_dim: int, hidden: int, out: int, last_bn: bool = True
               ) -> nn.Sequential:
    """MoCo v3 §4's MLP: every Linear without bias, BN1d + ReLU between layers, a BN1d without
    affine after the last one when ``last_bn``."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1 = in_dim if i == 0 else hidden
        d2 = out if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


def _randomise_norms(net: nn.Module) -> None:
    """Non-trivial BN statistics and LayerNorm weights, so that equality checks mean something."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.9, 1.1)
        if isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)


def mocov3_resnet(arch: str = "resnet50", hidden: int = 4096, dim: int = 256,
                  seed: int = 0) -> nn.Module:
    """v3's base encoder for a ResNet: ``torchvision.models.<arch>(zero_init_residual=True)``
    whose ``fc`` is the 2-layer projector (``fc.0`` [hidden, D], ``fc.1`` BN, ``fc.3``
    [dim, hidden], ``fc.4`` BN without affine)."""
    torch.manual_seed(seed)
    enc = getattr(torchvision.models, arch)(zero_init_residual=True)
    enc.fc = mocov3_mlp(2, enc.fc.in_features, hidden, dim)
    _randomise_norms(enc)
    return enc


def mocov3_vit(embed_dim: int = 384, depth: int = 12, num_heads: int = 12, patch: int = 16,
               img: int = 224, hidden: int = 4096, dim: int = 256, seed: int = 0) -> nn.Module:
    """v3's base encoder for a ViT (``vits.py``): timm's VisionTransformer (qkv bias, LayerNorm
    eps 1e-6, MLP ratio 4; ViT-S: 384-d, 12 blocks, 12 heads) whose ``head`` is the 3-layer
    projector."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=img, patch_size=patch, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, mlp_ratio=4, qkv_bias=True, num_classes=0)
    enc.head = mocov3_mlp(3, embed_dim, hidden, dim)
    with torch.no_grad():
        enc.cls_token.normal_(std=0.02)
    _randomise_norms(enc)
    return enc


def _stride0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each float tensor as one random value expanded to its shape: the keys, shapes and dtypes
    of the full-size models in a file of a few kB."""
    return {k: torch.randn((), dtype=v.dtype).expand(v.shape) if v.is_floating_point() else v
            for k, v in state.items()}


def save_mocov3_checkpoint(path: Path, encoder: nn.Module, arch: str | None, *,
                           vit: bool = False, hidden: int = 4096, dim: int = 256,
                           epoch: int = 100, shapes_only: bool = False) -> None:
    """Write a checkpoint of ``main_moco.py`` of MoCo v3 around the base encoder ``encoder``:
    ``epoch``, ``arch``, ``state_dict`` (``module.base_encoder.*``,
    ``module.momentum_encoder.*`` (a copy), ``module.predictor.*`` (2 layers, last BN for
    ViTs only)), ``optimizer``, ``scaler``. ``shapes_only``: every tensor stride-0."""
    base = encoder.state_dict()
    predictor = mocov3_mlp(2, dim, hidden, dim, last_bn=vit).state_dict()
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state.update({f"module.momentum_encoder.{k}": v.clone() for k, v in base.items()})
    state.update({f"module.predictor.{k}": v for k, v in predictor.items()})
    if shapes_only:
        state = _stride0(state)
    ckpt: dict[str, Any] = {"epoch": epoch, "state_dict": state,
                            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]},
                            "scaler": {"scale": 65536.0, "growth_factor": 2.0}}
    if arch is not None:
        ckpt["arch"] = arch
    torch.save(ckpt, path)


# ----- shared by the tests of e2e/test_resume.py and others ------------------------------------------
TIMING_KEYS = {"seconds", "images_per_s"}


_real_step = train_mod.train_step


def make_cfg(data: Path, out: Path, *extra: str) -> MocoConfig:
    args = build_parser().parse_args(["pretrain", str(data), *TINY_FLAGS, "--output", str(out),
                                      *extra])
    return config_from_args(args)


def train(cfg: MocoConfig, overwrite: bool = False) -> PretrainResult:
    return Pretrainer(cfg, log=lambda _m: None, progress=False, overwrite=overwrite).run()


def sigterm_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Deliver a real SIGTERM to this process right after the ``steps``-th training step."""
    real = train_mod.train_step
    count = {"n": 0}

    def step(*a: Any, **k: Any) -> StepResult:
        r = real(*a, **k)
        count["n"] += 1
        if count["n"] == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return r

    monkeypatch.setattr(train_mod, "train_step", step)


def final_state(run_dir: Path) -> dict[str, Any]:
    ckpt = newest_checkpoint(run_dir)
    assert ckpt is not None
    return load_checkpoint(ckpt)


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Recursively equal, tensors bit for bit (dtype, shape and every bit of every value)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_final_state(ref: dict[str, Any], got: dict[str, Any]) -> None:
    assert ref["epoch"] == got["epoch"]
    assert_same_tensors(ref["state_dict"], got["state_dict"], "state_dict")
    assert_same_tensors(ref["optimizer"]["state"], got["optimizer"]["state"], "optimizer")
    mine, theirs = ref["moco"], got["moco"]
    for key in ("epoch_step", "global_step", "shuffle_rng", "knn_random_init", "bad_images"):
        assert_same_tensors(mine[key], theirs[key], key)
    for key in ("loss_sum", "acc_sum"):
        assert mine["partial"][key] == theirs["partial"][key]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# ----- shared by the tests of cli/test_bad_input.py and others ---------------------------------------
def write_broken(folder: Path) -> list[Path]:
    """A truncated PNG, a truncated JPEG and a text file named like an image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png, jpg, fake = folder / "trunc.png", folder / "trunc.jpg", folder / "notes.jpg"
    Image.fromarray(arr).save(png)
    png.write_bytes(png.read_bytes()[:300])
    Image.fromarray(arr).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:400])
    fake.write_text("these are not pixels")
    return [png, jpg, fake]


def _mode_image(mode: str, path: Path) -> Path:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 2**20, (16, 16)).astype(np.int32), "I")
    elif mode == "F":
        img = Image.fromarray(rng.random((16, 16)).astype(np.float32) * 255, "F")
    elif mode == "P+transparency":
        img = Image.new("P", (16, 16))
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        img.info["transparency"] = 0
    else:
        img = Image.new("RGB", (16, 16), (10, 200, 30)).convert(mode)
    suffix = {"CMYK": ".jpg", "I": ".tif", "F": ".tif"}.get(mode, ".png")
    out = path.with_suffix(suffix)
    img.save(out, **({"transparency": 0} if mode == "P+transparency" else {}))
    return out


# ----- shared by the tests of data/test_batch_augment.py and others ----------------------------------
N = 20000  # draws per distribution


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# critical value of the two-sample KS test at alpha = 1e-4 for N vs N draws (conservative
# for the discrete crop sizes); the tests use fixed seeds, so they are deterministic
KS_CRIT = math.sqrt(-0.5 * math.log(1e-4 / 2)) * math.sqrt(2 / N)


# ----- shared by the tests of data/test_crop_loader.py and others ------------------------------------
def jpegs(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for k, (h, w) in enumerate(sizes):
        d = root / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
        arr = np.clip(arr + rng.normal(0, 10, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{k:03d}.jpg", quality=92)
        out.append(d / f"{k:03d}.jpg")
    return out


def cfg_for(**kw: object) -> InputSettings:
    """The input settings of a small test run (checked as a pretraining config's)."""
    base: dict[str, object] = {"batch_size": 4, "image_size": 24, "aug": "v2", "seed": 3,
                               "channels_last": False}
    base.update(kw)
    return MocoConfig(**base).input_settings()  # type: ignore[arg-type]


def loader_for(folder: Path, cfg: InputSettings, workers: int = 0, rank: int = 0, world: int = 1,
               device_decode: bool = False, reduce: bool = True) -> CropTrainLoader:
    src = image_folder(folder)
    h = source_headers(src, 1)
    loader = CropTrainLoader(cfg, FileReader(src.files or []), Meta(h[:, 0], h[:, 1], h[:, 2]),
                             torch.device("cpu"), workers, rank, world,
                             torch.device("cpu") if device_decode else None)
    loader.work.reduce = reduce
    return loader


# ----- shared by the tests of engine/test_distributed.py and others ----------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, out: str, timeout_min: float,
           fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed(torch.device("cpu"), timeout_minutes=timeout_min)
    try:
        result = fn(ctx, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        shutdown_distributed()


def spawn(fn: Callable[..., Any], tmp: Path, *args: Any, world: int = WORLD,
          timeout_min: float = 1.0, wait_s: float = 120.0) -> list[Any]:
    """Run ``fn(ctx, *args)`` in ``world`` fresh processes; return their results in rank order.
    Fails if any process fails or is still running after ``wait_s``."""
    mpc = mp.get_context("spawn")
    port = _free_port()
    procs = [mpc.Process(target=_entry, args=(r, world, port, str(tmp), timeout_min, fn, args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "a worker hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----- a local HTTP server for download tests (nothing reaches the internet) -------------------
@dataclass
class Served:
    """What the server holds and how it misbehaves; tests change it between requests."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True  # honour "Range: bytes=N-" (206); False: always the whole file (200)
    # path -> byte counts at which successive requests for it are cut (the connection is
    # closed after that many body bytes, the announced Content-Length unchanged)
    cut: dict[str, list[int]] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)


class _Handler(http.server.BaseHTTPRequestHandler):
    served: Served

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        s = self.served
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        s.requests.append((path, rng))
        body = s.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and s.ranges and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
            if start >= len(body):
                self.send_error(416, "Requested Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cuts = s.cut.get(path)
        stop = start + cuts.pop(0) if cuts else len(body)
        self.wfile.write(body[start:stop])
        self.wfile.flush()
        self.close_connection = True


class LocalServer:
    """``with LocalServer() as srv: srv.served.files["/a.bin"] = b"..."; srv.url("/a.bin")``."""

    def __init__(self) -> None:
        self.served = Served()
        handler = type("Handler", (_Handler,), {"served": self.served})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def closed_port_url(path: str = "/file.bin") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused: the offline case)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


# ----- CIFAR-10's python-version archive, small -------------------------------------------------
def _batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({"batch_label": "b", "labels": [int(x) for x in rng.integers(0, 10, n)],
                         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "filenames": [f"{i}.png" for i in range(n)]}, protocol=2)


def small_cifar_archive(per_batch: int = 4, drop: str = "") -> bytes:
    """cifar-10-python.tar.gz in the official layout, ``per_batch`` images per batch file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for i, name in enumerate(CIFAR10_FILES):
            if name == drop:
                continue
            data = (pickle.dumps({"label_names": [f"c{j}" for j in range(10)]}, protocol=2)
                    if name == "batches.meta" else _batch(per_batch, i))
            info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
