"""The README's "Use it as a library" section runs: its Python blocks, in order, in one
namespace, in a folder holding tiny data at the paths the snippets name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import make_image_folder

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use it as a library"


def library_snippets(text: str) -> list[str]:
    """The ```python blocks between the section's heading and the next level-2 heading."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else None]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def test_the_section_has_the_three_snippets() -> None:
    blocks = library_snippets(README.read_text())
    assert len(blocks) == 3
    assert "pretrain(" in blocks[0] and "MoCo(" in blocks[1] and "load_backbone(" in blocks[2]


def test_the_library_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image_folder(tmp_path / "data", classes=2, per_class=40, size=32)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(library_snippets(README.read_text())):
        exec(compile(block, f"README.md, library snippet {i + 1}", "exec"), namespace)
    assert (tmp_path / "runs/quick/checkpoint_0001.pth.tar").is_file()
    assert (tmp_path / "resnet18_moco.pth").is_file()
    features = namespace["features"]
    assert tuple(features.shape) == (4, 512)  # type: ignore[attr-defined]
    assert namespace["out"].loss.ndim == 0  # type: ignore[attr-defined]
