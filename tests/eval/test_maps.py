"""Pictures of the embeddings: the 2-D map (PCA against a naive eigendecomposition; t-SNE and
UMAP when the plots extra is installed, a one-line error naming it when asked for and
missing), its file for labeled and unlabeled images, and the nearest-neighbour grid from a
checkpoint (its exact size; a query drawn from the bank is its own first neighbour)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_folder, save_original_checkpoint
from PIL import Image

from moco.cli import main
from moco.core.errors import ConfigError
from moco.eval import maps
from moco.eval.maps import (
    labels_from_names,
    pca_2d,
    plot_embedding_file,
    plot_embedding_map,
    project_2d,
    resolve_method,
    spread_points,
)
from moco.eval.neighbours import (
    NeighbourOptions,
    grid_pixels,
    nearest_neighbours,
    neighbour_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")
EMBED_FLAGS = ["-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32"]


def _points(n: int = 60, d: int = 12, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    centres = rng.normal(0, 3, (3, d))
    return centres[labels] + rng.normal(0, 1, (n, d)), labels


# ----- the 2-D projection ----------------------------------------------------------------------
def test_pca_is_the_projection_on_the_top_two_eigenvectors() -> None:
    x, _ = _points()
    a = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(a.T @ a)  # ascending
    top = vecs[:, ::-1][:, :2]
    ref = a @ top
    got = pca_2d(x)
    for j in range(2):  # each axis up to its sign
        sign = np.sign(got[:, j] @ ref[:, j])
        np.testing.assert_allclose(got[:, j], sign * ref[:, j], rtol=1e-9, atol=1e-9)
    assert np.allclose(pca_2d(np.ones((5, 3)))[:, 1], 0)  # no variation: zeros


def test_named_method_without_its_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maps, "_installed", lambda module: False)
    for method, package in (("tsne", "scikit-learn"), ("umap", "umap-learn")):
        with pytest.raises(ConfigError) as e:
            resolve_method(method, 100)
        msg = str(e.value)
        assert package in msg and "momentum-contrast[plots]" in msg and "\n" not in msg
    assert resolve_method("auto", 100) == "pca"  # always a picture
    with pytest.raises(ConfigError, match="--plot-method"):
        resolve_method("mds", 100)


def test_auto_prefers_umap_then_tsne(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maps, "_installed", lambda module: module == "sklearn")
    assert resolve_method("auto", 100) == "tsne"
    assert resolve_method("auto", 5) == "pca"  # too few points for a neighbourhood map
    monkeypatch.setattr(maps, "_installed", lambda module: True)
    assert resolve_method("auto", 100) == "umap"


def test_tsne_when_installed() -> None:
    pytest.importorskip("sklearn")
    x, labels = _points(40)
    xy, used = project_2d(x, "tsne", seed=0)
    assert used == "tsne" and xy.shape == (40, 2)
    again, _ = project_2d(x, "tsne", seed=0)
    np.testing.assert_allclose(xy, again)  # seeded
    # The three clusters stay apart: each point's nearest other point is of its class.
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1) + np.eye(40) * 1e9
    assert (np.asarray(labels)[d.argmin(1)] == np.asarray(labels)).mean() > 0.9


def test_umap_when_installed() -> None:
    pytest.importorskip("umap")
    x, _ = _points(40)
    xy, used = project_2d(x, "umap", seed=0)
    assert used == "umap" and xy.shape == (40, 2) and np.isfinite(xy).all()


def test_spread_points_are_distinct_and_reach_the_edges() -> None:
    xy = np.array([[0, 0], [0.1, 0], [10, 0], [-10, 0], [0, 10], [0.05, 0.05]], float)
    chosen = spread_points(xy, 4)
    assert len(set(chosen)) == 4 and {2, 3, 4} <= set(chosen)
    assert spread_points(xy, 10) == spread_points(xy, 6) and len(spread_points(xy, 10)) == 6


# ----- the map file ----------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.parametrize("labeled", [True, False])
def test_map_is_written_for_labeled_and_unlabeled(tmp_path: Path, labeled: bool) -> None:
    x, labels = _points()
    rng = np.random.default_rng(1)
    tiles = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in x]
    loaded: list[int] = []

    def thumb(i: int) -> Image.Image:
        loaded.append(i)
        return tiles[i]

    out = tmp_path / "map.png"
    used = plot_embedding_map(torch.as_tensor(x), out, labels=labels if labeled else None,
                              classes=["cat", "dog", "ship"] if labeled else None,
                              thumbnail=thumb, thumbnails=5, method="pca")
    assert used == "pca" and _png_size(out) == (800, 800)
    assert len(loaded) == 5  # only the thumbnails drawn are read


def test_labels_from_folder_names() -> None:
    labels, classes = labels_from_names(["dog/1.png", "cat/2.png", "dog/sub/3.png"])
    assert classes == ["cat", "dog"] and labels == [1, 0, 1]
    assert labels_from_names(["a.png", "cat/2.png"]) == (None, [])  # one not in a folder
    assert labels_from_names(["cat/1.png", "cat/2.png"]) == (None, [])  # one class
    assert labels_from_names(["s.tar:k.jpg", "t.tar:j.jpg"]) == (None, [])  # shards


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_map_of_a_moco_embed_file(tmp_path: Path, suffix: str) -> None:
    ckpt = tmp_path / "moco.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=16,
                             splits=("train",))
    emb = tmp_path / f"emb{suffix}"
    assert main(["embed", str(data / "train"), "--pretrained", str(ckpt), "--out", str(emb),
                 "-j", "0", "--device", "cpu", "--no-progress", "--image-size", "32"]) == 0
    out = tmp_path / "map.png"
    assert plot_embedding_file(emb, out, method="pca", thumbnails=3) == "pca"
    assert _png_size(out) == (800, 800)


def test_moco_embed_plot_draws_the_map_of_what_it_wrote(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``moco embed --plot``: the map of the file it wrote, as plot_embedding_file draws it."""
    ckpt = tmp_path / "moco.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=16,
                             splits=("train",))
    emb, out = tmp_path / "emb.npy", tmp_path / "maps" / "map.png"
    out.parent.mkdir()
    assert main(["embed", str(data / "train"), "--pretrained", str(ckpt), "--out", str(emb),
                 "--plot", str(out), "--plot-method", "pca", *EMBED_FLAGS]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: their 2-D map (PCA)" in said
    again = tmp_path / "again.png"
    assert plot_embedding_file(emb, again, method="pca") == "pca"
    assert out.read_bytes() == again.read_bytes()


def test_moco_embed_plot_refuses_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "moco.pth.tar"
    save_original_checkpoint(ckpt, "resnet18", with_optimizer=False)
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2, size=16, splits=("train",))
    emb = tmp_path / "emb.npy"
    base = ["embed", str(data / "train"), "--pretrained", str(ckpt), "--out", str(emb),
            *EMBED_FLAGS]
    monkeypatch.setattr(maps, "_installed", lambda module: False)
    for extra, words in ((["--plot", str(tmp_path / "map.jpg")], "--plot"),
                         (["--plot", str(data / "train" / "map.png")], "--plot"),
                         (["--plot", str(tmp_path / "map.png"), "--plot-method", "umap"],
                          "umap-learn"),
                         (["--plot", str(tmp_path / "map.png"), "--plot-method", "mds"],
                          "--plot-method")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not emb.exists()  # refused before the embeddings are computed


# ----- nearest neighbours ----------------------------------------------------------------------
def test_nearest_neighbours_against_a_full_sort() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    sims, idx = nearest_neighbours(query, bank, 5, chunk=7)  # chunks cut the bank
    full = query.double() @ bank.double().T
    order = full.argsort(dim=1, descending=True)[:, :5]
    assert torch.equal(idx, order)
    torch.testing.assert_close(sims.double(), full.gather(1, order), rtol=1e-6, atol=1e-6)


def varied_folder(root: Path, n: int = 12, size: int = 24) -> Path:
    """A flat folder of images unlike each other (no train/: the bank is the folder)."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        arr[: size // 2] = rng.integers(0, 256, 3)
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neighbours") / "moco.pth.tar"
    save_original_checkpoint(path, "resnet18", with_optimizer=False)
    return path


FAST = dict(image_size=32, workers=0, device="cpu")


def test_grid_of_the_bank_starts_with_each_query_itself(ckpt: Path, tmp_path: Path) -> None:
    data = varied_folder(tmp_path / "photos")
    out = tmp_path / "grid.png"
    r = neighbour_grid(ckpt, data, out, NeighbourOptions(queries=3, k=4, title="before", **FAST))
    assert r.queries_from == "bank" and len(r.retrieval.bank_source) == 12
    assert r.features == "backbone" and r.feature_dim == 512
    assert _png_size(out)[::-1] == grid_pixels(3, 5, title=True)
    ret = r.retrieval
    assert ret.neighbours[:, 0].tolist() == ret.queries  # its own image first ...
    torch.testing.assert_close(ret.similarities[:, 0], torch.ones(3))  # ... at similarity 1
    assert (ret.similarities[:, 1:] < 1 - 1e-4).all()
    queries, neighbours = ret.names()
    assert [n[0] for n in neighbours] == queries and ret.same_class_rate() is None


def test_grid_with_heldout_queries_scores_their_classes(ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6, size=16)
    out = tmp_path / "grid.png"
    r = neighbour_grid(ckpt, data, out, NeighbourOptions(queries=2, k=3, bank_images=8, **FAST))
    assert r.queries_from == "heldout" and len(r.retrieval.bank_source) == 8
    assert _png_size(out)[::-1] == grid_pixels(2, 4)
    rate = r.retrieval.same_class_rate()
    assert rate is not None and 0 <= rate <= 100
    assert sorted(r.retrieval.query_source.labels[q] for q in r.retrieval.queries) == [0, 1]


def test_grid_refuses_what_it_cannot_write(ckpt: Path, tmp_path: Path) -> None:
    data = varied_folder(tmp_path / "photos", n=4)
    with pytest.raises(ConfigError, match=r"\.png"):
        neighbour_grid(ckpt, data, tmp_path / "grid.jpg", NeighbourOptions(**FAST))
    with pytest.raises(ConfigError, match="no val/ or test/"):
        neighbour_grid(ckpt, data, tmp_path / "grid.png",
                       NeighbourOptions(queries_from="heldout", **FAST))


def test_grid_of_a_model_in_memory(tmp_path: Path) -> None:
    """The untrained network of a run (the demo's "before" grid): no checkpoint needed."""
    import torchvision

    from moco.data.recipes import CIFAR_MEAN, CIFAR_STD
    from moco.data.splits import find_dataset
    from moco.eval.features import eval_config
    from moco.eval.neighbours import plot_grid, retrieve

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    bank = find_dataset(varied_folder(tmp_path / "photos")).train
    cfg = eval_config(None, image_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, workers=0)
    r = retrieve(model, cfg, bank, bank, torch.device("cpu"),
                 NeighbourOptions(queries=2, k=3, workers=0))
    assert r.neighbours[:, 0].tolist() == r.queries
    plot_grid(r.cells(), tmp_path / "before.png", "untrained")
    assert _png_size(tmp_path / "before.png")[::-1] == grid_pixels(2, 4, title=True)
