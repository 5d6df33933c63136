"""MoCo v3 (moco.core.mocov3): one step against a naive float64 implementation written from
the paper (MoCo v3 Algorithm 1 and §4): the loss, the gradient of every trained parameter and
the momentum encoder after the step, on one process and on two (each with half of the
batch, their BatchNorm synchronised); the heads, the momentum schedule, the accuracy layout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import spawn
from torch import nn

from moco.core.global_bn import convert_global_bn
from moco.core.heads import build_mlp
from moco.core.loss import pretext_accuracy
from moco.core.mocov3 import (
    RESNET_HEADS,
    VIT_HEADS,
    HeadSpec,
    MoCoV3,
    MoCoV3Config,
    build_mocov3,
    contrastive_loss,
    momentum_at,
    positive_first,
)

EPS = 1e-5  # BatchNorm's
C, HIDDEN = 8, 16  # the MLPs' output and hidden widths in the tiny model


# ----- a tiny model and its naive float64 twin ----------------------------------------------------
class Tiny(nn.Module):
    """conv 3->4, BN, ReLU, global mean, then the projector ``fc``."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = build_mlp(spec.projector_layers, 4, HIDDEN, C, spec.projector_last_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3)))


def tiny_mocov3(spec: HeadSpec, t: float, m: float) -> MoCoV3:
    torch.manual_seed(0)
    model = MoCoV3(Tiny(spec), build_mlp(spec.predictor_layers, C, HIDDEN, C,
                                         spec.predictor_last_bn), t=t, m=m).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a momentum encoder that differs from the base one
        for p in model.momentum_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        for mod in model.modules():  # BN scales and shifts away from 1 and 0
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    return model


