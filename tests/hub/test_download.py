"""The user-facing downloader: a good file, a damaged one, a connection closed early, a
resume, a server without Range, offline and 404, mirrors and local copies; never anything
half-written under the final name."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
from helpers import LocalServer, closed_port_url

from moco.core.errors import DownloadError, MocoError
from moco.utils.download import (
    Checksum,
    download,
    import_file,
    mirrored,
    part_path,
    user_cache_dir,
)

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, MocoError)
    return msg


def _only(folder: Path) -> list[str]:
    """The visible files in ``folder`` (the lock file is hidden)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "weights.pth.tar"


# --- the cache folder --------------------------------------------------------------------------

def test_cache_folder_follows_moco_cache_else_home(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("MOCO_CACHE", str(tmp_path / "c"))
    assert user_cache_dir("weights") == tmp_path / "c" / "weights"
    monkeypatch.delenv("MOCO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir("datasets") == tmp_path / "home" / ".cache" / "moco" / "datasets"


# --- good downloads and checksums --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sha256", "md5", "md5-prefix"])
def test_a_good_file_is_verified_and_gets_its_name(server: LocalServer, dest: Path,
                                                   kind: str) -> None:
    server.served.files["/w.bin"] = DATA
    kw = {"sha256": {"sha256": SHA}, "md5": {"md5": MD5}, "md5-prefix": {"md5": MD5[:8]}}[kind]
    assert download(server.url("/w.bin"), dest, progress=False, **kw) == dest
    assert dest.read_bytes() == DATA
    assert _only(dest.parent) == [dest.name]


def test_an_existing_file_is_not_downloaded_again(server: LocalServer, dest: Path) -> None:
    server.served.files["/w.bin"] = DATA
    download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    assert len(server.served.requests) == 1


def test_a_file_without_checksum_is_kept_with_its_sha256_logged(
        server: LocalServer, dest: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.served.files["/w.bin"] = DATA
    with caplog.at_level(logging.WARNING):
        download(server.url("/w.bin"), dest, progress=False)
    assert dest.read_bytes() == DATA and SHA in caplog.text


def test_checksum_values_are_checked() -> None:
    assert Checksum("md5", "B251726A").describe() == "md5 b251726a (published prefix)"
    for bad in [("md5", "b2517"), ("sha256", "xyz" * 10), ("crc", "12345678")]:
        with pytest.raises(ValueError):
            Checksum(*bad)


def test_a_checksum_mismatch_leaves_nothing(server: LocalServer, dest: Path) -> None:
    server.served.files["/w.bin"] = DATA
    with pytest.raises(DownloadError) as e:
        download(server.url("/w.bin"), dest, sha256="0" * 64, progress=False)
    msg = _one_line(e)
    assert server.url("/w.bin") in msg and "expected sha256 000000" in msg and "damaged" in msg
    assert _only(dest.parent) == []


# --- interrupted downloads ---------------------------------------------------------------------

def test_a_truncated_download_is_one_line_and_keeps_only_the_part_file(
        server: LocalServer, dest: Path) -> None:
    server.served.files["/w.bin"] = DATA
    server.served.cut["/w.bin"] = [100_000]
    with pytest.raises(DownloadError) as e:
        download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    msg = _one_line(e)
    assert "stopped after 100,000 of 300,000 bytes" in msg and "run the same command again" in msg
    assert not dest.exists()
    assert part_path(dest).read_bytes() == DATA[:100_000]


def test_an_interrupted_download_resumes_with_a_range_request(server: LocalServer,
                                                              dest: Path) -> None:
    server.served.files["/w.bin"] = DATA
    server.served.cut["/w.bin"] = [120_000]
    with pytest.raises(DownloadError):
        download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA and not part_path(dest).exists()
    assert server.served.requests == [("/w.bin", None), ("/w.bin", "bytes=120000-")]


def test_a_server_without_range_restarts_from_the_first_byte(
        server: LocalServer, dest: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.served.files["/w.bin"] = DATA
    server.served.ranges = False
    server.served.cut["/w.bin"] = [50_000]
    with pytest.raises(DownloadError):
        download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    with caplog.at_level(logging.INFO):
        download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA
    assert "cannot be resumed" in caplog.text
    assert server.served.requests[1] == ("/w.bin", "bytes=50000-")


def test_a_part_file_longer_than_the_file_starts_again(server: LocalServer, dest: Path) -> None:
    server.served.files["/w.bin"] = DATA
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(DATA + b"junk")  # 416 for its Range
    download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA


def test_a_resumed_file_with_bad_first_bytes_fails_its_checksum(server: LocalServer,
                                                                dest: Path) -> None:
    server.served.files["/w.bin"] = DATA
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(b"x" * 1000)  # not the file's first bytes
    with pytest.raises(DownloadError, match="damaged"):
        download(server.url("/w.bin"), dest, sha256=SHA, progress=False)
    assert _only(dest.parent) == []
    download(server.url("/w.bin"), dest, sha256=SHA, progress=False)  # then a clean start
    assert dest.read_bytes() == DATA


# --- unreachable -------------------------------------------------------------------------------

def test_offline_is_one_line_naming_the_url_and_a_local_copy(dest: Path) -> None:
    url = closed_port_url("/w.bin")
    with pytest.raises(DownloadError) as e:
        download(url, dest, sha256=SHA, progress=False)
    msg = _one_line(e)
    assert url in msg and str(dest) in msg and "MOCO_MIRROR" in msg
    assert _only(dest.parent) == []


def test_the_callers_hint_replaces_the_default_one(dest: Path) -> None:
    with pytest.raises(DownloadError, match="pass --data FOLDER"):
        download(closed_port_url(), dest, progress=False, hint="pass --data FOLDER")


def test_a_404_is_one_line(server: LocalServer, dest: Path) -> None:
    with pytest.raises(DownloadError) as e:
        download(server.url("/missing.bin"), dest, progress=False)
    assert "HTTP 404" in _one_line(e) and server.url("/missing.bin") in str(e.value)
    assert _only(dest.parent) == []


# --- mirrors, progress and local copies --------------------------------------------------------

def test_a_mirror_from_the_environment_or_the_call(server: LocalServer, dest: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server.served.files["/m/w.bin"] = DATA
    origin = closed_port_url("/some/path/w.bin")
    monkeypatch.setenv("MOCO_MIRROR", server.url("/m/"))
    assert mirrored(origin) == server.url("/m/w.bin")
    download(origin, dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA
    monkeypatch.delenv("MOCO_MIRROR")
    other = dest.with_name("again.bin")
    download(origin, other, sha256=SHA, mirror=server.url("/m"), progress=False)
    assert other.read_bytes() == DATA


def test_a_local_folder_as_mirror(tmp_path: Path, dest: Path) -> None:
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "w.bin").write_bytes(DATA)
    download(closed_port_url("/x/w.bin"), dest, sha256=SHA, mirror=str(folder), progress=False)
    assert dest.read_bytes() == DATA


def test_the_progress_bar_when_asked(server: LocalServer, dest: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    server.served.files["/w.bin"] = DATA
    download(server.url("/w.bin"), dest, sha256=SHA, progress=True)
    assert "w" in capsys.readouterr().err  # tqdm writes to stderr
    download(server.url("/w.bin"), dest.with_name("b.bin"), sha256=SHA)  # stderr not a tty
    assert "%|" not in capsys.readouterr().err  # no bar (a log record may be shown)


def test_a_local_copy_is_verified_then_copied(tmp_path: Path, dest: Path) -> None:
    src = tmp_path / "copy.bin"
    src.write_bytes(DATA)
    assert import_file(src, dest, md5=MD5) == dest and dest.read_bytes() == DATA
    bad = tmp_path / "bad.bin"
    bad.write_bytes(DATA[:-1])
    with pytest.raises(DownloadError) as e:
        import_file(bad, dest.with_name("other.bin"), sha256=SHA)
    assert str(bad) in _one_line(e) and bad.exists()
    assert not dest.with_name("other.bin").exists()


def test_a_second_process_waits_for_the_first(server: LocalServer, dest: Path) -> None:
    import fcntl
    import threading

    server.served.files["/w.bin"] = DATA
    dest.parent.mkdir(parents=True)
    lock = os.open(dest.with_name(f".{dest.name}.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another download in progress
    t = threading.Thread(target=download, args=(server.url("/w.bin"), dest),
                         kwargs={"sha256": SHA, "progress": False})
    t.start()
    t.join(0.5)
    assert t.is_alive() and server.served.requests == []
    os.close(lock)
    t.join(30)
    assert dest.read_bytes() == DATA
