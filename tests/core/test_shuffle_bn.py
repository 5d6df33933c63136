"""SplitBatchNorm and the one-device key shuffle against plain BatchNorm2d (REFERENCE.md §3.3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from moco.core.shuffle_bn import LocalShuffle, NoShuffle, SplitBatchNorm, convert_split_bn

C = 3


def _split_bn(s: int, seed: int = 0) -> SplitBatchNorm:
    """A SplitBatchNorm with non-trivial affine parameters and running stats."""
    g = torch.Generator().manual_seed(seed)
    bn = SplitBatchNorm(C, s)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return bn


def _plain_copy(bn: SplitBatchNorm) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(C)
    plain.load_state_dict(bn.state_dict())
    return plain


def _input(b: int, seed: int = 1, fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Per-sample offsets so that the split statistics differ clearly.
    x = torch.randn(b, C, 5, 4, generator=g) * 2 + torch.arange(b, dtype=torch.float32)[:, None, None, None]
    return x.contiguous(memory_format=fmt)


FORMATS = [pytest.param(torch.contiguous_format, id="nchw"),
           pytest.param(torch.channels_last, id="channels_last")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("b", "s"), [(8, 4), (12, 3), (8, 2), (6, 6)])
def test_train_equals_plain_bn_per_strided_split(b: int, s: int, fmt: torch.memory_format) -> None:
    bn = _split_bn(s).train()
    x = _input(b, fmt=fmt).requires_grad_(True)
    out = bn(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    refs = [_plain_copy(bn).train() for _ in range(s)]
    total = 0.0
    for split, ref in enumerate(refs):
        # Split ``split`` holds samples split, split+S, split+2S, ... (strided, not blocks).
        idx = torch.arange(split, b, s)
        ref_out = ref(x_ref[idx])
        torch.testing.assert_close(out[idx], ref_out, rtol=1e-5, atol=1e-5)
        total = total + (ref_out * upstream[idx]).sum()
    total.backward()  # type: ignore[union-attr]

    assert bn.weight.grad is not None and bn.bias.grad is not None and x.grad is not None
    # Gradients of the shared affine parameters add up over the splits.
    torch.testing.assert_close(bn.weight.grad, sum(r.weight.grad for r in refs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, sum(r.bias.grad for r in refs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_splits_are_strided_not_contiguous() -> None:
    b, s = 8, 2
    bn = _split_bn(s).train()
    x = _input(b)
    out = bn(x)
    blocks = torch.cat([_plain_copy(bn).train()(x[:4]), _plain_copy(bn).train()(x[4:])])
    assert not torch.allclose(out, blocks, atol=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_running_stats_are_average_of_split_updates(fmt: torch.memory_format) -> None:
    b, s = 12, 3
    bn = _split_bn(s).train()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    nbt0 = int(bn.num_batches_tracked)
    x = _input(b, fmt=fmt).double()
    bn.double()(x)
    means, vars_ = [], []
    for split in range(s):
        xs = x[split::s]  # [B/S, C, H, W]
        flat = xs.transpose(0, 1).reshape(C, -1)  # per channel
        n = flat.shape[1]
        mu = flat.sum(dim=1) / n
        var_unbiased = ((flat - mu[:, None]) ** 2).sum(dim=1) / (n - 1)
        means.append(0.9 * rm0.double() + 0.1 * mu)
        vars_.append(0.9 * rv0.double() + 0.1 * var_unbiased)
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bn.running_var, torch.stack(vars_).mean(0), rtol=1e-9, atol=1e-9)
    # Differs from plain BN over the whole batch (whose variance includes between-split spread).
    plain = _plain_copy(_split_bn(s)).double().train()
    plain(x)
    assert not torch.allclose(plain.running_var, bn.running_var)
    assert int(bn.num_batches_tracked) in (nbt0, nbt0 + 1)


def test_eval_is_plain_bn_with_running_stats() -> None:
    bn = _split_bn(4).eval()
    x = _input(6)  # in eval the batch need not be divisible by S
    plain = _plain_copy(bn).eval()
    rm = bn.running_mean.clone()
    torch.testing.assert_close(bn(x), plain(x))
    ref = (x - bn.running_mean[None, :, None, None]) / torch.sqrt(
        bn.running_var[None, :, None, None] + bn.eps) * bn.weight[None, :, None, None] + bn.bias[
        None, :, None, None]
    torch.testing.assert_close(bn(x), ref.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.running_mean, rm)  # eval does not update


def test_one_split_is_plain_bn() -> None:
    bn = _split_bn(1).train()
    plain = _plain_copy(bn).train()
    x = _input(5)
    torch.testing.assert_close(bn(x), plain(x))
    torch.testing.assert_close(bn.running_var, plain.running_var)


def test_channels_last_stays_channels_last_and_matches_nchw() -> None:
    """A channels_last activation (the CUDA default) is normalised without being turned into
    NCHW and back; output, gradients and running stats equal the NCHW path's."""
    bn = _split_bn(4).train()
    bn2 = copy.deepcopy(bn)
    x = _input(16).requires_grad_(True)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out, out_cl = bn2(x), bn(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * up).sum().backward()
    (out_cl * up.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert x_cl.grad is not None and x_cl.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, bn2.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, bn2.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn.running_var, bn2.running_var)


def test_channels_last_gradients_are_exact() -> None:
    """The channels_last path's hand-written backward, against finite differences."""
    from moco.core.shuffle_bn import _SplitBNChannelsLast

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 1).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: _SplitBNChannelsLast.apply(x, 4, w, b, 1e-5)[0],
                                    (x, w, b))


