"""MoCo v3 through the engine: the registered method ``mocov3`` built from a run's settings (no
Shuffling BN, zero-initialised ResNet blocks, ViT options), its summary line, the optimizers
and lr schedule it uses (LARS, AdamW, warmup-cosine, open to v1/v2 too), the presets against
the paper's recipes (MoCo v3 §5, Appendix A), the momentum of every step of a run, bf16 autocast
on the CPU, and two processes against one with the global batch."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_image_folder, spawn
from torch import nn

import moco
import moco.engine.loop as train_mod
from moco.core.backbones import strip_head
from moco.core.global_bn import GlobalBatchNorm, sync_batchnorm_for
from moco.core.mocov3 import MoCoV3
from moco.core.momentum import ConstantMomentum, CosineMomentum
from moco.core.optim import LARS
from moco.core.shuffle_bn import NoShuffle, SplitBatchNorm
from moco.data.batches import Batch
from moco.engine.build import Runtime, build_model, build_optimizer, describe_run, step_lr
from moco.engine.config import PRESETS, MocoConfig
from moco.engine.training_step import train_step
from moco.engine.world import resolve_for_world
from moco.utils.checkpoint import load_checkpoint
from moco.utils.distributed import DistContext, wrap_ddp

#: MoCo v3's recipes as the paper (§5, Appendix A) and the authors' CONFIG.md give them: the lr
#: is the base lr (x global batch / 256), warmed up linearly, then a half cosine per step.
PAPER = {
    "mocov3-r50": dict(
        arch="resnet50", optimizer="lars", lr=0.6, wd=1e-6, momentum=0.9, warmup_epochs=10,
        epochs=100, batch_size=4096, crop_min_scale=0.08, moco_t=1.0, moco_m=0.99,
        moco_m_cos=True, moco_dim=256, mlp_dim=4096, aug="v3", stop_grad_conv1=False),
    "mocov3-vit-small": dict(
        arch="vit_small", optimizer="adamw", lr=1.5e-4, wd=0.1, warmup_epochs=40, epochs=300,
        batch_size=4096, crop_min_scale=0.08, moco_t=0.2, moco_m=0.99, moco_m_cos=True,
        moco_dim=256, mlp_dim=4096, aug="v3", stop_grad_conv1=True, patch_size=16,
        image_size=224),
    "mocov3-vit-base": dict(
        arch="vit_base", optimizer="adamw", lr=1.5e-4, wd=0.1, warmup_epochs=40, epochs=300,
        batch_size=4096, crop_min_scale=0.08, moco_t=0.2, moco_m=0.99, moco_m_cos=True,
        moco_dim=256, mlp_dim=4096, aug="v3", stop_grad_conv1=True, patch_size=16,
        image_size=224),
}
SCALED_LR = {"mocov3-r50": 0.6 * 16, "mocov3-vit-small": 1.5e-4 * 16, "mocov3-vit-base": 1.5e-4 * 16}


def tiny(**more: Any) -> MocoConfig:
    """A ResNet-18 MoCo v3 run at 32 px with small heads."""
    values = dict(mechanism="mocov3", arch="resnet18", cifar_stem=True, image_size=32,
                  batch_size=8, moco_dim=16, mlp_dim=32, moco_t=0.2, moco_m=0.99,
                  moco_m_cos=True, channels_last=False, workers=0, knn_k=5)
    return MocoConfig(**{**values, **more})


def runtime(world: int = 1) -> Runtime:
    dist = DistContext(rank=0, world_size=world, backend="gloo" if world > 1 else "")
    return Runtime(torch.device("cpu"), dist, "none", None, 0, "test")


# ----- presets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_presets_are_the_papers_recipes(name: str) -> None:
    cfg = MocoConfig(preset=name)
    cfg.validate()
    assert (cfg.mechanism, cfg.lr_scale, cfg.lr_schedule) == ("mocov3", "linear", "warmup-cosine")
    for key, want in PAPER[name].items():
        assert getattr(cfg, key) == want, key
    assert cfg.effective_lr == pytest.approx(SCALED_LR[name])
    assert cfg.precision == "auto"  # bf16 autocast on a GPU, fp32 on the CPU
    assert not cfg.symmetric and not cfg.mlp  # v3's loss is always symmetric, its heads MLPs


def test_the_cifar_preset_builds_a_vit_tiny_of_4_px_patches() -> None:
    pytest.importorskip("timm")
    cfg = MocoConfig(preset="cifar10-mocov3-vit")
    cfg.validate()
    assert (cfg.arch, cfg.patch_size, cfg.image_size, cfg.aug) == ("vit_tiny", 4, 32, "cifar-v3")
    assert (cfg.optimizer, cfg.moco_t, cfg.moco_m_cos, cfg.stop_grad_conv1) == ("adamw", 0.2, True, True)
    with torch.device("meta"):
        model = build_model(cfg, torch.device("meta"))
    assert tuple(model.base_encoder.pos_embed.shape) == (1, 1 + 8 * 8, 192)
    assert not model.base_encoder.patch_embed.proj.weight.requires_grad


@pytest.mark.parametrize(("mechanism", "setting", "zeroed"), [
    ("mocov3", "auto", True), ("mocov3", "false", False), ("moco", "auto", False),
    ("moco", "true", True)])
def test_zero_init_residual_is_the_methods_choice_unless_set(
        mechanism: str, setting: str, zeroed: bool) -> None:
    """MoCo v3 builds its ResNets with the residual blocks' last BN at 0, v1/v2 do not;
    ``--zero-init-residual true|false`` overrides either (the demo's control pilot)."""
    cfg = MocoConfig(arch="resnet18", mechanism=mechanism, zero_init_residual=setting,
                     moco_k=256, moco_dim=16, mlp_dim=32)
    cfg.validate()
    model = build_model(cfg, torch.device("cpu"))
    encoder = model.encoder_q if mechanism == "moco" else model.base_encoder
    last_bns = [block.bn2.weight for layer in (encoder.layer1, encoder.layer4) for block in layer]
    assert all(bool((w == 0).all()) == zeroed for w in last_bns)
    assert bool((encoder.bn1.weight == 0).any()) is False  # the stem's BN is never zeroed


def test_pretrain_help_lists_the_methods_presets_and_optimizers(
        capsys: pytest.CaptureFixture[str]) -> None:
    from moco.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "{moco,end-to-end,memory-bank,mocov3}" in text
    for name in PRESETS:
        assert name in text, name
    for flag in ("--mlp-dim", "--moco-m-cos", "--patch-size", "--stop-grad-conv1"):
        assert flag in text, flag
    assert "{sgd,lars,adamw}" in text and "warmup-cosine" in text


# ----- the method in the engine --------------------------------------------------------------------
def test_the_summary_line_says_batch_negatives_and_the_lr_rule() -> None:
    cfg = MocoConfig(preset="mocov3-r50", data="d", output="o")
    line = describe_run(cfg, runtime(), 1000)
    assert line.startswith("MoCo v3 pretraining: resnet50,")
    assert "lr 9.6 = base 0.6 x 4096 / 256, lars, warmup-cosine, 10 warmup epochs," in line
    assert "batch negatives, all-gathered (4095 per query" in line
    assert "m 0.99 -> 1 (cosine)" in line and "BN over the global batch," in line
    assert "shuffle-BN" not in line and "K 65536" not in line
    assert "(synchronised over 2 processes)" in describe_run(cfg, runtime(2), 1000)
    v2 = describe_run(MocoConfig(preset="mocov2", data="d", output="o"), runtime(), 1000)
    assert "lr 0.03, K 65536, m 0.999, T 0.2, MLP head" in v2


def test_no_shuffling_bn_whatever_the_process_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moco.engine.world.check_same_settings", lambda ctx, settings, per_rank: None)
    cfg = tiny(batch_size=12, bn_splits=8)  # 12 does not split in 8: not asked for
    for world in (1, 2):
        assert resolve_for_world(cfg, DistContext(world_size=world), torch.device("cpu")) == "none"
    model = build_model(cfg, torch.device("cpu"))
    assert not any(isinstance(m, SplitBatchNorm) for m in model.modules())
    with pytest.raises(moco.ConfigError, match="MoCo v3 has no Shuffling BN"):
        tiny(shuffle_bn="split").validate()


def test_the_model_of_a_run() -> None:
    cfg = tiny()
    model = build_model(cfg, torch.device("cpu"))
    assert isinstance(model, MoCoV3) and isinstance(model.momentum_schedule, CosineMomentum)
    assert model.evaluation_encoder() is model.base_encoder
    blocks = [m for m in model.base_encoder.modules() if hasattr(m, "bn2")]
    assert blocks and all(not b.bn2.weight.detach().any() for b in blocks)  # zero_init_residual
    again = build_model(cfg, torch.device("cpu"))  # seeded: heads included
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = build_model(tiny(seed=1), torch.device("cpu"))
    assert not torch.equal(other.predictor[0].weight, model.predictor[0].weight)
    const = build_model(tiny(moco_m_cos=False), torch.device("cpu"))
    assert isinstance(const.momentum_schedule, ConstantMomentum)


def test_moco_m_cos_gives_moco_v2_the_cosine_momentum_too() -> None:
    cfg = MocoConfig(arch="resnet18", cifar_stem=True, image_size=32, batch_size=8, moco_k=32,
                     moco_dim=16, moco_m_cos=True, bn_splits=2)
    model = build_model(cfg, torch.device("cpu"))
    model.set_progress(1.0, 2)
    assert model.m == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 2)) * 0.001)


