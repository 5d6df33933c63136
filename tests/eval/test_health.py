"""The label-free health signals against naive float64 computations, the chance level of each
method's logits against the project's own InfoNCE, the report on a fixed sample, and the
warnings: a collapsed encoder or a loss at chance is called out, a healthy one is not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from moco.core.loss import info_nce, moco_logits
from moco.core.mechanisms import end_to_end_logits
from moco.data.augment import pretrain_transform
from moco.data.recipes import CIFAR_MEAN, CIFAR_STD
from moco.data.source import ImageSource
from moco.eval.health import (
    RECORD_KEYS,
    HealthReport,
    HealthSample,
    alignment,
    chance_loss,
    chance_of_logits,
    default_sample_size,
    diagnose,
    effective_rank,
    encoder_health,
    normalized_std,
    report_of,
    uniformity,
)

CPU = torch.device("cpu")


def _unit_rows(z: np.ndarray) -> np.ndarray:
    return z / np.sqrt((z ** 2).sum(axis=1, keepdims=True))


def _random(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ----- the signals against naive float64 computations -----------------------------------------
def test_effective_rank_is_rankme_of_the_singular_values() -> None:
    z = _random(40, 12) * torch.linspace(0.1, 3.0, 12)  # uneven spectrum
    s = np.linalg.svd(z.double().numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    naive = math.exp(-sum(pk * math.log(pk) for pk in p))
    assert effective_rank(z) == pytest.approx(naive, rel=1e-9)
    assert effective_rank(z.float()) == pytest.approx(naive, rel=1e-5)


def test_effective_rank_limits() -> None:
    row = _random(1, 16)
    assert effective_rank(row.repeat(30, 1)) == pytest.approx(1.0, abs=1e-4)  # one direction
    assert effective_rank(torch.eye(16) * 5) == pytest.approx(16.0, rel=1e-4)  # all equal
    assert effective_rank(torch.zeros(8, 4)) == 0.0


def test_alignment_is_the_mean_distance_of_positive_pairs() -> None:
    x, y = _random(25, 7, 1), _random(25, 7, 2)
    a, b = _unit_rows(x.double().numpy()), _unit_rows(y.double().numpy())
    for alpha in (2.0, 1.0):
        naive = sum(math.sqrt(sum((a[i, j] - b[i, j]) ** 2 for j in range(7))) ** alpha
                    for i in range(25)) / 25
        assert alignment(x, y, alpha) == pytest.approx(naive, rel=1e-12)
    assert alignment(x, x * 3.0) == pytest.approx(0.0, abs=1e-12)  # same direction
    assert alignment(x, -x) == pytest.approx(4.0)  # antipodal


def test_uniformity_is_the_log_mean_gaussian_potential_over_all_pairs() -> None:
    x = _random(30, 5, 3)
    a = _unit_rows(x.double().numpy())
    pairs = [(i, j) for i in range(30) for j in range(30) if i != j]
    naive = math.log(sum(math.exp(-2.0 * float(((a[i] - a[j]) ** 2).sum())) for i, j in pairs)
                     / len(pairs))
    assert uniformity(x) == pytest.approx(naive, rel=1e-12)
    assert uniformity(_random(1, 5).repeat(10, 1)) == pytest.approx(0.0, abs=1e-12)
    # Spread over a high-dimensional sphere: every pair nearly orthogonal, about -2t = -4.
    assert uniformity(_random(400, 512)) == pytest.approx(-4.0, abs=0.1)


def test_normalized_std_is_the_mean_per_dimension_std_of_unit_rows() -> None:
    x = _random(50, 9, 4) + 0.5
    naive = _unit_rows(x.double().numpy()).std(axis=0, ddof=0).mean()
    assert normalized_std(x) == pytest.approx(naive, rel=1e-12)
    assert normalized_std(_random(1, 9).repeat(20, 1)) == pytest.approx(0.0, abs=1e-12)
    d = 64  # isotropic: about 1/sqrt(d)
    assert normalized_std(_random(4000, d)) * math.sqrt(d) == pytest.approx(1.0, abs=0.03)


# ----- the chance level of each method's logits -----------------------------------------------
def test_chance_level_is_the_loss_of_uniform_logits() -> None:
    for columns in (2, 128, 4097):
        uniform = torch.zeros(16, columns)
        assert info_nce(uniform).item() == pytest.approx(chance_loss(columns), rel=1e-6)
    assert chance_loss(4097) == pytest.approx(8.318, abs=1e-3)  # MoCo, K 4096
    assert chance_loss(128) == pytest.approx(4.852, abs=1e-3)  # end-to-end, batch 128
    assert chance_loss(4097, terms=2) == pytest.approx(2 * 8.3178, abs=1e-3)  # --symmetric
    t = 0.2  # MoCo v3: 2 terms scaled by 2t over the global batch
    assert chance_loss(4096, terms=2, scale=2 * t) == pytest.approx(4 * t * math.log(4096))


def test_chance_of_each_mechanisms_logits() -> None:
    n, c, k = 8, 16, 64
    q, kk = (nn.functional.normalize(_random(n, c, s), dim=1) for s in (5, 6))
    queue = nn.functional.normalize(_random(c, k, 7), dim=0)
    assert chance_of_logits(moco_logits(q, kk, queue, 0.2)) == pytest.approx(math.log(k + 1))
    assert chance_of_logits(end_to_end_logits(q, kk, 0.2)) == pytest.approx(math.log(n))


# ----- the report on a fixed sample ------------------------------------------------------------
def varied_images(n: int = 48, size: int = 32, seed: int = 0) -> ImageSource:
    """Images unlike each other: a random colour gradient, a random rectangle, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        img = a + b * xx[..., None] + c * yy[..., None] * rng.uniform(-1, 1)
        x0, y0 = rng.integers(0, size - 8, 2)
        img[y0:y0 + rng.integers(4, 16), x0:x0 + rng.integers(4, 16)] = rng.uniform(0, 255, 3)
        out[i] = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    return ImageSource(array=out, labels=[i % 4 for i in range(n)], classes=list("abcd"))