def test_channels_last_in_bf16_keeps_float32_statistics() -> None:
    """Under bf16 autocast the activations are bf16: the output is bf16 and channels_last, with
    statistics in float32 (close to the float32 result within bf16 rounding, even with a
    mean far from zero)."""
    bn = _split_bn(2).train()
    ref = copy.deepcopy(bn)
    x = (_input(8) * 0.5 + 40.0).to(torch.bfloat16)
    out = bn(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    expected = ref(x.float())
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.03)


def test_batch_not_divisible_raises_clear_error() -> None:
    bn = _split_bn(4).train()
    with pytest.raises(ValueError, match=r"(?i)divisible.*(bn-splits|splits)"):
        bn(_input(6))


def test_bad_num_splits() -> None:
    with pytest.raises(ValueError):
        SplitBatchNorm(3, 0)


def test_convert_split_bn_replaces_all_and_keeps_weights() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4)
    # Non-default BN state so a lost copy would be visible.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(3)
    before = copy.deepcopy(net).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    out = convert_split_bn(net, 2)
    assert out is net
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == n_bn == 20
    assert all(type(m) is SplitBatchNorm and m.num_splits == 2 for m in bns)
    sd_a, sd_b = before.state_dict(), net.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for a, b in zip(before.modules(), net.modules(), strict=True):
        if isinstance(a, nn.BatchNorm2d):
            assert (a.eps, a.momentum, a.affine) == (b.eps, b.momentum, b.affine)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before(x))
    # Converting again is a no-op.
    convert_split_bn(net, 2)
    assert all(type(m) is SplitBatchNorm for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_local_shuffle_round_trip() -> None:
    sh = LocalShuffle(torch.Generator().manual_seed(0))
    x = torch.arange(16, dtype=torch.float32)[:, None] * torch.ones(16, 3)
    shuffled, handle = sh.shuffle(x)
    assert not torch.equal(shuffled, x)  # really permuted
    assert sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    # A per-row "encoder" followed by unshuffle gives rows back in the original order.
    k = shuffled * 2 + 1
    torch.testing.assert_close(sh.unshuffle(k, handle), x * 2 + 1)
    assert torch.equal(sh.gather(x), x)


def test_local_shuffle_deterministic_given_generator() -> None:
    x = torch.arange(32, dtype=torch.float32)[:, None]
    a = LocalShuffle(torch.Generator().manual_seed(7))
    b = LocalShuffle(torch.Generator().manual_seed(7))
    c = LocalShuffle(torch.Generator().manual_seed(8))
    for _ in range(3):
        xa, _ = a.shuffle(x)
        xb, _ = b.shuffle(x)
        xc, _ = c.shuffle(x)
        assert torch.equal(xa, xb)
        assert not torch.equal(xa, xc)
    # The global RNG is not consumed.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    LocalShuffle(torch.Generator().manual_seed(0)).shuffle(x)
    assert torch.equal(torch.rand(3), expected)


def test_no_shuffle_is_identity() -> None:
    sh = NoShuffle()
    x = torch.randn(4, 2)
    y, handle = sh.shuffle(x)
    assert y is x and handle is None
    assert sh.unshuffle(x, handle) is x
    assert sh.gather(x) is x


# ----- the channels_last path: fp16-safe, traceable by torch.compile ------------------------------

def test_channels_last_fp16_gradients_do_not_overflow() -> None:
    """fp16 activations and upstream gradients of a few hundred: many g·x are past fp16's
    largest value (65504). The backward computes in float32, so the gradients are finite and
    equal the float64 computation on the same fp16 values."""
    from moco.core.shuffle_bn import _SplitBNChannelsLast

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 4, 4, generator=g) * 250 + 20).half()
    up = (torch.randn(8, 3, 4, 4, generator=g) * 400).half()
    w = torch.rand(3, generator=g) + 0.5
    b = torch.randn(3, generator=g)
    assert not torch.isfinite(x * up).all()  # what a product in fp16 would give
    outs = []
    for dtype in (torch.float16, torch.float64):
        xx = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        ww, bb = w.double().requires_grad_(True), b.double().requires_grad_(True)
        y = _SplitBNChannelsLast.apply(xx, 2, ww, bb, 1e-5)[0]
        y.backward(up.to(dtype).contiguous(memory_format=torch.channels_last))
        assert xx.grad is not None and ww.grad is not None and bb.grad is not None
        outs.append((y.double(), xx.grad.double(), ww.grad, bb.grad))
    (y16, dx16, dw16, db16), (y64, dx64, dw64, db64) = outs
    assert torch.isfinite(dx16).all() and torch.isfinite(dw16).all()
    torch.testing.assert_close(y16, y64, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dx16, dx64, rtol=1e-2, atol=0.5)  # fp16 output rounding
    torch.testing.assert_close(dw16, dw64, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(db16, db64, rtol=1e-6, atol=1e-6)


def test_channels_last_split_bn_traces_under_torch_compile() -> None:
    """Forward and backward traced by torch.compile (AOTAutograd, fullgraph, no code
    generation: backend aot_eager) give the eager values: no ``out=`` into a strided view."""
    bn = _split_bn(2).train()
    bn_c = copy.deepcopy(bn)
    x = _input(8, fmt=torch.channels_last).requires_grad_(True)
    xc = x.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(bn_c, backend="aot_eager", fullgraph=True)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    (bn(x) * up).sum().backward()
    (compiled(xc) * up).sum().backward()
    assert x.grad is not None and xc.grad is not None
    torch.testing.assert_close(xc.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_c.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_c.running_var, bn.running_var)
