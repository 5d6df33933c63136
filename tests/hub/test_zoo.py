"""The released weights by name: the registry's entries, each one's loading path from a
hand-built file in its release's layout served locally, the head and the preprocessing, and
the failures (damaged, truncated, offline) that leave nothing under the final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from builders import build_release, release_kind, serve_entry
from helpers import LocalServer, closed_port_url
from PIL import Image

import moco
from moco.core.errors import DownloadError, HubError, MocoError
from moco.hub.load import load_pretrained, weights_path
from moco.hub.registry import REGISTRY, ReleasedWeights, get_weights, list_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One hand-built file per release layout and network, shared by the module's tests."""
    folder = tmp_path_factory.mktemp("releases")
    kinds = sorted({release_kind(w) for w in REGISTRY.values()})
    return {k: build_release(k, folder) for k in kinds}


@pytest.fixture
def local(server: LocalServer, releases: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """``local(name)``: the entry pointed at its hand-built file on the local server
    (returns the entry, the reference backbone and the file)."""
    def point(name: str) -> tuple[ReleasedWeights, torch.nn.Module, Path]:
        built = releases[release_kind(REGISTRY[name])]
        entry = serve_entry(REGISTRY[name], server, built)
        monkeypatch.setitem(REGISTRY, name, entry)
        return entry, built[1], built[0]
    return point


def _cache_files(cache: Path) -> list[str]:
    folder = cache / "weights"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) \
        if folder.exists() else []


# --- the registry ------------------------------------------------------------------------------

def test_the_registry_holds_the_papers_releases_and_says_they_are_unverified() -> None:
    top1 = {n: w.top1 for n, w in REGISTRY.items()}
    assert top1 == {"mocov1_r50_200ep": 60.6, "mocov2_r50_200ep": 67.7, "mocov2_r50_800ep": 71.1,
                    "mocov3_r50_100ep": 68.9, "mocov3_r50_300ep": 72.8, "mocov3_r50_1000ep": 74.6,
                    "mocov3_vit_small_300ep": 73.2, "mocov3_vit_base_300ep": 76.7}
    assert REGISTRY["mocov2_r50_200ep"].paper_top1 == 67.5
    for w in REGISTRY.values():
        assert not w.verified and "not checked" in w.note
        assert w.url.startswith("https://dl.fbaipublicfiles.com/moco")
        assert (w.md5 is not None) == (w.layout == "v1v2")  # v3 publishes no checksum
    assert REGISTRY["mocov1_r50_200ep"].url.endswith(
        "/moco/moco_checkpoints/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar")
    assert REGISTRY["mocov3_vit_small_300ep"].url.endswith("/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar")


def test_names_with_hyphens_wildcards_and_a_close_match() -> None:
    assert get_weights("mocov2-r50-800ep") is REGISTRY["mocov2_r50_800ep"]
    assert list_weights("mocov3_r50*") == ["mocov3_r50_100ep", "mocov3_r50_300ep",
                                           "mocov3_r50_1000ep"]
    with pytest.raises(HubError, match="did you mean mocov2_r50_800ep"):
        get_weights("mocov2_r50_80ep")


# --- every entry loads from a file in its layout -----------------------------------------------

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_loads_its_layout_through_the_local_server(
        name: str, local: Any, cache: Path) -> None:
    entry, ref, _ = local(name)
    model = moco.load_pretrained(name.replace("_", "-"), progress=False)
    assert _cache_files(cache) == [entry.filename]
    assert not model.training and model.moco_info.released is entry
    got, want = model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = _x(min(entry.image_size, 64))
    with torch.no_grad():
        y = model(x)
        assert torch.equal(y, ref(x)) and y.shape == (2, model.moco_info.feature_dim)


def test_a_fresh_head_for_num_classes(local: Any, server: LocalServer, cache: Path) -> None:
    for name in ("mocov2_r50_800ep", "mocov3_vit_small_300ep"):
        entry, _, _ = local(name)
        model = load_pretrained(name, num_classes=10, progress=False)
        head = model.fc if entry.family == "torchvision" else model.head
        assert isinstance(head, torch.nn.Linear) and head.out_features == 10
        assert torch.all(head.bias == 0) and 0.005 < float(head.weight.detach().std()) < 0.015
        assert model(_x(min(entry.image_size, 64))).shape == (2, 10)


def test_the_preprocessing_travels_with_the_weights(local: Any, server: LocalServer, cache: Path) -> None:
    local("mocov1_r50_200ep")
    model = load_pretrained("mocov1_r50_200ep", progress=False)
    x = model.transform(Image.new("RGB", (300, 260), (255, 0, 0)))
    assert x.shape == (3, 224, 224)
    assert float(x[0, 0, 0]) == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)


def test_a_second_load_uses_the_cache(local: Any, server: LocalServer, cache: Path) -> None:
    local("mocov2_r50_200ep")
    load_pretrained("mocov2_r50_200ep", progress=False)
    load_pretrained("mocov2_r50_200ep", progress=False)
    assert len(server.served.requests) == 1


def test_a_local_copy_instead_of_the_download(local: Any, server: LocalServer, cache: Path) -> None:
    entry, ref, path = local("mocov3_r50_300ep")
    model = load_pretrained("mocov3_r50_300ep", file=path)
    assert server.served.requests == [] and _cache_files(cache) == []
    assert torch.equal(model(_x(64)), ref(_x(64)))


# --- failures: one line, nothing half-written in the cache -------------------------------------

def _expect_one_line(name: str, match: str) -> str:
    with pytest.raises(DownloadError) as e:
        load_pretrained(name, progress=False)
    msg = str(e.value)
    assert isinstance(e.value, MocoError) and "\n" not in msg and match in msg, msg
    return msg


def test_a_damaged_download(local: Any, server: LocalServer, cache: Path) -> None:
    entry, _, _ = local("mocov2_r50_800ep")
    path = entry.url.split(server.base, 1)[1]
    data = bytearray(server.served.files[path])
    data[1000] ^= 0xFF
    server.served.files[path] = bytes(data)
    _expect_one_line("mocov2_r50_800ep", "damaged")
    assert _cache_files(cache) == []


def test_a_truncated_download_then_its_resume(local: Any, server: LocalServer, cache: Path) -> None:
    entry, ref, _ = local("mocov3_vit_base_300ep")
    server.served.cut[entry.url.split(server.base, 1)[1]] = [1_000_000]
    _expect_one_line("mocov3_vit_base_300ep", "stopped after 1,000,000 of")
    assert _cache_files(cache) == [entry.filename + ".part"]  # kept to resume, not the name
    model = load_pretrained("mocov3_vit_base_300ep", progress=False)
    assert _cache_files(cache) == [entry.filename]
    assert torch.equal(model(_x(32)), ref(_x(32)))


def test_offline_names_the_url_and_how_to_pass_a_local_copy(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = REGISTRY["mocov2_r50_800ep"]
    url = closed_port_url("/moco/" + entry.filename)
    monkeypatch.setitem(REGISTRY, entry.name, _replace(entry, url=url))
    msg = _expect_one_line(entry.name, url)
    assert f"moco zoo download {entry.name} --from FILE" in msg and "MOCO_MIRROR" in msg
    assert _cache_files(cache) == []
    assert weights_path(REGISTRY[entry.name]).parent == cache / "weights"


def _replace(entry: ReleasedWeights, **kw: object) -> ReleasedWeights:
    import dataclasses

    return dataclasses.replace(entry, **kw)  # type: ignore[arg-type]
