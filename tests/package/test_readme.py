"""The README's "Use it as a library" section runs: its Python blocks, in order, in one
namespace, in a folder holding tiny data at the paths the snippets name."""

from __future__ import annotations

import re
import shlex
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


OWN_IMAGES = "## Your own images"


def own_images_commands(text: str) -> list[list[str]]:
    """The commands of the "Your own images" section's bash block, continuation lines joined."""
    start = text.index(OWN_IMAGES)
    section = text[start:text.find("\n## ", start + len(OWN_IMAGES))]
    [block] = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    return [shlex.split(line, comments=True)
            for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_own_images_recipe_runs_on_500_images_without_a_warning() -> None:
    """The quick start's flags exist, its later commands name the last checkpoint the recipe
    writes, and on 500 images (docs/own-images.md) the recipe draws none of the run's warnings
    (queue vs images, lr vs batch, BatchNorm groups)."""
    from moco.cli import build_parser
    from moco.cli.pretrain import config_from_args
    from moco.engine.config_checks import images_per_bn_group, run_advice

    commands = own_images_commands(README.read_text())
    assert [c[:2] for c in commands] == [["moco", "pretrain"], ["moco", "neighbours"],
                                         ["moco", "embed"], ["moco", "export"]]
    cfg = config_from_args(build_parser().parse_args(commands[0][1:]))
    cfg.validate()
    assert run_advice(cfg, 500, None, shuffle_bn="split") == []
    assert images_per_bn_group(cfg, "split", 1)[0] == 16
    last = f"{cfg.output}/checkpoint_{cfg.epochs - 1:04d}.pth.tar"
    for command in commands[1:]:
        assert last in command, command
        build_parser().parse_args(command[1:])  # every flag exists