def test_a_vit_run_freezes_the_patch_projection_and_evaluates_the_cls_token() -> None:
    pytest.importorskip("timm")
    cfg = tiny(arch="vit_tiny", cifar_stem=False, patch_size=8, stop_grad_conv1=True,
               optimizer="adamw")
    model = build_model(cfg, torch.device("cpu"))
    vit = model.base_encoder
    assert sum(isinstance(m, nn.Linear) for m in vit.head) == 3  # the ViT projector
    optimizer = build_optimizer(cfg, model)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(vit.patch_embed.proj.weight) not in trained and id(vit.pos_embed) not in trained
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # what the kNN monitor extracts: the [CLS] token after the final norm
        torch.testing.assert_close(strip_head(vit.eval())(x), vit.forward_features(x)[:, 0])


# ----- optimizers and schedules --------------------------------------------------------------------
def test_lars_and_adamw_are_built_over_the_trainable_parameters() -> None:
    model = build_model(tiny(), torch.device("cpu"))
    lars = build_optimizer(tiny(optimizer="lars", lr=0.6, lr_scale="linear", wd=1e-6), model)
    assert isinstance(lars, LARS)
    assert lars.defaults["lr"] == pytest.approx(0.6 * 8 / 256)
    assert (lars.defaults["weight_decay"], lars.defaults["momentum"]) == (1e-6, 0.9)
    adamw = build_optimizer(tiny(optimizer="adamw", wd=0.1, lr=1e-3), model)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.1
    want = {id(p) for p in model.trained_parameters()}
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == want
    v2 = MocoConfig(arch="resnet18", moco_k=32, moco_dim=16, batch_size=8, optimizer="lars",
                    mlp=True)
    assert isinstance(build_optimizer(v2, build_model(v2, torch.device("cpu"))), LARS)


