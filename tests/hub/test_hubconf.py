"""``hubconf.py``: one torch.hub entry point per released checkpoint, loaded with
``torch.hub.load(REPO, NAME, source="local")`` from hand-built files on a local server."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import build_release, release_kind, serve_entry
from helpers import LocalServer

from moco.hub.registry import REGISTRY

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _hubconf() -> Any:
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_plain_function_per_registry_entry() -> None:
    hubconf = _hubconf()
    assert hubconf.dependencies == ["torch", "torchvision"]
    names = sorted(n for n in dir(hubconf) if not n.startswith("_") and callable(
        getattr(hubconf, n)) and n != "hub_entries")
    assert names == sorted(REGISTRY)
    for n in names:
        fn = getattr(hubconf, n)
        assert fn.__name__ == n and f"{REGISTRY[n].top1}%" in fn.__doc__


@pytest.mark.parametrize("name", ["mocov2_r50_800ep", "mocov3_vit_small_300ep"])
def test_torch_hub_load_from_the_local_checkout(name: str, server: LocalServer, tmp_path: Path,
                                                cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    built = build_release(release_kind(REGISTRY[name]), tmp_path)
    entry = serve_entry(REGISTRY[name], server, built)
    monkeypatch.setitem(REGISTRY, name, entry)
    model = torch.hub.load(str(REPO), name, source="local", pretrained=True, progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), built[1](x))
    assert model.moco_info.released is entry and (cache / "weights" / entry.filename).is_file()
    head = torch.hub.load(str(REPO), name, source="local", pretrained=True, num_classes=4)
    assert head(x).shape == (2, 4)


def test_pretrained_false_is_the_same_network_untrained(cache: Path) -> None:
    model = torch.hub.load(str(REPO), "mocov1_r50_200ep", source="local", pretrained=False)
    assert type(model).__name__ == "ResNet" and isinstance(model.fc, torch.nn.Identity)
    assert not (cache / "weights").exists()  # nothing downloaded