def _view() -> object:
    return pretrain_transform("cifar-demo", 32, 0.2, CIFAR_MEAN, CIFAR_STD)


class Constant(nn.Module):
    """A collapsed encoder: its output ignores the input."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x) * 0.0)


@pytest.fixture(scope="module")
def sample() -> HealthSample:
    return HealthSample(varied_images(), _view(), size=40, seed=0)  # type: ignore[arg-type]


def test_sample_is_fixed_across_calls_and_seeded(sample: HealthSample) -> None:
    first = [torch.cat(b) for b in sample.batches(16)]
    again = [torch.cat(b) for b in sample.batches(16)]  # from the cache
    fresh = HealthSample(varied_images(), _view(), size=40, seed=0, cache_bytes=0)  # type: ignore[arg-type]
    redrawn = [torch.cat(b) for b in fresh.batches(16)]
    for a, b, c in zip(first, again, redrawn, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = HealthSample(varied_images(), _view(), size=40, seed=1)  # type: ignore[arg-type]
    assert other.indices != sample.indices and len(sample) == 40
    v1, v2 = sample.pair(0)
    assert not torch.equal(v1, v2)  # two different augmentations


def test_default_sample_size_keeps_the_cost_small() -> None:
    assert default_sample_size(50_000) == 512
    assert default_sample_size(10_000) == 200
    assert default_sample_size(1_000) == 128
    assert default_sample_size(60) == 60


def test_random_resnet_is_healthy(sample: HealthSample) -> None:
    torch.manual_seed(0)
    enc = torchvision.models.resnet18(num_classes=128)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.train()
    rng = torch.get_rng_state()
    r = encoder_health(enc, sample, CPU, batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream untouched
    assert enc.training  # its mode restored
    for k, v in enc.state_dict().items():  # BN statistics and weights unchanged
        assert torch.equal(v, before[k]), k
    assert (r.images, r.dim, r.feature_dim) == (40, 128, 512)
    assert r.rank > 5 and r.rank_features is not None and r.rank_features > 5
    assert r.std_ratio > 0.1 and r.uniformity < -0.1 and 0 < r.alignment < 2
    assert diagnose(r) == []
    again = encoder_health(enc, sample, CPU, batch_size=7).to_record()  # any batch size
    assert again == pytest.approx({k: v for k, v in r.to_record().items() if v is not None},
                                  rel=1e-5)


def test_constant_encoder_is_collapsed(sample: HealthSample) -> None:
    r = encoder_health(Constant(), sample, CPU, batch_size=16)
    assert r.std_ratio == pytest.approx(0.0, abs=1e-6)
    assert r.rank == pytest.approx(1.0, abs=1e-3) and r.uniformity == pytest.approx(0, abs=1e-9)
    warnings = diagnose(r)
    assert len(warnings) == 1 and warnings[0].startswith("collapsed")
    assert "--lr" in warnings[0] and "--moco-t" in warnings[0]


def test_an_encoder_without_a_known_head_still_gets_a_report(sample: HealthSample) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 32))
    r = encoder_health(net, sample, CPU)
    assert r.rank_features is None and r.feature_dim is None and r.dim == 32


def test_well_spread_embedding_is_healthy() -> None:
    z = _random(256, 128)
    r = report_of(z, z + 0.1 * _random(256, 128, 1))
    assert r.std_ratio == pytest.approx(1.0, abs=0.05) and r.uniformity < -3.5
    assert diagnose(r) == []


def test_report_round_trips_through_metrics_json() -> None:
    r = report_of(_random(20, 8), _random(20, 8, 1), _random(20, 16, 2), chance=8.3)
    rec = json.loads(json.dumps({"epoch": 3, "loss": 7.0, **r.to_record()}))
    assert set(RECORD_KEYS) | {"loss_chance"} == set(r.to_record())
    back = HealthReport.from_record(rec)
    assert back is not None and back.rank == r.rank and back.rank_features == r.rank_features
    assert back.std_ratio == pytest.approx(r.std_ratio) and back.chance == 8.3 and back.loss == 7.0
    assert HealthReport.from_record({"epoch": 1, "loss": 5.0}) is None


# ----- the warnings from a run's history -------------------------------------------------------
CHANCE = math.log(4097)


def _history(losses: list[float], chance: float = CHANCE, **extra: object) -> list[dict[str, object]]:
    return [{"epoch": e, "loss": v, "loss_chance": chance, "acc1": 10.0, **extra}
            for e, v in enumerate(losses, 1)]


def test_loss_at_chance_is_stuck() -> None:
    r = report_of(_random(64, 16), _random(64, 16, 1), loss=CHANCE * 0.99, chance=CHANCE)
    assert [w.split(":")[0] for w in diagnose(r)] == ["stuck"]
    # MoCo v1 §4.1's m = 0 failure as the momentum ablation measured it: 8.21 at epoch 10.
    warnings = diagnose(_history([7.9, 8.3, 8.1, 8.25, 8.0, 8.3, 8.1, 8.2, 8.3, 8.21]))
    assert len(warnings) == 1 and warnings[0].startswith("stuck at epoch 10")
    assert "chance level 8.318" in warnings[0] and "--moco-m" in warnings[0]


def test_not_stuck_in_the_first_epochs() -> None:
    assert diagnose(_history([8.3, 8.31])) == []


def test_loss_above_chance_names_the_memory_bank_start() -> None:
    warnings = diagnose(_history([10.9, 10.7, 10.56]))
    assert len(warnings) == 1 and "above its chance level" in warnings[0]
    assert "memory bank" in warnings[0]


def test_flat_loss_near_chance_is_stuck() -> None:
    warnings = diagnose(_history([7.95, 7.96, 7.95, 7.94, 7.95]))  # 96 % of chance, flat
    assert len(warnings) == 1 and "has not moved for 5 epochs" in warnings[0]


def test_healthy_logs_are_not_flagged() -> None:
    # The authors' CIFAR-10 log (its first epochs rise before falling) ...
    authors = [6.9569, 7.2502, 7.2901, 7.0, 6.8622, 6.6, 6.4, 6.2, 6.1, 5.9910, 4.3413]
    assert diagnose(_history(authors)) == []
    # ... and the long CPU run of docs/long-cpu-run.md: a flat loss well below chance.
    assert diagnose(_history([6.53, 6.44, 6.40, 6.37, 6.47, 6.40, 6.41, 6.35, 6.42, 6.42])) == []


def test_pretext_task_solved_is_a_shortcut() -> None:
    h = _history([3.0, 2.0, 1.0])
    h[-1]["acc1"] = 99.9
    warnings = diagnose(h)
    assert len(warnings) == 1 and warnings[0].startswith("too easy")
    assert "--shuffle-bn" in warnings[0]


def test_falling_rank_is_collapsing() -> None:
    h = _history([7.0, 6.5, 6.0, 5.8])
    for rec, rank in zip(h, [40.0, 42.0, 20.0, 8.0], strict=True):
        z = _random(64, 16)
        rec.update(report_of(z, z).to_record())
        rec["health_rank"] = rank
    warnings = diagnose(h)
    assert len(warnings) == 1 and warnings[0].startswith("collapsing: effective rank fell")


def test_collapsed_record_in_history() -> None:
    h = _history([8.3, 8.3, 8.3])
    c = _random(1, 16).repeat(32, 1)
    h[-1].update(report_of(c, c).to_record())
    kinds = [w.split(":")[0].split(" at ")[0] for w in diagnose(h)]
    assert kinds == ["collapsed", "stuck"]


def test_knn_below_the_untrained_network_is_stuck() -> None:
    h = _history([7.0, 6.8, 6.6, 6.5, 6.4, 6.3], knn_random_init=36.97)
    h[-1]["knn_top1"] = 31.7
    warnings = diagnose(h)
    assert len(warnings) == 1 and "not above the untrained network's 36.97%" in warnings[0]
    h[-1]["knn_top1"] = 40.0
    assert diagnose(h) == []


def test_a_long_run_may_dip_under_the_untrained_knn_for_a_quarter_of_its_epochs() -> None:
    """The README's small-data recipe on 500 photographs (docs/own-images.md: 15 steps an
    epoch) reads under the untrained network's 20.70% until epoch 7 of 40, then learns (32.6%):
    the kNN is judged from a quarter of the planned epochs (10), or epoch 6 in short runs."""
    curve = [19.3, 18.8, 18.0, 19.3, 20.3, 21.0, 20.2, 22.4, 23.2, 19.9]
    h = _history([4.4 - 0.01 * e for e in range(len(curve))], chance=4.86,
                 knn_random_init=20.7)
    for rec, knn in zip(h, curve, strict=True):
        rec["knn_top1"] = knn
    assert [w.split(":")[0] for w in diagnose(h[:7])] == ["stuck"]  # epochs unknown: from 6
    for e in (7, 9):
        assert diagnose(h[:e], epochs=40) == [], e
    [said] = diagnose(h, epochs=40)  # epoch 10 of 40, under the untrained network: warned
    assert "kNN top-1 19.90% at epoch 10 is not above the untrained network's 20.70%" in said
    assert [w.split(":")[0] for w in diagnose(h[:7], epochs=8)] == ["stuck"]
    for rec in h:  # ImageNet-sized epochs: 200 planned, 5,000 steps each: judged from epoch 6
        rec["step"] = 5000 * int(rec["epoch"])  # type: ignore[call-overload]
    assert [w.split(":")[0] for w in diagnose(h[:7], epochs=200)] == ["stuck"]
    for rec in h:  # the recipe's 15-step epochs: judged from epoch 10 (of 40), not 134
        rec["step"] = 15 * int(rec["epoch"])  # type: ignore[call-overload]
    assert diagnose(h[:9], epochs=40) == [] and len(diagnose(h, epochs=40)) == 1
