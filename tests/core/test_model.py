"""The MoCo module: step order, symmetric loss, heads and stems (REFERENCE.md §1.5, §2, §6.2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from moco.core.loss import info_nce, moco_logits
from moco.core.model import MoCo, build_encoder
from moco.core.momentum import momentum_update
from moco.core.shuffle_bn import LocalShuffle, NoShuffle, SplitBatchNorm
from moco.engine.build import build_model
from moco.engine.config import MocoConfig

DIM = 8


def toy_encoder(dim: int = DIM) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, dim),
    )


def _model(m: float = 0.9, k: int = 24, t: float = 0.2, symmetric: bool = False) -> MoCo:
    torch.manual_seed(0)
    model = MoCo(toy_encoder(), dim=DIM, k=k, m=m, t=t, symmetric=symmetric,
                 generator=torch.Generator().manual_seed(5))
    # Make θ_q differ from θ_k, as after an optimizer step, so the EMA timing is visible.
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model.train()


def _views(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def _reference_step(model: MoCo, im_q: torch.Tensor, im_k: torch.Tensor) -> dict[str, torch.Tensor]:
    """What §1.5 says one step computes, on deep copies (run before the real step)."""
    enc_q = copy.deepcopy(model.encoder_q)
    enc_k = copy.deepcopy(model.encoder_k)
    queue = model.key_queue.queue.clone()
    with torch.no_grad():
        momentum_update(enc_q, enc_k, model.m)  # EMA first ...
        q = F.normalize(enc_q(im_q), dim=1)
        k = F.normalize(enc_k(im_k), dim=1)  # ... then keys with the updated θ_k
        k_old = F.normalize(copy.deepcopy(model.encoder_k)(im_k), dim=1)
    return {"q": q, "k": k, "k_old": k_old, "queue": queue, "enc_k": enc_k}


def test_step_order_ema_before_keys_logits_before_enqueue() -> None:
    model = _model()
    im_q, im_k = _views(4)
    ref = _reference_step(model, im_q, im_k)
    assert not torch.allclose(ref["k"], ref["k_old"], atol=1e-4)  # the EMA timing matters here
    out = model(im_q, im_k)

    # The EMA ran (once) at the start of the step.
    for p, r in zip(model.encoder_k.parameters(), ref["enc_k"].parameters(), strict=True):
        torch.testing.assert_close(p, r)
    # Keys were computed with the updated key encoder: they are what entered the queue.
    stored = model.key_queue.queue[:, :4].T
    torch.testing.assert_close(stored, ref["k"], rtol=1e-5, atol=1e-6)
    assert int(model.key_queue.queue_ptr) == 4
    # Logits were computed against the queue as it was BEFORE the enqueue.
    expected = moco_logits(ref["q"], ref["k"], ref["queue"], model.t)
    assert out.logits.shape == (4, 1 + 24)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, info_nce(expected), rtol=1e-5, atol=1e-6)
    # So no query saw its own key (nor this batch's keys) among its negatives.
    own = (ref["q"] @ ref["k"].T) / model.t  # [N, N]
    for i in range(4):
        negs = out.logits[i, 1:]
        assert not torch.isclose(negs, own[i, i], atol=1e-6).any()
    after = moco_logits(ref["q"], ref["k"], model.key_queue.queue, model.t)
    assert not torch.allclose(after, out.logits)


def test_q_and_k_are_unit_length() -> None:
    model = _model(t=0.5)
    im_q, im_k = _views(4)
    out = model(im_q, im_k)
    # |logit|·t is a cosine similarity.
    assert (out.logits.abs() * 0.5 <= 1 + 1e-5).all()
    torch.testing.assert_close(model.key_queue.queue[:, :4].norm(dim=0), torch.ones(4))
    q = model.encode_query(im_q)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(4))


def test_second_step_sees_first_steps_keys() -> None:
    model = _model()
    im_q, im_k = _views(4)
    model(im_q, im_k)
    first_keys = model.key_queue.queue[:, :4].clone()
    ref = _reference_step(model, im_q, im_k)
    out = model(im_q, im_k)
    # Step 2's negatives include step 1's keys (columns 0..3 of the queue, logit columns 1..4).
    torch.testing.assert_close(out.logits[:, 1:5], ref["q"] @ first_keys / model.t,
                               rtol=1e-5, atol=1e-5)
    assert int(model.key_queue.queue_ptr) == 8


def test_symmetric_loss_and_enqueue_2n() -> None:
    model = _model(symmetric=True)
    im_q, im_k = _views(4)
    enc_q = copy.deepcopy(model.encoder_q)
    enc_k = copy.deepcopy(model.encoder_k)
    queue = model.key_queue.queue.clone()
    with torch.no_grad():
        momentum_update(enc_q, enc_k, model.m)
        q1, q2 = F.normalize(enc_q(im_q), dim=1), F.normalize(enc_q(im_k), dim=1)
        k1, k2 = F.normalize(enc_k(im_q), dim=1), F.normalize(enc_k(im_k), dim=1)
    expected = info_nce(moco_logits(q1, k2, queue, model.t)) + info_nce(
        moco_logits(q2, k1, queue, model.t))
    out = model(im_q, im_k)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, moco_logits(q1, k2, queue, model.t), rtol=1e-5, atol=1e-5)
    # Both key sets, 2N keys, enqueued after both losses: [k1; k2].
    assert int(model.key_queue.queue_ptr) == 8
    torch.testing.assert_close(model.key_queue.queue[:, :8].T, torch.cat([k1, k2]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.key_queue.queue[:, 8:], queue[:, 8:])


def test_loss_backward_reaches_query_encoder_only() -> None:
    model = _model()
    im_q, im_k = _views(4)
    model(im_q, im_k).loss.backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_shuffle_realigns_keys() -> None:
    """With plain BN (statistics are order-invariant), shuffling the key batch and undoing it
    must give the same keys, row for row, as no shuffle."""
    im_q, im_k = _views(8)
    a, b = _model(), _model()
    a(im_q, im_k, NoShuffle())
    b(im_q, im_k, LocalShuffle(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(a.key_queue.queue, b.key_queue.queue, rtol=1e-5, atol=1e-6)


def test_key_encoder_bn_in_train_mode_updates_its_own_stats() -> None:
    model = _model()
    im_q, im_k = _views(4)
    bn_k = model.encoder_k[1]
    before = bn_k.running_mean.clone()
    model(im_q, im_k)
    assert model.encoder_k.training
    assert not torch.equal(bn_k.running_mean, before)
    assert not torch.allclose(bn_k.running_mean, model.encoder_q[1].running_mean)


# ----- encoders built from torchvision ResNets ------------------------------------------------

def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_v1_head_is_torchvision_fc() -> None:
    enc = build_encoder("resnet18", 16, mlp=False, cifar_stem=False, bn_splits=1)
    assert isinstance(enc.fc, nn.Linear)
    assert (enc.fc.in_features, enc.fc.out_features) == (512, 16)
    assert enc.fc.bias is not None
    # Exactly torchvision's resnet18(num_classes=dim): same keys and shapes.
    tv = torchvision.models.resnet18(num_classes=16)
    assert _shapes(enc.state_dict()) == _shapes(tv.state_dict())


def test_v2_head_is_mlp_with_original_keys() -> None:
    enc = build_encoder("resnet18", 16, mlp=True, cifar_stem=False, bn_splits=1)
    fc = enc.fc
    assert isinstance(fc, nn.Sequential) and len(fc) == 3
    assert isinstance(fc[0], nn.Linear) and (fc[0].in_features, fc[0].out_features) == (512, 512)
    assert isinstance(fc[1], nn.ReLU) and not fc[1].inplace
    assert isinstance(fc[2], nn.Linear) and (fc[2].in_features, fc[2].out_features) == (512, 16)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fc.modules())
    head_keys = {k: v for k, v in _shapes(enc.state_dict()).items() if k.startswith("fc")}
    assert head_keys == {"fc.0.weight": (512, 512), "fc.0.bias": (512,),
                         "fc.2.weight": (16, 512), "fc.2.bias": (16,)}
    tv = _shapes(torchvision.models.resnet18(num_classes=16).state_dict())
    body = {k: v for k, v in _shapes(enc.state_dict()).items() if not k.startswith("fc")}
    assert body == {k: v for k, v in tv.items() if not k.startswith("fc")}


@pytest.mark.parametrize("mlp", [False, True])
def test_both_encoders_get_the_head(mlp: bool) -> None:
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, mlp=mlp, cifar_stem=True, bn_splits=1)
    model = MoCo(enc, dim=16, k=32)
    sd_q = {k[len("encoder_q."):]: v for k, v in model.state_dict().items() if k.startswith("encoder_q.")}
    sd_k = {k[len("encoder_k."):]: v for k, v in model.state_dict().items() if k.startswith("encoder_k.")}
    assert sd_q.keys() == sd_k.keys()
    assert any(k.startswith("fc.2." if mlp else "fc.weight") for k in sd_k)
    for name, p in model.encoder_q.named_parameters():
        assert torch.equal(p, dict(model.encoder_k.named_parameters())[name])
    assert {"key_queue.queue", "key_queue.queue_ptr"} <= set(model.state_dict())
    assert model.key_queue.queue.shape == (16, 32)


def test_cifar_stem() -> None:
    enc = build_encoder("resnet18", 16, mlp=False, cifar_stem=True, bn_splits=1)
    c = enc.conv1
    assert isinstance(c, nn.Conv2d)
    assert (c.in_channels, c.out_channels) == (3, 64)
    assert c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1)
    assert c.bias is None
    assert isinstance(enc.maxpool, nn.Identity)
    seen: dict[str, torch.Size] = {}
    enc.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    enc.eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16)
    assert seen["shape"] == (2, 512, 4, 4)  # 32 px / 8: no stride-2 conv1, no max-pool


def test_imagenet_stem_kept_without_cifar_flag() -> None:
    enc = build_encoder("resnet18", 16, mlp=False, cifar_stem=False, bn_splits=1)
    assert enc.conv1.kernel_size == (7, 7) and enc.conv1.stride == (2, 2)
    assert isinstance(enc.maxpool, nn.MaxPool2d)


def test_bn_splits_converts_every_bn() -> None:
    enc = build_encoder("resnet18", 16, mlp=True, cifar_stem=True, bn_splits=4)
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20
    assert all(isinstance(m, SplitBatchNorm) and m.num_splits == 4 for m in bns)


@pytest.mark.parametrize(("shuffle_bn", "bn_splits", "split"),
                         [("split", 2, True), ("none", 2, True), ("none", 1, False), ("syncbn", 2, False)])
def test_build_model_bn_in_both_encoders(shuffle_bn: str, bn_splits: int, split: bool) -> None:
    """SplitBatchNorm with or without the key shuffle (none: the per-GPU-BN ablation)."""
    cfg = MocoConfig(arch="resnet18", cifar_stem=True, moco_dim=16, moco_k=32, batch_size=8,
                     bn_splits=bn_splits, shuffle_bn=shuffle_bn, channels_last=False, mlp=True)
    model = build_model(cfg, torch.device("cpu"))
    for enc in (model.encoder_q, model.encoder_k):
        bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(isinstance(m, SplitBatchNorm) == split for m in bns)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    # Seeded: the same config builds the same weights and queue.
    again = build_model(cfg, torch.device("cpu"))
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_resnet_moco_step_runs_at_32px() -> None:
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, mlp=True, cifar_stem=True, bn_splits=2)
    model = MoCo(enc, dim=16, k=8, m=0.99, t=0.2).train()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model(x1, x2, LocalShuffle(torch.Generator().manual_seed(0)))
    assert out.logits.shape == (4, 9)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert int(model.key_queue.queue_ptr) == 4


# ----- the method's checkpoint layout --------------------------------------------------------------

def test_checkpoint_state_is_the_original_layout_and_reads_back() -> None:
    """main_moco.py's keys: module.queue and module.queue_ptr first, then module.encoder_q.*
    and module.encoder_k.*; read back with or without the module. prefix."""
    from moco.utils.checkpoint import from_original_layout, to_original_layout

    model = _model()
    saved = model.checkpoint_state()
    assert list(saved)[:2] == ["module.queue", "module.queue_ptr"]
    assert list(saved) == list(to_original_layout(model.state_dict()))
    assert {k.split(".")[1] for k in list(saved)[2:]} == {"encoder_q", "encoder_k"}
    assert all(torch.equal(saved[k], v) for k, v in to_original_layout(model.state_dict()).items())
    for state in (saved, {k[len("module."):]: v for k, v in saved.items()}):
        back = model.state_from_checkpoint(state)
        assert back.keys() == model.state_dict().keys() == from_original_layout(state).keys()
    fresh = _model(m=0.5)
    fresh.load_state_dict(fresh.state_from_checkpoint(saved))
    assert torch.equal(fresh.key_queue.queue, model.key_queue.queue)