def naive_bn(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """Training-mode BatchNorm from its definition: the batch's mean and biased variance."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + EPS)
    return y if w is None or b is None else y * w.view(shape) + b.view(shape)


def naive_mlp(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str, layers: int,
              last_bn: bool) -> torch.Tensor:
    """Linear without bias; BN + ReLU between layers; BN without affine after the last one
    when last_bn. Layer i's Linear is entry 3i of the Sequential, its BN entry 3i+1."""
    for i in range(layers):
        x = x @ p[f"{prefix}{3 * i}.weight"].T
        if i < layers - 1:
            x = F.relu(naive_bn(x, p[f"{prefix}{3 * i + 1}.weight"], p[f"{prefix}{3 * i + 1}.bias"]))
        elif last_bn:
            x = naive_bn(x, None, None)
    return x


def naive_encoder(x: torch.Tensor, p: dict[str, torch.Tensor], spec: HeadSpec) -> torch.Tensor:
    h = F.conv2d(x, p["conv1.weight"])
    h = F.relu(naive_bn(h, p["bn1.weight"], p["bn1.bias"])).mean(dim=(2, 3))
    return naive_mlp(h, p, "fc.", spec.projector_layers, spec.projector_last_bn)


def naive_ctr(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """ctr(q, k) = mean_i [-log softmax_j(q_i·k_j / τ)[i]] · 2τ, q and k L2-normalised,
    the positive of q_i is k_i (the whole global batch is here)."""
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    logits = qn @ kn.T / t
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean() * 2 * t


def naive_step(model: MoCoV3, spec: HeadSpec, x1: torch.Tensor, x2: torch.Tensor
               ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One MoCo v3 step from §13's description, in float64, on the whole batch:
    (loss, gradients of base encoder and predictor by name, momentum encoder after the step)."""
    pq = {f"base_encoder.{n}": v.detach().double().clone().requires_grad_()
          for n, v in model.base_encoder.named_parameters()}
    pq.update({f"predictor.{n}": v.detach().double().clone().requires_grad_()
               for n, v in model.predictor.named_parameters()})
    base = {n[len("base_encoder."):]: v for n, v in pq.items() if n.startswith("base_encoder.")}
    pred = {n[len("predictor."):]: v for n, v in pq.items() if n.startswith("predictor.")}

    def predictor(z: torch.Tensor) -> torch.Tensor:
        return naive_mlp(z, pred, "", spec.predictor_layers, spec.predictor_last_bn)

    q1 = predictor(naive_encoder(x1, base, spec))
    q2 = predictor(naive_encoder(x2, base, spec))
    m = model.m
    theta_k = {n: m * v.detach().double() + (1 - m) * base[n].detach()
               for n, v in model.momentum_encoder.named_parameters()}
    with torch.no_grad():
        k1, k2 = naive_encoder(x1, theta_k, spec), naive_encoder(x2, theta_k, spec)
    loss = naive_ctr(q1, k2, model.t) + naive_ctr(q2, k1, model.t)
    loss.backward()
    grads = {n: v.grad for n, v in pq.items()}
    assert all(g is not None for g in grads.values())
    return float(loss.detach()), grads, theta_k  # type: ignore[return-value]


def views(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64))


def module_grads(model: MoCoV3) -> dict[str, torch.Tensor]:
    out = {f"base_encoder.{n}": p.grad for n, p in model.base_encoder.named_parameters()}
    out.update({f"predictor.{n}": p.grad for n, p in model.predictor.named_parameters()})
    assert all(g is not None for g in out.values())
    return out  # type: ignore[return-value]


def assert_matches_naive(loss: float, grads: dict[str, torch.Tensor],
                         momentum: dict[str, torch.Tensor],
                         naive: tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]
                         ) -> None:
    n_loss, n_grads, n_momentum = naive
    assert loss == pytest.approx(n_loss, rel=1e-10)
    assert set(grads) == set(n_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, n_grads[name], rtol=1e-7, atol=1e-10, msg=name)
    assert set(momentum) == set(n_momentum)
    for name, v in momentum.items():
        torch.testing.assert_close(v, n_momentum[name], rtol=1e-12, atol=1e-14, msg=name)


# ----- the step, on one process --------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "t"), [(RESNET_HEADS, 1.0), (VIT_HEADS, 0.2)])
def test_one_step_matches_the_naive_float64_step(spec: HeadSpec, t: float) -> None:
    model = convert_global_bn(tiny_mocov3(spec, t=t, m=0.9))
    x1, x2 = views(6)
    naive = naive_step(model, spec, x1, x2)
    out = model(x1, x2)
    out.loss.backward()
    momentum = dict(model.momentum_encoder.named_parameters())
    assert_matches_naive(float(out.loss.detach()), module_grads(model), momentum, naive)
    # the momentum encoder takes no gradient, and only the base encoder has a twin
    assert all(p.grad is None and not p.requires_grad for p in momentum.values())
    assert set(momentum) == {n for n, _ in model.base_encoder.named_parameters()}


def test_keys_of_the_old_momentum_encoder_give_another_loss() -> None:
    """Keys computed before the momentum update would change the loss: the naive comparison
    above tells the orders apart (Algorithm 1 updates first)."""
    model = tiny_mocov3(RESNET_HEADS, t=1.0, m=0.5)
    x1, x2 = views(4)
    with torch.no_grad():
        q1 = model.predictor(model.base_encoder(x1))
        q2 = model.predictor(model.base_encoder(x2))
        k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)
        stale = contrastive_loss(q1, k2, 1.0)[0] + contrastive_loss(q2, k1, 1.0)[0]
        out = model(x1, x2)
    assert abs(float(out.loss) - float(stale)) > 1e-3


# ----- the step, on two processes ------------------------------------------------------------------
SPECS = {"resnet": (RESNET_HEADS, 1.0), "vit": (VIT_HEADS, 0.2)}


def _two_process_worker(ctx: Any, n: int) -> dict[str, dict[str, Any]]:
    """Each spec's step on this process's N images (of the 2N), BatchNorm synchronised."""
    rank = dist.get_rank()
    out = {}
    for name, (spec, t) in SPECS.items():
        model = convert_global_bn(tiny_mocov3(spec, t=t, m=0.9))
        assert isinstance(model, MoCoV3)
        x1, x2 = views(2 * n)
        mine = slice(rank * n, (rank + 1) * n)
        step = model(x1[mine], x2[mine])
        step.loss.backward()
        grads = module_grads(model)
        for g in grads.values():  # as DistributedDataParallel: the mean over processes
            dist.all_reduce(g)
            g /= dist.get_world_size()
        momentum = {k: p.detach() for k, p in model.momentum_encoder.named_parameters()}
        out[name] = {"loss": float(step.loss.detach()), "grads": grads, "momentum": momentum,
                     "logits": step.logits}
    return out


def test_two_processes_equal_the_naive_step_on_the_global_batch(tmp_path: Path) -> None:
    """2 processes with N images each = the naive step on the global 2N batch: keys gathered,
    labels offset by rank, BatchNorm statistics of the global batch, gradients averaged."""
    n = 3
    results = spawn(_two_process_worker, tmp_path, n)
    for name, (spec, t) in SPECS.items():
        ranks = [r[name] for r in results]
        model = tiny_mocov3(spec, t=t, m=0.9)
        x1, x2 = views(2 * n)
        naive = naive_step(model, spec, x1, x2)
        loss = sum(r["loss"] for r in ranks) / 2  # each process's mean over its N queries
        assert_matches_naive(loss, ranks[0]["grads"], ranks[0]["momentum"], naive)
        for key in ranks[0]["grads"]:
            torch.testing.assert_close(ranks[1]["grads"][key], ranks[0]["grads"][key])
        # rank r's logits [N, 2N]: the positive of its query i is global key r·N + i
        with torch.no_grad():
            model(x1, x2)  # the same momentum update, then the keys of the whole batch
            q1 = model.predictor(model.base_encoder(x1))
            _, logits, _ = contrastive_loss(q1, model.momentum_encoder(x2), t)
        for r in range(2):
            got = ranks[r]["logits"]
            assert got.shape == (n, 2 * n)
            torch.testing.assert_close(got[:, 0], logits[r * n:(r + 1) * n].diagonal(r * n))


# ----- heads, builder, schedule, accuracy layout ---------------------------------------------------
def test_build_mlp_layout() -> None:
    mlp = build_mlp(3, 10, 32, 6, last_bn=True)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear",
                     "BatchNorm1d"]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)] == [
        (10, 32), (32, 32), (32, 6)]
    assert mlp[1].affine and mlp[4].affine and not mlp[7].affine
    assert [type(m).__name__ for m in build_mlp(2, 4, 8, 4, last_bn=False)] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear"]
    with pytest.raises(ValueError):
        build_mlp(0, 4, 8, 4)


def test_resnet_build_and_keys() -> None:
    model = build_mocov3("resnet18", MoCoV3Config(dim=32, mlp_dim=64))
    fc, pred = model.base_encoder.fc, model.predictor
    assert [type(m).__name__ for m in fc] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert fc[0].in_features == 512 and not fc[4].affine
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    keys = set(model.state_dict())
    assert {"base_encoder.conv1.weight", "base_encoder.fc.0.weight", "base_encoder.fc.4.running_mean",
            "momentum_encoder.fc.3.weight", "predictor.0.weight", "predictor.3.weight"} <= keys
    assert not any(k.startswith("momentum_encoder.") and "predictor" in k for k in keys)
    assert model.t == 1.0 and model.m == 0.99
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert out.loss.ndim == 0 and out.logits.shape == (4, 4)


def test_vit_build_uses_the_vit_heads() -> None:
    pytest.importorskip("timm")
    from moco.core.backbones import BackboneOptions

    model = build_mocov3("vit_tiny", MoCoV3Config(dim=16, mlp_dim=32, t=0.2),
                         BackboneOptions(image_size=32, patch_size=8, stop_grad_conv1=True,
                                         require_batchnorm=False))
    head = model.base_encoder.head
    assert sum(isinstance(m, nn.Linear) for m in head) == 3 and head[0].in_features == 192
    assert not head[-1].affine and isinstance(model.predictor[-1], nn.BatchNorm1d)
    trained = {id(p) for p in model.trained_parameters()}
    proj = model.base_encoder.patch_embed.proj
    assert id(proj.weight) not in trained and id(model.base_encoder.pos_embed) not in trained
    assert all(id(p) in trained for p in model.predictor.parameters())
    assert not any(id(p) in trained for p in model.momentum_encoder.parameters())


def test_momentum_schedule() -> None:
    assert momentum_at(0.99, 0, 100) == pytest.approx(0.99)
    assert momentum_at(0.99, 100, 100) == pytest.approx(1.0)
    assert momentum_at(0.99, 50, 100) == pytest.approx(0.995)
    for t in (0.0, 3.25, 37.5, 99.9):
        want = 1 - 0.5 * (1 + math.cos(math.pi * t / 100)) * (1 - 0.996)
        assert momentum_at(0.996, t, 100) == pytest.approx(want, rel=0, abs=1e-15)
    model = tiny_mocov3(RESNET_HEADS, t=1.0, m=0.99)
    assert model.set_momentum(2 + 5 / 10, 10) == model.m == momentum_at(0.99, 2.5, 10)
    assert model.m0 == 0.99


def test_positive_first_layout_and_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g)
    labels = torch.tensor([3, 4, 5])  # rank 1 of 2, N = 3
    out = positive_first(logits, labels)
    for i in range(3):
        rest = [c for c in range(6) if c != int(labels[i])]
        assert torch.equal(out[i], torch.cat([logits[i, labels[i]].view(1), logits[i, rest]]))
    want = (logits.argmax(1) == labels).double().mean() * 100
    assert float(pretext_accuracy(out)) == pytest.approx(float(want))


# ----- CUDA (the cuda tier) ------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda tier)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.cuda
@needs_cuda
def test_cuda_step_under_autocast_keeps_the_loss_in_float32(dtype: torch.dtype) -> None:
    """A ViT-Ti/4 step under autocast: logits and loss in float32, close to the float32 step,
    finite gradients on every trained tensor."""
    pytest.importorskip("timm")
    import copy

    from moco.core.backbones import BackboneOptions

    torch.manual_seed(0)
    model = build_mocov3("vit_tiny", MoCoV3Config(dim=32, mlp_dim=64, t=0.2),
                         BackboneOptions(image_size=32, patch_size=4, stop_grad_conv1=True,
                                         require_batchnorm=False)).cuda()
    ref = copy.deepcopy(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    x1 = torch.randn(16, 3, 32, 32, device="cuda", generator=g)
    x2 = torch.randn(16, 3, 32, 32, device="cuda", generator=g)
    want = ref(x1, x2)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x1, x2)
    assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert float(out.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=2e-2)
    out.loss.backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all())
               for p in model.trained_parameters())


@pytest.mark.cuda
@needs_cuda
def test_cuda_resnet_with_sync_batchnorm_steps() -> None:
    """The CUDA conversion (torch's SyncBatchNorm) of a MoCo v3 ResNet runs a step (outside a
    process group SyncBatchNorm normalises like BatchNorm)."""
    from moco.core.backbones import BackboneOptions
    from moco.core.global_bn import sync_batchnorm_for

    torch.manual_seed(0)
    model = build_mocov3("resnet18", MoCoV3Config(dim=32, mlp_dim=64),
                         BackboneOptions(cifar_stem=True, zero_init_residual=True))
    model = sync_batchnorm_for(model, "cuda").cuda()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    x = torch.randn(8, 3, 32, 32, device="cuda")
    out = model(x, x.flip(3))
    out.loss.backward()
    assert bool(out.loss.isfinite()) and out.logits.shape == (8, 8)


# ----- as a registered pretraining method ----------------------------------------------------------
def test_it_is_a_pretraining_method_with_the_authors_checkpoint_layout() -> None:
    from moco.core.method_base import PretrainingMethod

    model = tiny_mocov3(RESNET_HEADS, t=1.0, m=0.99)
    assert isinstance(model, PretrainingMethod)
    assert model.evaluation_encoder() is model.base_encoder
    (group,) = model.trainable_parameters()
    want = [*model.base_encoder.parameters(), *model.predictor.parameters()]
    assert [id(p) for p in group["params"]] == [id(p) for p in want]
    state = model.checkpoint_state()
    prefixes = {k.split(".")[1] for k in state}
    assert all(k.startswith("module.") for k in state)
    assert prefixes == {"base_encoder", "momentum_encoder", "predictor"}
    assert list(dict.fromkeys(k.split(".")[1] for k in state)) == [
        "base_encoder", "momentum_encoder", "predictor"]  # the authors' order
    back = model.state_from_checkpoint(state)
    assert back.keys() == model.state_dict().keys()


def test_the_momentum_of_each_step_follows_the_cosine_or_stays_constant() -> None:
    cos = tiny_mocov3(RESNET_HEADS, t=1.0, m=0.99)
    const = MoCoV3(cos.base_encoder, cos.predictor, t=1.0, m=0.99, cosine=False)
    for t in (0.0, 0.25, 3.5, 9.75):
        cos.set_progress(t, 10)
        const.set_progress(t, 10)
        assert cos.m == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * t / 10)) * 0.01,
                                      rel=0, abs=1e-15)
        assert const.m == 0.99


def test_registered_method_reads_the_run_settings() -> None:
    from types import SimpleNamespace

    from moco.core.backbones import build_backbone, feature_dim_of
    from moco.core.methods import method_spec

    spec = method_spec("mocov3")
    assert (spec.title, spec.has_queue, spec.shuffle_bn) == ("MoCo v3", False, False)
    assert spec.backbone_options(None) == {"zero_init_residual": True, "require_batchnorm": False}
    settings = SimpleNamespace(moco_dim=16, mlp_dim=32, moco_t=0.5, moco_m=0.9, moco_m_cos=False,
                               batch_size=8, shuffle_bn="auto", symmetric=True, mlp=False)
    encoder = build_backbone("resnet18").model  # its fc is replaced by the projector
    model = spec.build(settings, encoder, None)
    assert isinstance(model, MoCoV3) and (model.t, model.m0) == (0.5, 0.9)
    assert feature_dim_of(model.base_encoder) == 512
    assert [type(m).__name__ for m in model.base_encoder.fc] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert model.base_encoder.fc[3].out_features == 16 and model.predictor[0].in_features == 16
    model.set_progress(5.0, 10)
    assert model.m == 0.9  # --moco-m-cos off
    assert "batch negatives, all-gathered (7 per query" in spec.dictionary(settings, 100)
    assert any("--symmetric" in w for w in spec.advise(settings, 100))
    from moco.core.errors import ConfigError

    for mode in ("split", "ddp", "syncbn"):
        with pytest.raises(ConfigError, match="MoCo v3 has no Shuffling BN"):
            spec.check(SimpleNamespace(**{**vars(settings), "shuffle_bn": mode}))
    with pytest.raises(ConfigError, match="--batch-size must be >= 2"):
        spec.check(SimpleNamespace(**{**vars(settings), "batch_size": 1}))


def test_chance_loss_is_the_loss_of_uniform_logits() -> None:
    from moco.core.mocov3 import chance_loss

    q, k = torch.zeros(8, 4), torch.zeros(8, 4)
    q[:, 0] = k[:, 0] = 1.0  # every query equally close to every key
    loss = contrastive_loss(q, k, 0.2)[0] * 2
    assert float(loss) == pytest.approx(chance_loss(0.2, 8))
