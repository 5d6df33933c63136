"""CIFAR-10 for a machine that has none: the archive downloaded from a local HTTP server serving
a small archive in the official python-version format (the same folder, file names and batch
pickles), its md5 checked, unpacked atomically; a corrupted, a truncated and an offline
download each one clear line, nothing that looks complete left behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import LocalServer, closed_port_url, small_cifar_archive

import moco.data.cifar_download as cd
from moco.core.errors import DataError, DownloadError
from moco.data.splits import find_dataset


@pytest.fixture
def archive(monkeypatch: pytest.MonkeyPatch) -> bytes:
    body = small_cifar_archive()
    monkeypatch.setattr(cd, "CIFAR10_MD5", hashlib.md5(body).hexdigest())
    monkeypatch.delenv(cd.URL_ENV, raising=False)
    monkeypatch.delenv("MOCO_MIRROR", raising=False)
    return body


def test_downloads_unpacks_and_reads_as_data(tmp_path: Path, archive: bytes) -> None:
    with LocalServer() as srv:
        srv.served.files["/cifar-10-python.tar.gz"] = archive
        folder = cd.fetch_cifar10(tmp_path, url=srv.url("/cifar-10-python.tar.gz"))
        again = cd.fetch_cifar10(tmp_path, url=srv.url("/cifar-10-python.tar.gz"))
        assert len(srv.served.requests) == 1  # the second call finds the folder
    assert folder == again == tmp_path / "cifar-10-batches-py"
    splits = find_dataset(str(folder), "stop", None)
    assert len(splits.train) == 20 and splits.train.labeled
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unpacking")]


def test_a_local_copy_of_the_archive_is_accepted(tmp_path: Path, archive: bytes,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "elsewhere" / "cifar-10-python.tar.gz"
    copy.parent.mkdir()
    copy.write_bytes(archive)
    monkeypatch.setenv(cd.URL_ENV, str(copy))
    assert cd.fetch_cifar10(tmp_path / "cache").name == "cifar-10-batches-py"


def test_a_corrupted_download_is_refused_and_removed(tmp_path: Path, archive: bytes) -> None:
    bad = bytearray(archive)
    bad[len(bad) // 2] ^= 0xFF
    with LocalServer() as srv:
        srv.served.files["/c.tar.gz"] = bytes(bad)
        with pytest.raises(DownloadError) as e:
            cd.fetch_cifar10(tmp_path, url=srv.url("/c.tar.gz"))
    assert "\n" not in str(e.value) and "md5" in str(e.value)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_a_truncated_download_resumes_on_the_next_run(tmp_path: Path, archive: bytes) -> None:
    with LocalServer() as srv:
        srv.served.files["/c.tar.gz"] = archive
        srv.served.cut["/c.tar.gz"] = [len(archive) // 3]
        with pytest.raises(DownloadError) as e:
            cd.fetch_cifar10(tmp_path, url=srv.url("/c.tar.gz"))
        assert "\n" not in str(e.value)
        assert not (tmp_path / "cifar-10-batches-py").exists()
        folder = cd.fetch_cifar10(tmp_path, url=srv.url("/c.tar.gz"))
        assert srv.served.requests[-1][1] == f"bytes={len(archive) // 3}-"  # resumed
    assert (folder / "test_batch").is_file()


def test_offline_is_one_line_naming_the_url_and_the_local_copy(tmp_path: Path,
                                                                archive: bytes) -> None:
    url = closed_port_url("/cifar-10-python.tar.gz")
    with pytest.raises(DownloadError) as e:
        cd.fetch_cifar10(tmp_path, url=url)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and cd.URL_ENV in msg and "--data" in msg


def test_an_archive_without_the_python_batches_is_refused(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    body = small_cifar_archive(drop="test_batch")
    monkeypatch.setattr(cd, "CIFAR10_MD5", hashlib.md5(body).hexdigest())
    with LocalServer() as srv:
        srv.served.files["/c.tar.gz"] = body
        with pytest.raises(DataError, match="does not hold the CIFAR-10 python version"):
            cd.fetch_cifar10(tmp_path, url=srv.url("/c.tar.gz"))
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unpacking")]