def test_warmup_cosine_is_set_every_step() -> None:
    cfg = tiny(lr=0.6, lr_scale="linear", batch_size=512, epochs=10, warmup_epochs=2,
               lr_schedule="warmup-cosine")
    lr = 0.6 * 2
    assert step_lr(cfg, 0, 0, 4) == 0.0
    assert step_lr(cfg, 1, 2, 4) == pytest.approx(lr * 1.5 / 2)
    assert step_lr(cfg, 2, 0, 4) == pytest.approx(lr)
    assert step_lr(cfg, 6, 0, 4) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert step_lr(cfg, 9, 3, 4) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 7.75 / 8)))
    v1 = MocoConfig(lr=0.03, epochs=10, warmup_epochs=0, lr_schedule="warmup-cosine")
    assert step_lr(v1, 5, 0, 4) == pytest.approx(0.015)  # open to MoCo v1/v2 too


# ----- a run ---------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_a_run_sets_the_cosine_momentum_before_every_step_and_saves_the_authors_layout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "data")
    seen: list[float] = []
    real = train_mod.train_step

    def step(model: Any, *a: Any, **k: Any) -> Any:
        seen.append(model.m)
        return real(model, *a, **k)

    monkeypatch.setattr(train_mod, "train_step", step)
    cfg = tiny(data=str(data), output=str(tmp_path / "run"), epochs=2, knn_every=2,
               optimizer="lars", lr=0.6, lr_scale="linear", warmup_epochs=1,
               lr_schedule="warmup-cosine")
    logs: list[str] = []
    result = moco.pretrain(cfg, log=logs.append)
    want = [1 - 0.5 * (1 + math.cos(math.pi * (e + s / 4) / 2)) * 0.01
            for e in range(2) for s in range(4)]  # 32 images, batch 8: 4 steps an epoch
    assert seen == pytest.approx(want, rel=0, abs=1e-15)
    assert logs[0].startswith("MoCo v3 pretraining: resnet18 (CIFAR stem),")
    ckpt = load_checkpoint(result.checkpoint)
    assert {k.split(".")[1] for k in ckpt["state_dict"]} == {
        "base_encoder", "momentum_encoder", "predictor"}
    assert ckpt["moco"]["config"]["mechanism"] == "mocov3"
    assert result.history[-1]["knn_top1"] is not None and result.history[-1]["acc1"] is not None


