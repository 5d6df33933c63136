"""The library's edge cases: each one a clear one-line error, or it works.

MoCo without a shuffle (the paper's Shuffling BN by default, refused in a process group), an
encoder whose output is not [B, dim], strip_head on a module without ``fc``, SplitBatchNorm
left with one value per channel, and a bare folder of images as DATA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_FLAGS, make_image_folder, run_cli
from PIL import Image
from torch import nn

import moco.core.model as model_mod
from moco.core.backbones import feature_dim_of, get_head, head_name, set_head, strip_head
from moco.core.errors import ConfigError, MocoError
from moco.core.model import MoCo, build_encoder
from moco.core.seeding import stream_generator
from moco.core.shuffle_bn import LocalShuffle, NoShuffle, SplitBatchNorm


def _encoder(dim: int = 8, bn: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn or nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, dim))


def _views(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def _pair(**kw: object) -> tuple[MoCo, MoCo]:
    """Two identical MoCo models whose f_k normalises 4 sub-batches (shuffling matters)."""
    torch.manual_seed(0)
    enc = _encoder(bn=SplitBatchNorm(6, 4))
    a = MoCo(enc, dim=8, k=16, generator=torch.Generator().manual_seed(1), **kw)  # type: ignore[arg-type]
    b = MoCo(copy.deepcopy(enc), dim=8, k=16, generator=torch.Generator().manual_seed(1))
    return a.train(), b.train()


def test_moco_without_a_shuffle_runs_the_papers_shuffling_bn() -> None:
    """No shuffle given: the keys are those of the one-device Shuffling BN (LocalShuffle with
    the model's own generator), not of the no-shuffle ablation."""
    im_q, im_k = _views()
    default, local = _pair()
    assert isinstance(default.default_shuffle, LocalShuffle)
    default(im_q, im_k)
    local(im_q, im_k, LocalShuffle(stream_generator(0, 2)))
    torch.testing.assert_close(default.key_queue.queue, local.key_queue.queue)
    _, plain = _pair()
    plain(im_q, im_k, NoShuffle())
    assert not torch.allclose(default.key_queue.queue, plain.key_queue.queue, atol=1e-4)
    # A shuffle given to the constructor is the default instead.
    ablation, _ = _pair(shuffle=NoShuffle())
    ablation(im_q, im_k)
    torch.testing.assert_close(ablation.key_queue.queue, plain.key_queue.queue)


def test_moco_without_a_shuffle_in_a_process_group_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(model_mod.dist, "get_world_size", lambda: 4)
    model, _ = _pair()
    im_q, im_k = _views()
    with pytest.raises(ConfigError, match=r"process group of 4.*make_key_shuffle\('ddp'") as e:
        model(im_q, im_k)
    assert "\n" not in str(e.value)
    model(im_q, im_k, NoShuffle())  # an explicit shuffle is the caller's choice


@pytest.mark.parametrize(("encoder", "says"), [
    (_encoder(dim=16), r"outputs \[8, 16\], MoCo\(dim=8\) needs \[batch, 8\].*dim=16"),
    (nn.Sequential(nn.Conv2d(3, 8, 3)), r"outputs \[8, 8, 6, 6\], MoCo\(dim=8\)"),
])
def test_an_encoder_of_another_width_is_named_at_the_first_step(encoder: nn.Module,
                                                                 says: str) -> None:
    model = MoCo(encoder, dim=8, k=16)
    with pytest.raises(ConfigError, match=says) as e:
        model(*_views(), NoShuffle())
    assert "\n" not in str(e.value) and int(model.key_queue.queue_ptr) == 0


def test_strip_head_needs_a_head() -> None:
    with pytest.raises(ConfigError, match="Sequential has no head layer"):
        strip_head(_encoder())
    enc = build_encoder("resnet18", 16, mlp=True, cifar_stem=True, bn_splits=1)
    assert isinstance(strip_head(enc).fc, nn.Identity) and not isinstance(enc.fc, nn.Identity)


class _Body(nn.Module):
    def __init__(self, head_attr: str) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        setattr(self, head_attr, nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_attr_name)(self.trunk(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("attr", ["fc", "head", "classifier"])
def test_the_head_is_found_by_its_usual_names(attr: str) -> None:
    net = _Body(attr)
    net.head_attr_name = attr  # type: ignore[assignment]
    assert head_name(net) == attr and feature_dim_of(net) == 6
    stripped = strip_head(net)
    assert stripped(torch.ones(2, 4)).shape == (2, 6)
    assert net(torch.ones(2, 4)).shape == (2, 3)  # the original keeps its head


def test_a_network_names_its_own_head() -> None:
    outer = nn.Module()
    outer.inner = _Body("classifier")  # type: ignore[assignment]
    outer.moco_head = "inner.classifier"  # type: ignore[assignment]
    set_head(outer, nn.Identity())
    assert isinstance(get_head(outer), nn.Identity) and isinstance(outer.inner.classifier, nn.Identity)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_with_one_value_per_channel_is_a_clear_error(channels_last: bool) -> None:
    bn = SplitBatchNorm(3, 4).train()
    x = torch.randn(4, 3, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match=r"each of the 4 splits holds 1 image\(s\) of 1x1") as e:
        bn(x)
    assert "\n" not in str(e.value)
    assert bn(torch.randn(8, 3, 1, 1)).shape == (8, 3, 1, 1)  # 2 values per channel: fine
    bn.eval()(x)  # running statistics in eval mode: any batch
    # The whole encoder: ResNet-18 at 32 px has a 1x1 layer4; batch 8 over 8 splits.
    enc = build_encoder("resnet18", 16, mlp=False, cifar_stem=False, bn_splits=8).train()
    with pytest.raises(ConfigError, match="1 image"):
        enc(torch.randn(8, 3, 32, 32))


def _flat_images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_a_bare_folder_of_images_is_a_training_set(tmp_path: Path) -> None:
    """DATA without train/: pretraining uses its images (kNN skipped, said so), embed reads
    them, moco knn refuses in one line; a folder with val/ but no train/ is still refused."""
    data = _flat_images(tmp_path / "photos", 16)
    rc, out, err = run_cli(["pretrain", str(data), *TINY_FLAGS, "--epochs", "1", "--output",
                            str(tmp_path / "run")])
    assert rc == 0, err
    assert "its 16 images are the training set" in err
    assert "unlabeled (no class folders): kNN evaluation is skipped" in out
    ckpt = tmp_path / "run" / "checkpoint_0000.pth.tar"
    assert ckpt.is_file()
    rc, out, err = run_cli(["embed", str(data), "--pretrained", str(ckpt), "--out",
                            str(tmp_path / "e.npy"), "-j", "0", "--no-progress"])
    assert rc == 0, err
    assert np.load(tmp_path / "e.npy").shape == (16, 512)
    assert len(json.loads((tmp_path / "e.npy.json").read_text())["files"]) == 16
    rc, _, err = run_cli(["knn", str(data), "--pretrained", str(ckpt), "-j", "0"])
    assert rc == 2 and "unlabeled" in err.strip().splitlines()[-1]
    # Class folders without train/: a labeled training set (no queries: kNN skipped).
    labeled = make_image_folder(tmp_path / "labeled", splits=("x",)) / "x"
    rc, out, err = run_cli(["pretrain", str(labeled), *TINY_FLAGS, "--epochs", "1", "--output",
                            str(tmp_path / "run2")])
    assert rc == 0 and "no labeled val/ or test/ split" in out, err
    make_image_folder(tmp_path / "valonly", splits=("val",))
    rc, _, err = run_cli(["pretrain", str(tmp_path / "valonly"), *TINY_FLAGS, "--output",
                          str(tmp_path / "run3")])
    assert rc == 2 and "has val/ but no train/ folder" in err


def test_every_library_error_is_a_moco_error() -> None:
    """The command line catches MocoError (one line, exit 2); these come from the library."""
    assert issubclass(ConfigError, MocoError)
