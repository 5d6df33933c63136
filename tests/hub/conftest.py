"""Fixtures of the released-weights and Hub tests: a local HTTP server, and an environment
that cannot reach the internet by accident (no mirror, Hugging Face Hub offline, its cache in
a temporary folder)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LocalServer

_LOCAL = {"127.0.0.1", "localhost", "::1"}
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect


def _local_only_getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
    if host is not None and str(host) not in _LOCAL:
        raise socket.gaierror(socket.EAI_NONAME, f"tests never reach the internet ({host})")
    return _getaddrinfo(host, *args, **kw)


def _local_only_connect(sock: socket.socket, address: Any) -> Any:
    if isinstance(address, tuple) and str(address[0]) not in _LOCAL:
        raise ConnectionRefusedError(f"tests never reach the internet ({address[0]})")
    return _connect(sock, address)


@pytest.fixture(autouse=True)
def _no_network(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No mirror; name lookups and connections to anything but this machine refused;
    huggingface_hub offline with its cache in a temporary folder (its settings are read when
    it is imported, so they are set on its constants too)."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(socket, "getaddrinfo", _local_only_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", _local_only_connect)
    monkeypatch.delenv("MOCO_MIRROR", raising=False)
    home = tmp_path_factory.mktemp("hf-home")
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(home)),
                        ("HF_HUB_CACHE", str(home / "hub"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HOME", str(home))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The user cache folder ($MOCO_CACHE) of this test."""
    root = tmp_path / "moco-cache"
    monkeypatch.setenv("MOCO_CACHE", str(root))
    return root
