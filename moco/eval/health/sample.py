"""The health report of an encoder on a fixed small sample of its training images.

:class:`HealthSample` picks ``size`` images of the training set once (a seeded draw) and two
augmented views of each, drawn from per-image seeds: every call sees the same images and the
same views, so the signals of successive epochs differ only by the encoder.
:func:`encoder_health` runs the encoder on them (eval mode, no gradient) and returns the
:class:`~moco.eval.health.report.HealthReport`.

Cost: two forward passes per sample image, without gradient, against an epoch's N training
pairs, each a forward with backward of the query and a forward of the key (about four
forward passes): about size / (2 N) of an epoch's compute, 0.5 % for 512 images of CIFAR-10's
50,000 (:func:`default_sample_size` keeps it near 1 %). The views are augmented once and kept
when they fit in ``cache_bytes`` (CIFAR-sized images), else redrawn from their seeds at each
call (the same tensors).

Nothing here draws from torch's global generator (the views' draws run under
:func:`moco.core.seeding.seeded`, which restores it): a run with the report computes the
same steps as one without.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from PIL import Image
from torch import nn

from moco.core.errors import ConfigError
from moco.core.seeding import keyed_generator, keyed_seed
from moco.data.augment import TwoViews
from moco.data.source import ImageSource, load_checked
from moco.eval.feature_tap import HeadInputTap
from moco.eval.health.report import HealthReport, report_of

#: The most images a sample holds by default (RankMe needs N >= D for a D-dim embedding).
MAX_SAMPLE = 512
MIN_SAMPLE = 128


class _Images(Protocol):
    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image: ...


def default_sample_size(train_images: int, fraction: float = 0.02) -> int:
    """Sample images for a training set of ``train_images``: ``fraction`` of it (2 %: about
    1 % of an epoch's compute, see the module docstring), at least 128 (or all) and at most
    512."""
    return max(min(MAX_SAMPLE, int(train_images * fraction)), min(MIN_SAMPLE, train_images))


class HealthSample:
    """A fixed sample of ``size`` images of ``source`` (:class:`~moco.data.source.ImageSource`
    or anything with ``len`` and ``load(i) -> PIL image``), and two views of each through
    ``view`` (one view's training transform, e.g. :func:`moco.data.augment.pretrain_transform`).

    The indices are drawn once from ``seed`` (:attr:`indices`, sorted); the views of image i
    from ``keyed_seed("moco-health-views", seed, i)``. An unreadable image follows
    ``on_bad_image`` (``stop`` or ``skip``: :func:`moco.data.source.load_checked`)."""

    def __init__(self, source: _Images, view: Callable[[Image.Image], torch.Tensor], *,
                 size: int = MAX_SAMPLE, seed: int = 0, on_bad_image: str = "stop",
                 cache_bytes: int = 256 * 2**20) -> None:
        if size < 2 or len(source) < 2:
            raise ConfigError(f"the health sample needs at least 2 images, got size {size} of "
                              f"{len(source)} training images")
        n = min(size, len(source))
        order = torch.randperm(len(source), generator=keyed_generator("moco-health", seed))
        self.indices: list[int] = sorted(order[:n].tolist())
        self.source, self.seed, self.policy = source, seed, on_bad_image
        self.two_views = TwoViews(view)
        self.cache_bytes = cache_bytes
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def pair(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views [3, S, S] of the sample's j-th image (the same at every call)."""
        i = self.indices[j]
        if isinstance(self.source, ImageSource):
            img, _ = load_checked(self.source, i, self.policy)
        else:
            img = self.source.load(i)
        return self.two_views(img, keyed_seed("moco-health-views", self.seed, i))

    def _draw(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.pair(j) for j in range(start, stop)]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The views in batches: ``(view 1 [B,3,S,S], view 2 [B,3,S,S])``, sample order."""
        if self._cache is not None:
            v1, v2 = self._cache
            for s in range(0, len(self), batch_size):
                yield v1[s:s + batch_size], v2[s:s + batch_size]
            return
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        keep: bool | None = None
        for s in range(0, len(self), batch_size):
            b = self._draw(s, min(s + batch_size, len(self)))
            if keep is None:  # both views of every image, float32
                keep = len(self) * 2 * b[0][0].numel() * 4 <= self.cache_bytes
            if keep:
                parts.append(b)
            yield b
        if keep:
            self._cache = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def _encode(encoder: nn.Module, x: torch.Tensor, device: torch.device,
            autocast_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        return encoder(x).float()


@torch.no_grad()
def encoder_health(encoder: nn.Module, sample: HealthSample, device: torch.device, *,
                   batch_size: int = 256, autocast_dtype: torch.dtype | None = None,
                   channels_last: bool = False, loss: float | None = None,
                   chance: float | None = None) -> HealthReport:
    """The :class:`~moco.eval.health.report.HealthReport` of ``encoder`` (images -> embeddings
    [B, D]: the query encoder f_q with its head) on ``sample``: embeddings of both views,
    and the features entering its head (RankMe of the representation) when the head can be
    told apart. The encoder runs in eval mode (BN with its running statistics, as the kNN
    monitor) and is put back in its mode afterwards; nothing in it changes. ``loss`` and
    ``chance``: the epoch's training loss and its chance level, carried into the report."""
    was_training = encoder.training
    encoder.eval()
    try:
        tap: HeadInputTap | None = HeadInputTap(encoder)
    except ConfigError:
        tap = None
    z1s, z2s, feats = [], [], []
    try:
        for v1, v2 in sample.batches(batch_size):
            z1s.append(_encode(encoder, v1, device, autocast_dtype, channels_last).cpu())
            f = tap.take() if tap is not None else None
            if f is not None:
                feats.append(f.float().flatten(1).cpu())
            z2s.append(_encode(encoder, v2, device, autocast_dtype, channels_last).cpu())
            if tap is not None:
                tap.take()
    finally:
        encoder.train(was_training)
        if tap is not None:
            tap.close()
    features = torch.cat(feats) if feats and len(feats) == len(z1s) else None
    return report_of(torch.cat(z1s), torch.cat(z2s), features, loss=loss, chance=chance)
