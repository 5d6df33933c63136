"""The online linear probe: it changes nothing in the pretraining (bit-identical weights and
random stream with and without it, in a toy loop of each mechanism), reads the queries'
features, learns, and resumes exactly from its state."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moco.core.mechanisms import EndToEnd
from moco.core.model import MoCo
from moco.core.shuffle_bn import convert_split_bn
from moco.eval.feature_tap import HeadInputTap
from moco.eval.probe import OnlineProbe, label_table

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, FEATURES, DIM = 3, 16, 8


def encoder() -> nn.Module:
    """A small CNN with BatchNorm and a head named ``fc`` (as build_encoder's)."""
    net = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, FEATURES, 3, padding=1), bn=nn.BatchNorm2d(FEATURES), relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(FEATURES, DIM)))
    return convert_split_bn(net, 2)


def toy_pretraining(mechanism: str, probe_on: bool, steps: int = 4) -> tuple[dict[str, Any], Any]:
    """A few steps of a hand-written loop; the batches are drawn from torch's global generator
    inside the loop, so a probe that drew from it would change the later batches."""
    torch.manual_seed(0)
    enc = encoder()
    model = (MoCo(enc, dim=DIM, k=16, m=0.9, t=0.2) if mechanism == "moco"
             else EndToEnd(enc, t=0.2))
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    tap = HeadInputTap(model.encoder_q) if probe_on else None
    probe = OnlineProbe(FEATURES, CLASSES, lr=0.5, seed=3) if probe_on else None
    for _ in range(steps):
        im_q, im_k = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
        labels = torch.randint(0, CLASSES, (8,))
        out = model(im_q, im_k)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if probe is not None and tap is not None:
            f = tap.take()
            assert f is not None and f.shape == (8, FEATURES) and not f.requires_grad
            r = probe.step(f, labels)
            assert r is not None and r.images == 8
    if tap is not None:
        tap.close()
    return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()


@pytest.mark.parametrize("mechanism", ["moco", "end-to-end"])
def test_pretraining_is_bit_identical_with_and_without_the_probe(mechanism: str) -> None:
    ref_state, ref_rng = toy_pretraining(mechanism, probe_on=False)
    state, rng = toy_pretraining(mechanism, probe_on=True)
    assert state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(rng, ref_rng)


def test_tap_reads_the_queries_features_without_changing_the_output() -> None:
    torch.manual_seed(1)
    model = EndToEnd(encoder(), t=0.2).eval()  # eval: a second forward gives the same values
    im_q, im_k = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    plain = model(im_q, im_k).loss
    with HeadInputTap(model.encoder_q) as tap:
        tapped = model(im_q, im_k).loss
        f = tap.take()  # the first forward of the step: the queries (end-to-end encodes keys too)
        assert tap.take() is None
    assert torch.equal(plain, tapped)
    backbone = nn.Sequential(*list(model.encoder_q.children())[:-1])
    assert f is not None and torch.equal(f, backbone(im_q))
    assert not model.encoder_q.fc._forward_pre_hooks  # removed


def test_probe_construction_draws_nothing_from_the_global_generator() -> None:
    rng = torch.get_rng_state()
    a = OnlineProbe(FEATURES, CLASSES, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    b = OnlineProbe(FEATURES, CLASSES, seed=5)
    w = a.net[1].weight.detach()
    assert torch.equal(w, b.net[1].weight) and 0.005 < float(w.std()) < 0.02
    assert not torch.equal(w, OnlineProbe(FEATURES, CLASSES, seed=6).net[1].weight)
    assert float(a.net[1].bias.detach().abs().sum()) == 0.0


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of 3 classes around 3 random centres (+ a shared offset, as backbone
    features have), labels [n]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 5.0 + centres[y] + 0.5 * torch.randn(n, FEATURES, generator=g)
    return x, y


def test_probe_learns_and_reports_its_epoch() -> None:
    probe = OnlineProbe(FEATURES, CLASSES, seed=0)
    for step in range(60):
        x, y = separable(32, step)
        probe.step(x, y)
    m = probe.epoch_metrics()
    assert m["probe_loss"] is not None and m["probe_train_top1"] is not None
    assert m["probe_train_top1"] > 80
    assert probe.epoch_metrics() == {"probe_loss": None, "probe_train_top1": None}  # reset
    x, y = separable(500, 1000)
    acc = probe.evaluate(x, y)
    assert acc is not None and acc > 95
    # The kNN monitor's L2-normalised features give the same answer as the raw ones.
    assert probe.evaluate(nn.functional.normalize(x, dim=1), y) == acc


def test_unlabeled_images_are_left_out() -> None:
    probe = OnlineProbe(FEATURES, CLASSES, seed=0)
    x, y = separable(8, 0)
    assert probe.step(x, torch.full((8,), -1)) is None and probe.steps == 0
    y[:5] = -1
    r = probe.step(x, y)
    assert r is not None and r.images == 3
    assert probe.evaluate(x, torch.full((8,), -1)) is None
    assert label_table(None) is None
    assert torch.equal(label_table([2, 0, 1])[torch.tensor([2, 0])], torch.tensor([1, 2]))


def _run(probe: OnlineProbe, steps: range) -> None:
    for step in steps:
        probe.step(*separable(16, step))


def test_resume_from_state_is_exact(tmp_path: Path) -> None:
    ref = OnlineProbe(FEATURES, CLASSES, seed=0)
    _run(ref, range(6))
    first = OnlineProbe(FEATURES, CLASSES, seed=0)
    _run(first, range(3))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = OnlineProbe(FEATURES, CLASSES, seed=7)  # another init: the state replaces it
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _run(resumed, range(3, 6))
    for k, v in ref.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v), k
    assert resumed.steps == ref.steps == 6
    assert resumed.epoch_metrics() == ref.epoch_metrics()  # the epoch's sums carried over


def test_state_of_another_size_is_refused() -> None:
    from moco.core.errors import ConfigError

    state = OnlineProbe(FEATURES, CLASSES).state_dict()
    with pytest.raises(ConfigError, match="other features or classes"):
        OnlineProbe(FEATURES + 1, CLASSES).load_state_dict(state)


def test_training_only_tap_ignores_eval_forwards() -> None:
    torch.manual_seed(2)
    enc = encoder()
    x = torch.randn(4, 3, 8, 8)
    with HeadInputTap(enc, training_only=True) as tap:
        enc.eval()
        enc(x)  # a kNN monitor's or health report's forward
        assert tap.take() is None
        enc.train()
        enc(x)
        f = tap.take()
    assert f is not None and f.shape == (4, FEATURES)