def test_a_step_under_bf16_autocast_on_the_cpu() -> None:
    model = build_model(tiny(image_size=16), torch.device("cpu")).train()
    optimizer = build_optimizer(tiny(optimizer="lars"), model)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g),
                  torch.arange(8))
    r = train_step(model, optimizer, batch, NoShuffle(), torch.bfloat16)
    assert r.loss.dtype == torch.float32 and bool(torch.isfinite(r.loss))
    assert r.acc1 is not None and 0 <= float(r.acc1) <= 100
    assert all(p.grad is not None and bool(p.grad.isfinite().all())
               for p in model.trained_parameters())


# ----- two processes = one process with the global batch -------------------------------------------
STEPS, PER_RANK = 3, 4


def _views() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(2 * PER_RANK, 3, 16, 16, generator=g, dtype=torch.float64),
             torch.randn(2 * PER_RANK, 3, 16, 16, generator=g, dtype=torch.float64))
            for _ in range(STEPS)]


def _train(ctx: DistContext | None) -> dict[str, torch.Tensor]:
    """The engine's pieces (build_model, build_optimizer, BN synchronised before DDP, the
    training step) for STEPS steps, in float64 (float32's rounding differences grow through
    the steps); each process takes its slice of every global batch."""
    cfg = tiny(image_size=16, batch_size=2 * PER_RANK, optimizer="lars", lr=0.5)
    model = build_model(cfg, torch.device("cpu")).double()
    optimizer = build_optimizer(cfg, model)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    if ctx is not None:
        sync_batchnorm_for(model, "cpu")
        assert any(isinstance(m, GlobalBatchNorm) for m in model.modules())
    step_model = wrap_ddp(model, ctx, torch.device("cpu")) if ctx is not None else model
    n = 2 * PER_RANK // world
    for i, (x1, x2) in enumerate(_views()):
        model.set_progress(i / STEPS, 1)
        mine = slice(rank * n, (rank + 1) * n)
        train_step(step_model, optimizer, Batch(x1[mine], x2[mine], torch.arange(n)),
                   NoShuffle(), None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(ctx: DistContext) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return _train(ctx)


def test_two_processes_with_n_images_each_equal_one_with_2n(tmp_path: Path) -> None:
    """BatchNorm over the global batch (synchronised), keys all-gathered, DDP's averaged
    gradients: after 3 LARS steps the weights, running statistics and momentum encoder of
    2 processes x 4 images are those of 1 process x 8 images, within float64 rounding."""
    torch.set_num_threads(1)
    two = spawn(_worker, tmp_path)
    one = _train(None)
    for k, v in one.items():
        assert torch.equal(two[0][k], two[1][k]), k  # the ranks agree exactly
        if v.is_floating_point():
            torch.testing.assert_close(two[0][k], v, rtol=1e-10, atol=1e-12, msg=k)
        else:
            assert torch.equal(two[0][k], v), k


# ----- CUDA (the cuda tier) ------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda tier)")


@pytest.mark.cuda
@needs_cuda
def test_a_vit_run_on_cuda_under_auto_precision(tmp_path: Path) -> None:
    """A ViT-Ti/8 MoCo v3 run on the GPU (bf16 autocast where the GPU has it, channels_last,
    the batched augmentation on the device) trains, and its checkpoint loads on the CPU."""
    pytest.importorskip("timm")
    data = make_image_folder(tmp_path / "data")
    cfg = tiny(data=str(data), output=str(tmp_path / "run"), arch="vit_tiny", cifar_stem=False,
               patch_size=8, stop_grad_conv1=True, optimizer="adamw", lr=1.5e-4,
               lr_scale="linear", lr_schedule="warmup-cosine", warmup_epochs=1, epochs=2,
               batch_size=16, device="cuda", precision="auto", channels_last="auto")
    logs: list[str] = []
    result = moco.pretrain(cfg, log=logs.append)
    assert "device cuda" in logs[0] and math.isfinite(result.history[-1]["loss"])
    model, info = moco.load_backbone(result.checkpoint, device="cpu")
    assert info.feature_dim == 192 and model(torch.randn(2, 3, 32, 32)).shape == (2, 192)
