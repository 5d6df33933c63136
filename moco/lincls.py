"""Linear classification on frozen features: the protocol of ``main_lincls.py`` (REFERENCE.md §8).

Set-up, in the original's order (§8.2): the torchvision network with a new ``fc``
(D -> classes), every parameter but ``fc.weight``/``fc.bias`` frozen, ``fc`` initialised
N(0, 0.01) with zero bias, the pretrained query encoder loaded (its head dropped; exactly
``fc.weight`` and ``fc.bias`` missing), SGD over the 2 ``fc`` tensors (lr 30, momentum 0.9,
wd 0). Training (§8.3): the whole model in ``eval()`` mode (BN keeps the pretrained
statistics), batch 256, 100 epochs, lr x0.1 at epochs 60 and 80 (or cosine with ``cos``),
RandomResizedCrop (scale 0.08-1) + flip; validation with resize + center crop; top-1/top-5
after every epoch; ``checkpoint.pth.tar`` (last) and ``model_best.pth.tar`` in the original
layout (``epoch``, ``arch``, ``state_dict`` with ``module.`` keys, ``best_acc1``,
``optimizer``). After the first trained epoch :func:`sanity_check` verifies that no backbone
tensor changed (§8.4).

``fast`` mode (for CPUs): the frozen backbone's features of every train and val image are
computed once, without augmentation (resize + center crop), and the same ``fc``, optimizer,
batch and schedule are trained on them. It skips the per-epoch forward of the backbone, so
an epoch costs a few matrix products; the price is no crop/flip augmentation of the train
set, which usually lowers the accuracy a little.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from moco.augment import eval_transform
from moco.backbones import build_backbone
from moco.checkpoint import CheckpointError, atomic_save, load_checkpoint, model_state
from moco.data import DataError, EvalDataset, ImageSource, find_dataset
from moco.pretrained import (
    PretrainedInfo,
    default_workers,
    describe_encoder,
    extract_into,
    read_encoder,
    resolve_device,
)
from moco.schedule import learning_rate

Log = Callable[[str], None]
LAST = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"


class SanityCheckError(RuntimeError):
    """The frozen backbone changed during linear training (it must not, REFERENCE.md §8.4)."""


@dataclass
class LinclsConfig:
    """Settings of a linear-classification run; defaults are ``main_lincls.py``'s (§8.1)."""

    data: str
    pretrained: str = ""
    arch: str | None = None
    epochs: int = 100
    batch_size: int = 256
    lr: float = 30.0
    schedule: list[int] = field(default_factory=lambda: [60, 80])
    cos: bool = False
    momentum: float = 0.9
    wd: float = 0.0
    workers: int = -1
    seed: int = 0
    device: str = "auto"
    output: str = "runs/lincls"
    resume: str = ""
    evaluate: bool = False
    fast: bool = False
    image_size: int | None = None
    overwrite: bool = False

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr >= 0 and self.wd >= 0, "--lr and --wd must be >= 0"),
            (self.image_size is None or self.image_size >= 8, "--image-size must be >= 8"),
            (bool(self.pretrained or self.resume),
             "give --pretrained CKPT (a MoCo checkpoint) or --resume a linear checkpoint"),
            (not self.evaluate or bool(self.resume),
             "-e/--evaluate needs --resume with a checkpoint written by moco lincls"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class LinclsResult:
    run_dir: Path
    best_acc1: float
    last: dict[str, Any] | None
    history: list[dict[str, Any]]


def train_transform(image_size: int, mean: Iterable[float], std: Iterable[float]) -> T.Compose:
    """``main_lincls.py``'s train augmentation: RandomResizedCrop (default scale 0.08-1) and a
    horizontal flip (REFERENCE.md §8.3)."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean=list(mean), std=list(std))])


def build_linear_model(info: PretrainedInfo, backbone: dict[str, torch.Tensor], num_classes: int,
                       seed: int = 0) -> nn.Module:
    """The frozen network with a fresh ``fc`` (REFERENCE.md §8.2, steps 1-4).

    Returns a torchvision-style model ([B,3,H,W] -> logits [B, num_classes]) whose only
    trainable tensors are ``fc.weight`` ~ N(0, 0.01) and ``fc.bias`` = 0.
    """
    model = build_backbone(info.arch, cifar_stem=info.cifar_stem).model
    model.fc = nn.Linear(info.backbone_dim, num_classes)
    for name, p in model.named_parameters():
        if name not in ("fc.weight", "fc.bias"):
            p.requires_grad = False
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=g) * 0.01)
        model.fc.bias.zero_()
    msg = model.load_state_dict(backbone, strict=False)
    if set(msg.missing_keys) != {"fc.weight", "fc.bias"} or msg.unexpected_keys:
        raise CheckpointError(f"the pretrained weights do not fit {info.arch}: missing "
                              f"{msg.missing_keys[:4]}, unexpected {msg.unexpected_keys[:4]}")
    return model


def linear_optimizer(model: nn.Module, lr: float, momentum: float, wd: float) -> torch.optim.SGD:
    """SGD over the parameters that require grad: exactly ``fc.weight`` and ``fc.bias``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != 2:
        raise RuntimeError(f"expected 2 trainable tensors (fc weight and bias), found {len(params)}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


def set_frozen_mode(model: nn.Module) -> None:
    """The whole model in ``eval()``: BN uses and keeps the pretrained statistics (§8.3)."""
    model.eval()


def sanity_check(state_dict: dict[str, torch.Tensor], pretrained: str | Path) -> None:
    """``main_lincls.py``'s ``sanity_check`` (REFERENCE.md §8.4).

    Reloads ``pretrained`` and checks that every tensor of ``state_dict`` except the ones
    named ``fc.weight``/``fc.bias`` equals the pretrained query encoder's tensor of the same
    name, exactly (BN running statistics and ``num_batches_tracked`` included). Raises
    :class:`SanityCheckError` naming the tensors that changed.
    """
    pre = read_encoder(pretrained).state
    changed: list[str] = []
    for k, v in state_dict.items():
        if "fc.weight" in k or "fc.bias" in k:
            continue
        name = k[len("module."):] if k.startswith("module.") else k
        ref = pre.get(name)
        if ref is None or ref.shape != v.shape or not torch.equal(v.detach().cpu(), ref):
            changed.append(name)
    if changed:
        raise SanityCheckError(
            f"{len(changed)} backbone tensor(s) differ from the pretrained checkpoint {pretrained}"
            f" (e.g. {', '.join(changed[:5])}): the backbone must stay frozen and in eval mode "
            "during linear classification")


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of rows whose target is among the top-k logits, for each k (k capped at the
    number of classes). logits [B, C], target [B]."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == target[:, None]
    return [int(hit[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


class LinearClassification:
    """One ``moco lincls`` run. ``run()`` trains (or evaluates) and returns the result."""

    def __init__(self, cfg: LinclsConfig, *, log: Log = print, progress: bool = True) -> None:
        cfg.validate()
        self.cfg, self.log, self.progress = cfg, log, progress
        self.device = resolve_device(cfg.device)
        self.workers = cfg.workers if cfg.workers >= 0 else default_workers(self.device)
        self.run_dir = Path(cfg.output)
        splits = find_dataset(cfg.data)
        if not splits.train.labeled:
            raise DataError(f"{cfg.data}/train is unlabeled: linear classification needs one "
                            "sub-folder per class")
        if splits.test is None or not splits.test.labeled:
            raise DataError(f"{cfg.data} has no labeled val/ or test/ split to evaluate on")
        if splits.train.classes != splits.test.classes:
            raise DataError(f"the classes of {cfg.data}/train and its val/test split differ: "
                            f"{splits.train.classes[:5]} vs {splits.test.classes[:5]}")
        self.train_source: ImageSource = splits.train
        self.val_source: ImageSource = splits.test
        self.classes = splits.train.classes
        self.start_epoch = 0
        self.best_acc1 = 0.0
        resume_ckpt = self._read_resume() if cfg.resume else None
        if cfg.pretrained:
            w = read_encoder(cfg.pretrained)
            self.info = describe_encoder(w, cfg.arch, cfg.pretrained)
            backbone = w.backbone
        else:
            assert resume_ckpt is not None
            w = read_encoder(cfg.resume)
            self.info = describe_encoder(w, cfg.arch, cfg.resume)
            backbone = w.backbone
        if resume_ckpt is not None:
            ours = resume_ckpt.get("moco", {})
            for key in ("image_size", "mean", "std"):
                if key in ours:
                    setattr(self.info, key, tuple(ours[key]) if key != "image_size" else ours[key])
        self.image_size = cfg.image_size or self.info.image_size
        self.model = build_linear_model(self.info, backbone, len(self.classes), cfg.seed)
        self.optimizer = linear_optimizer(self.model, cfg.lr, cfg.momentum, cfg.wd)
        if resume_ckpt is not None:
            self._load_resume(resume_ckpt)
        self.model.to(self.device)
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    st[k] = v.to(self.device)
        self.history: list[dict[str, Any]] = []

    @property
    def fc(self) -> nn.Module:
        """The linear layer: features [B, D] -> logits [B, classes]."""
        fc = self.model.fc
        assert isinstance(fc, nn.Module)
        return fc

    # ----- checkpoints --------------------------------------------------------------------
    def _read_resume(self) -> dict[str, Any]:
        path = Path(self.cfg.resume)
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.get("state_dict"), dict) or "best_acc1" not in ckpt:
            raise CheckpointError(f"{path} is not a linear-classification checkpoint (no "
                                  "best_acc1); pass a MoCo checkpoint as --pretrained instead")
        return ckpt

    def _load_resume(self, ckpt: dict[str, Any]) -> None:
        state = {(k[len("module."):] if k.startswith("module.") else k): v
                 for k, v in model_state(ckpt, self.cfg.resume).items()}
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{self.cfg.resume} does not fit this model ({self.info.arch}, "
                                  f"{len(self.classes)} classes): "
                                  f"{str(e).splitlines()[1].strip()}") from None
        if "optimizer" in ckpt and not self.cfg.evaluate:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch = int(ckpt.get("epoch", 0))
        self.best_acc1 = float(ckpt["best_acc1"])
        self.log(f"resumed from {self.cfg.resume}: epoch {self.start_epoch}, best acc@1 "
                 f"{self.best_acc1:.2f}")

    def checkpoint_dict(self, epoch: int) -> dict[str, Any]:
        """The original lincls layout (§8.3) plus our ``moco`` entry."""
        return {
            "epoch": epoch,
            "arch": self.info.arch,
            "state_dict": {f"module.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()},
            "best_acc1": self.best_acc1,
            "optimizer": self.optimizer.state_dict(),
            "moco": {"format": 1, "kind": "lincls", "config": asdict(self.cfg),
                     "classes": list(self.classes), "cifar_stem": self.info.cifar_stem,
                     "image_size": self.image_size, "mean": list(self.info.mean),
                     "std": list(self.info.std), "pretrained": self.cfg.pretrained},
        }

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        exists = (self.run_dir / LAST).exists() or metrics.exists()
        if self.cfg.resume:
            kept = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()
                    ] if metrics.exists() else []
            kept = [h for h in kept if h.get("epoch", 0) <= self.start_epoch]
            metrics.write_text("".join(json.dumps(h) + "\n" for h in kept))
            self.history = kept
        elif exists and not self.cfg.overwrite:
            raise ValueError(f"{self.run_dir} already holds a linear-classification run; pass "
                             "--resume to continue it, --overwrite to replace it, or choose "
                             "another --output")
        else:
            metrics.unlink(missing_ok=True)
            (self.run_dir / BEST).unlink(missing_ok=True)
        (self.run_dir / "lincls.json").write_text(json.dumps(asdict(self.cfg), indent=1) + "\n")

    # ----- data ---------------------------------------------------------------------------
    def _eval_tf(self) -> T.Compose:
        return eval_transform(self.image_size, self.info.mean, self.info.std)

    def _loader(self, source: ImageSource, transform: Any, shuffle: bool, epoch: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return DataLoader(EvalDataset(source, transform), batch_size=self.cfg.batch_size,
                          shuffle=shuffle, generator=g, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", drop_last=False)

    # ----- one epoch ----------------------------------------------------------------------
    def _step(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()) * len(y), accuracy(logits.detach(), y, (1,))[0]

    def _train_epoch_images(self, epoch: int) -> tuple[float, float]:
        set_frozen_mode(self.model)
        loader = self._loader(self.train_source, train_transform(
            self.image_size, self.info.mean, self.info.std), True, epoch)
        loss_sum, correct, n = 0.0, 0, 0
        with tqdm(total=len(self.train_source), desc=f"train {epoch + 1}", unit="img", leave=False,
                  disable=not self.progress, dynamic_ncols=True) as bar:
            for x, y in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device)
                ls, c = self._step(self.model(x), y)
                loss_sum, correct, n = loss_sum + ls, correct + c, n + len(y)
                bar.update(len(y))
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc1=f"{100 * correct / n:.1f}")
        return loss_sum / n, 100.0 * correct / n

    def _train_epoch_features(self, epoch: int, feats: torch.Tensor, labels: torch.Tensor
                              ) -> tuple[float, float]:
        set_frozen_mode(self.model)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(labels), generator=g)
        loss_sum, correct = 0.0, 0
        fc = self.fc
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start:start + self.cfg.batch_size]
            x, y = feats[idx].to(self.device), labels[idx].to(self.device)
            ls, c = self._step(fc(x), y)
            loss_sum, correct = loss_sum + ls, correct + c
        return loss_sum / len(labels), 100.0 * correct / len(labels)

    @torch.no_grad()
    def validate(self, feats: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, float]:
        """Top-1 and top-5 accuracy (%) on the val split (on cached features when given)."""
        set_frozen_mode(self.model)
        c1 = c5 = n = 0
        if feats is not None:
            x_all, y_all = feats
            for start in range(0, len(y_all), 4096):
                x = x_all[start:start + 4096].to(self.device)
                y = y_all[start:start + 4096].to(self.device)
                a1, a5 = accuracy(self.fc(x), y)
                c1, c5, n = c1 + a1, c5 + a5, n + len(y)
        else:
            with tqdm(total=len(self.val_source), desc="val", unit="img", leave=False,
                      disable=not self.progress, dynamic_ncols=True) as bar:
                for x, y in self._loader(self.val_source, self._eval_tf(), False):
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device)
                    a1, a5 = accuracy(self.model(x), y)
                    c1, c5, n = c1 + a1, c5 + a5, n + len(y)
                    bar.update(len(y))
        return 100.0 * c1 / n, 100.0 * c5 / n

    def _features(self, source: ImageSource, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen pooled features [N, D] and labels [N] of ``source`` (no augmentation)."""
        fc = self.model.fc
        self.model.fc = nn.Identity()
        try:
            with tqdm(total=len(source), desc=desc, unit="img", leave=False,
                      disable=not self.progress, dynamic_ncols=True) as bar:
                return extract_into(self.model, self._loader(source, self._eval_tf(), False),
                                    len(source), self.device, progress=bar)
        finally:
            self.model.fc = fc

    # ----- run ----------------------------------------------------------------------------
    def run(self) -> LinclsResult:
        cfg = self.cfg
        if cfg.evaluate:
            acc1, acc5 = self.validate()
            self.log(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
            rec = {"epoch": self.start_epoch, "acc1": acc1, "acc5": acc5}
            return LinclsResult(self.run_dir, self.best_acc1, rec, [rec])
        self._prepare_run_dir()
        i = self.info
        self.log(f"linear classification{' (fast: cached features)' if cfg.fast else ''}: "
                 f"{i.arch}{' (CIFAR stem)' if i.cifar_stem else ''} from {cfg.pretrained or cfg.resume} "
                 f"({i.layout}), {len(self.classes)} classes, {len(self.train_source)} train / "
                 f"{len(self.val_source)} val images at {self.image_size} px, lr {cfg.lr}, batch "
                 f"{cfg.batch_size}, {cfg.epochs} epochs, device {self.device} -> {self.run_dir}")
        train_feats = val_feats = None
        if cfg.fast and self.start_epoch < cfg.epochs:
            t0 = time.perf_counter()
            train_feats = self._features(self.train_source, "train features")
            val_feats = self._features(self.val_source, "val features")
            self.log(f"features of {len(self.train_source) + len(self.val_source)} images in "
                     f"{time.perf_counter() - t0:.1f} s")
        last: dict[str, Any] | None = None
        bar = tqdm(total=cfg.epochs, initial=self.start_epoch, desc="lincls", unit="epoch",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                lr = learning_rate(cfg.lr, epoch, cfg.epochs, cos=cfg.cos, milestones=cfg.schedule)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                t0 = time.perf_counter()
                if train_feats is not None:
                    loss, train_acc1 = self._train_epoch_features(epoch, *train_feats)
                else:
                    loss, train_acc1 = self._train_epoch_images(epoch)
                if not math.isfinite(loss):
                    raise RuntimeError(f"the loss became {loss} at epoch {epoch + 1}: lower --lr")
                acc1, acc5 = self.validate(val_feats)
                is_best = acc1 > self.best_acc1
                self.best_acc1 = max(acc1, self.best_acc1)
                last = {"epoch": epoch + 1, "lr": lr, "loss": loss, "train_acc1": train_acc1,
                        "acc1": acc1, "acc5": acc5, "best_acc1": self.best_acc1,
                        "seconds": time.perf_counter() - t0, "fast": cfg.fast}
                self.history.append(last)
                with (self.run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(last) + "\n")
                atomic_save(self.checkpoint_dict(epoch + 1), self.run_dir / LAST)
                if is_best:
                    shutil.copyfile(self.run_dir / LAST, self.run_dir / BEST)
                if epoch == self.start_epoch and cfg.pretrained:
                    sanity_check(self.model.state_dict(), cfg.pretrained)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc1=f"{acc1:.2f}", acc5=f"{acc5:.2f}",
                                best=f"{self.best_acc1:.2f}", lr=f"{lr:.3g}")
                if not self.progress:
                    self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, lr {lr:.4g}, "
                             f"Acc@1 {acc1:.2f} Acc@5 {acc5:.2f} (best {self.best_acc1:.2f})")
        finally:
            bar.close()
        if last is not None:
            self.log(f" * Acc@1 {last['acc1']:.3f} Acc@5 {last['acc5']:.3f}; best Acc@1 "
                     f"{self.best_acc1:.3f} -> {self.run_dir / BEST}")
        return LinclsResult(self.run_dir, self.best_acc1, last, self.history)


def linear_classification(cfg: LinclsConfig, *, log: Log = print, progress: bool = True) -> LinclsResult:
    """Run the linear protocol as ``cfg`` says (see the module docstring)."""
    return LinearClassification(cfg, log=log, progress=progress).run()
