"""``moco zoo list|info|download``, ``moco export --format hf`` errors and the commands'
one-line failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from builders import build_release, serve_entry
from helpers import LocalServer, closed_port_url, run_cli

from moco.hub.registry import REGISTRY


def test_list_shows_every_release_with_the_authors_top1() -> None:
    rc, out, _ = run_cli(["zoo", "list"])
    assert rc == 0
    for name, w in REGISTRY.items():
        assert name in out and f"{w.top1:.1f}" in out
    assert "unverified" in out
    rc, out, _ = run_cli(["zoo", "list", "mocov3-vit*"])
    assert rc == 0 and "mocov3_vit_base_300ep" in out and "mocov2" not in out


def test_info_tells_the_url_checksum_and_that_it_is_unverified() -> None:
    rc, out, _ = run_cli(["zoo", "info", "mocov1-r50-200ep"])
    assert rc == 0 and REGISTRY["mocov1_r50_200ep"].url in out
    assert "md5 b251726a (prefix)" in out and "verified:         False" in out
    rc, _, err = run_cli(["zoo", "info", "mocov9"])
    assert rc == 2 and err.count("\n") == 1 and "moco zoo list" in err


def test_download_then_from_a_local_copy(server: LocalServer, tmp_path: Path, cache: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    built = build_release("v3-resnet", tmp_path)
    entry = serve_entry(REGISTRY["mocov3_r50_100ep"], server, built)
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    rc, out, err = run_cli(["zoo", "download", entry.name, "--no-progress"])
    assert rc == 0, err
    target = cache / "weights" / entry.filename
    assert str(target) in out and target.read_bytes() == built[0].read_bytes()
    target.unlink()
    rc, out, err = run_cli(["zoo", "download", entry.name, "--from", str(built[0])])
    assert rc == 0 and hashlib.sha256(target.read_bytes()).hexdigest() == entry.sha256


def test_download_offline_and_a_wrong_local_copy_are_one_line(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    entry = REGISTRY["mocov2_r50_200ep"]
    monkeypatch.setitem(REGISTRY, entry.name, dataclasses.replace(
        entry, url=closed_port_url("/" + entry.filename)))
    rc, _, err = run_cli(["zoo", "download", entry.name])
    assert rc == 2 and err.strip().count("\n") <= 1 and "--from FILE" in err.splitlines()[-1]
    wrong = tmp_path / "copy.pth.tar"
    wrong.write_bytes(b"not the release")
    rc, _, err = run_cli(["zoo", "download", entry.name, "--from", str(wrong)])
    assert rc == 2 and "expected md5 59fd9945" in err
    assert not (cache / "weights" / entry.filename).exists()


def test_export_hf_of_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "x.pth.tar"
    bad.write_text("hello")
    rc, _, err = run_cli(["export", str(bad), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "hf").exists()
