"""One optimisation step and the epoch's running metrics, kept on the training device.

Reading a GPU tensor into Python (``float()``, ``.item()``, ``if tensor:``) makes the host wait
until the GPU has finished everything queued before it. Done every step, the GPU idles while
the host prepares the next step. So the step returns its loss and pretext accuracy as 0-d
device tensors, :class:`EpochMeter` sums them on the device, and the training loop reads them
only at log points (every ``--print-freq`` steps, before a save, at the end of an epoch). The
divergence guard still names the step: the meter records the first step whose loss was not
finite, on the device, and the loop raises when it reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moco.core.device import to_device
from moco.core.shuffle_bn import KeyShuffle
from moco.data.batches import Batch

Scalar = torch.Tensor | float


@dataclass
class StepResult:
    """The step's loss, pretext acc@1 (%; None when the method gives no logits) and the
    method's other metrics: 0-d tensors on the device (or Python floats)."""

    loss: Scalar
    acc1: Scalar | None
    metrics: dict[str, Scalar] = field(default_factory=dict)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    shuffle: KeyShuffle,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimisation step of the method ``model`` (a
    :class:`~moco.core.method_base.PretrainingMethod`, or its DDP wrapper) on a batch of two
    views [B,3,H,W] already on the device. Nothing is read back to the host (except by fp16's
    grad scaler, which checks for inf/NaN). The dataset indices [B] join the views on their
    device in a non-blocking copy from pinned memory (a CPU tensor handed to a
    DistributedDataParallel model would be copied with a blocking ``.to(device)`` every step)."""
    index = to_device(batch.index, batch.im_q.device)
    with torch.autocast(batch.im_q.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        out = model(batch.im_q, batch.im_k, shuffle, index)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        out.loss.backward()
        optimizer.step()
    metrics: dict[str, Scalar] = {k: v.detach() for k, v in out.metrics.items()}
    return StepResult(out.loss.detach(), out.accuracy(), metrics)


@dataclass(frozen=True)
class Divergence:
    """The first step whose loss was not finite: its global step (1-based) and loss."""

    global_step: int
    loss: float


class EpochMeter:
    """Sums of the steps' losses, accuracies and metrics (float64, on ``device``) and the
    first non-finite loss. The sums start from a resumed epoch's partial sums; the float64
    sums equal the Python-float sums of the same values, so a resumed run logs the same means
    as an uninterrupted one. A step without an accuracy makes the accuracy sum NaN (the
    epoch's ``acc1`` is then None)."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, acc_sum: float = 0.0,
                 metric_sums: dict[str, float] | None = None) -> None:
        self.device = device
        self._loss = self._f64(loss_sum)
        self._acc = self._f64(acc_sum)
        self._metrics = {k: self._f64(v) for k, v in (metric_sums or {}).items()}
        self._bad_step = torch.tensor(-1, dtype=torch.int64, device=device)
        self._bad_loss = self._f64(0.0)

    def _f64(self, x: Scalar) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float64, device=self.device)

    def add(self, r: StepResult, global_step: int) -> None:
        """Count step ``global_step`` (1-based) without reading anything back."""
        loss = self._f64(r.loss)
        self._loss += loss
        self._acc += self._f64(r.acc1 if r.acc1 is not None else float("nan"))
        for k, v in r.metrics.items():
            self._metrics[k] = self._metrics[k] + self._f64(v) if k in self._metrics else self._f64(v)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, global_step, self._bad_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def sums(self) -> tuple[float, float]:
        """(loss sum, accuracy sum) as Python floats: waits for the device."""
        both = torch.stack([self._loss, self._acc]).tolist()
        return float(both[0]), float(both[1])

    def metric_sums(self) -> dict[str, float]:
        """The sums of the method's metrics, by name: waits for the device."""
        if not self._metrics:
            return {}
        values = torch.stack(list(self._metrics.values())).tolist()
        return dict(zip(self._metrics, (float(v) for v in values), strict=True))

    def divergence(self) -> Divergence | None:
        """The first non-finite step counted so far, or None: waits for the device."""
        step = int(self._bad_step)
        return Divergence(step, float(self._bad_loss)) if step >= 0 else None
