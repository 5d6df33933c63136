"""An online linear probe: a linear classifier trained on the detached backbone features of
the pretraining's own forward passes, as solo-learn's and lightly's online classifiers, so
that the linear accuracy of the features can be watched during pretraining at almost no cost.

It cannot change the pretraining, by construction:

* it reads features that are detached (:class:`~moco.eval.feature_tap.HeadInputTap` records
  the head's input of the query encoder's forward; nothing flows back);
* its parameters and its optimizer are its own, never in the pretraining's optimizer;
* it draws no random number from torch's generator: its weights are initialised from its own
  seeded generator (N(0, 0.01), bias 0, as ``main_lincls.py``'s classifier) and its steps are
  deterministic.

The classifier is ``Linear(BatchNorm1d(normalize(features)))``: the features are
L2-normalised (as the kNN monitor's, so :meth:`OnlineProbe.evaluate` can take the monitor's
features as they are) and standardised per dimension by a BatchNorm without affine
parameters (as MAE's linear probing, He et al. 2022, App. A.2), which keeps one learning rate
right while the features drift during pretraining. Train accuracy is on the augmented
training views; :meth:`OnlineProbe.evaluate` gives the accuracy on held-out images
(evaluation transform, eval mode), the figure to log. Under torchrun, train the probe on one
process (rank 0) only: its state is not synchronised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco.core.errors import ConfigError
from moco.core.seeding import seeded, stream_generator

#: Seed offset of the probe's initial weights from the run's ``--seed`` (no training stream
#: draws from this generator).
PROBE_SEED_OFFSET = 26


@dataclass
class ProbeStep:
    """One probe step: its cross-entropy and train acc@1 (%) as 0-d tensors on the device
    (not read back: the loop reads them at log points), and the labeled images it used."""

    loss: torch.Tensor
    acc1: torch.Tensor
    images: int


class OnlineProbe:
    """A linear classifier of ``feature_dim`` features into ``num_classes`` classes, trained
    by its own SGD (``lr``, ``momentum``, ``weight_decay``; constant lr) on ``device``.

    Labels of -1 (unlabeled images) are left out of every step and evaluation."""

    def __init__(self, feature_dim: int, num_classes: int, *, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if feature_dim < 1 or num_classes < 2:
            raise ConfigError(f"the online probe needs features and at least 2 classes, got "
                              f"{feature_dim} features and {num_classes} classes")
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ConfigError(f"online probe: expected lr > 0, 0 <= momentum < 1, weight decay "
                              f">= 0; got {lr}, {momentum}, {weight_decay}")
        self.device = torch.device(device)
        with seeded(seed):  # the layers' default init draws from the global generator
            norm = nn.BatchNorm1d(feature_dim, affine=False)
            linear = nn.Linear(feature_dim, num_classes)
        with torch.no_grad():
            g = stream_generator(seed, PROBE_SEED_OFFSET)
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.01)
            linear.bias.zero_()
        self.net = nn.Sequential(norm, linear).to(self.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.steps = 0
        self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, correct
        self._images = 0  # labeled images of the steps summed (known on the host)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features.detach().to(self.device, torch.float32).flatten(1), dim=1)
        with torch.autocast(self.device.type, enabled=False):
            logits: torch.Tensor = self.net(x)
        return logits

    def step(self, features: torch.Tensor, labels: torch.Tensor, *,
             all_labeled: bool = False) -> ProbeStep | None:
        """One SGD step on ``features`` [B, D] (detached here in any case) and ``labels`` [B]
        (-1: unlabeled, left out); None when no image of the batch is labeled or fewer than
        two are (BatchNorm needs two). ``all_labeled``: the caller knows that no label is -1
        (a labeled training set), so no mask is applied: nothing is read back from the device
        (selecting the labeled rows of a partly labeled batch waits for the device)."""
        labels = labels.to(self.device)
        x, y = features, labels
        if not all_labeled:
            keep = labels >= 0
            x, y = features[keep.to(features.device)], labels[keep]
        if x.shape[0] < 2:
            return None
        self.net.train()
        with torch.enable_grad():
            logits = self._logits(x)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        correct = (logits.detach().argmax(1) == y).sum()
        n = int(y.shape[0])
        self._sums += torch.stack([loss.detach().double() * n, correct.double()])
        self._images += n
        self.steps += 1
        return ProbeStep(loss.detach(), correct.float() * (100.0 / n), n)

    def epoch_metrics(self) -> dict[str, float | None]:
        """``probe_loss`` and ``probe_train_top1`` (%) over the steps since the last call
        (None without any), and start the next epoch's sums. Reads the device."""
        loss, correct = self._sums.tolist()
        n, self._images = self._images, 0
        self._sums.zero_()
        if n == 0:
            return {"probe_loss": None, "probe_train_top1": None}
        return {"probe_loss": loss / n, "probe_train_top1": 100.0 * correct / n}

    @torch.no_grad()
    def evaluate(self, features: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 8192) -> float | None:
        """Top-1 accuracy (%) of the probe on held-out ``features`` [N, D] (raw or
        L2-normalised, e.g. the kNN monitor's query features) with ``labels`` [N]; None
        without labeled images. Eval mode: BatchNorm uses its running statistics."""
        self.net.eval()
        keep = labels >= 0
        x, y = features[keep.to(features.device)], labels[keep].to(self.device)
        if x.shape[0] == 0:
            return None
        correct = 0
        for s in range(0, x.shape[0], batch_size):
            pred = self._logits(x[s:s + batch_size]).argmax(1)
            correct += int((pred == y[s:s + batch_size]).sum())
        return 100.0 * correct / x.shape[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: weights, BatchNorm statistics, the optimizer's
        momentum buffers, the step count and the current epoch's sums (tensors and numbers
        only: loadable with ``torch.load(weights_only=True)``)."""
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps,
                "sums": torch.cat([self._sums.detach().cpu(),  # loss, correct, images
                                   torch.tensor([float(self._images)], dtype=torch.float64)])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a probe of the same sizes). Another probe's
        state is a :class:`ConfigError` and changes nothing."""
        own, saved = self.net.state_dict(), state.get("net", {})
        if set(saved) != set(own) or any(saved[k].shape != v.shape for k, v in own.items()):
            shapes = {k: tuple(v.shape) for k, v in saved.items() if k.endswith("weight")}
            raise ConfigError(f"the online probe's saved state does not fit this probe of "
                              f"{self.feature_dim} features and {self.num_classes} classes "
                              f"(saved: {shapes}); it was saved for other features or classes")
        self.net.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        sums = state["sums"].to(torch.float64)
        self._sums = sums[:2].to(self.device).clone()
        self._images = int(sums[2])


def label_table(labels: list[int] | None, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The training set's labels as a tensor [N] on ``device``, to look a batch's labels up
    by its dataset indices (``table[batch.index]``); None for an unlabeled set."""
    if labels is None:
        return None
    return torch.as_tensor(labels, dtype=torch.long, device=device)
