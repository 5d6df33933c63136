"""A 2-D map of embeddings: one point per image, coloured by class when labels exist, with a
few images drawn at their points.

The projection is UMAP (McInnes et al. 2018) when ``umap-learn`` is installed, else t-SNE
(van der Maaten & Hinton 2008) from scikit-learn, else PCA (numpy only, always there): both
optional packages are the ``plots`` extra (``pip install 'momentum-contrast[plots]'``). Asked
for by name and missing, they are a one-line error naming the extra. The figure is drawn
with matplotlib's Figure API (no pyplot, no backend chosen: :func:`moco.utils.runlog.new_figure`)
and written atomically.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moco.core.errors import ConfigError
from moco.eval.config import MAP_METHODS
from moco.utils.runlog import new_figure, save_figure

_log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'momentum-contrast[plots]'"
#: Below this many points t-SNE and UMAP say little: "auto" draws PCA.
MIN_POINTS_NONLINEAR = 10


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The rows of ``x`` [N, D] on their first two principal axes [N, 2] (float64; centred,
    SVD; each axis's sign fixed so that its largest loading is positive). Fewer than two
    axes of variation give zeros in the missing column."""
    a = np.asarray(x, dtype=np.float64)
    a = a - a.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    out = np.zeros((a.shape[0], 2))
    for j in range(min(2, vt.shape[0])):
        v = vt[j] * (1.0 if vt[j][np.argmax(np.abs(vt[j]))] >= 0 else -1.0)
        out[:, j] = a @ v
    return out


def resolve_method(method: str, n: int) -> str:
    """The projection ``method`` (:data:`MAP_METHODS`) used for ``n`` points: ``auto`` is
    UMAP, else t-SNE, else PCA (and PCA under :data:`MIN_POINTS_NONLINEAR` points). A named
    method whose package is missing is a :class:`ConfigError` naming the extra."""
    if method not in MAP_METHODS:
        raise ConfigError(f"expected --plot-method one of {', '.join(MAP_METHODS)}, got {method!r}")
    if method == "auto":
        if n < MIN_POINTS_NONLINEAR:
            return "pca"
        if _installed("umap"):
            return "umap"
        return "tsne" if _installed("sklearn") else "pca"
    need = {"umap": ("umap", "umap-learn"), "tsne": ("sklearn", "scikit-learn")}.get(method)
    if need is not None and not _installed(need[0]):
        raise ConfigError(f"--plot-method {method} needs {need[1]}, which is not installed: "
                          f"{EXTRA_HINT} (or pass --plot-method pca)")
    return method


def project_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``x`` [N, D] mapped to [N, 2] by ``method`` (:func:`resolve_method`); returns the
    coordinates and the method used. Deterministic for a ``seed``."""
    a = np.asarray(x, dtype=np.float32)
    n = a.shape[0]
    used = resolve_method(method, n)
    if used == "pca" and method == "auto" and n >= MIN_POINTS_NONLINEAR:
        _log.info(f"embedding map: PCA (for t-SNE or UMAP: {EXTRA_HINT})")
    if used == "pca" or n < 3:
        return pca_2d(a), "pca"
    if used == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(max(1.0, min(30.0, (n - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(a), used
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), random_state=seed)
    return np.asarray(reducer.fit_transform(a)), used


def spread_points(xy: np.ndarray, count: int) -> list[int]:
    """``count`` indices of points spread over the map (farthest-point sampling from the
    point nearest the centre): where the thumbnails go."""
    n = xy.shape[0]
    if count <= 0 or n == 0:
        return []
    first = int(np.argmin(((xy - xy.mean(axis=0)) ** 2).sum(axis=1)))
    chosen = [first]
    dist = ((xy - xy[first]) ** 2).sum(axis=1)
    while len(chosen) < min(count, n):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, ((xy - xy[nxt]) ** 2).sum(axis=1))
    return chosen


def _scatter(ax: Any, xy: np.ndarray, labels: Sequence[int] | None,
             classes: Sequence[str] | None) -> list[Any]:
    """The points, one colour per class (legend up to 20 classes); returns each point's
    colour."""
    import matplotlib

    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=9, color="tab:blue", alpha=0.7, linewidths=0)
        return ["tab:blue"] * xy.shape[0]
    y = np.asarray(labels)
    found = sorted(set(y.tolist()))
    cmap = matplotlib.colormaps["tab10" if len(found) <= 10 else "tab20" if len(found) <= 20
                                else "turbo"]
    colours = {c: cmap(j if len(found) <= 20 else j / max(1, len(found) - 1))
               for j, c in enumerate(found)}
    for c in found:
        name = classes[c] if classes is not None and 0 <= c < len(classes) else str(c)
        ax.scatter(xy[y == c, 0], xy[y == c, 1], s=9, color=colours[c], alpha=0.8,
                   linewidths=0, label=name)
    if len(found) <= 20:
        ax.legend(loc="best", fontsize=7, markerscale=2, frameon=False)
    return [colours[c] for c in y.tolist()]


def _thumbnails(ax: Any, xy: np.ndarray, load: Callable[[int], Image.Image], count: int,
                colours: Sequence[Any], pixels: int = 36) -> None:
    """``count`` images spread over the map (at most a quarter of the points, so that the
    points stay visible), each framed in its point's colour."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    for i in spread_points(xy, min(count, max(1, xy.shape[0] // 4))):
        img = load(i).convert("RGB").resize((pixels, pixels), Image.Resampling.BILINEAR)
        box = AnnotationBbox(OffsetImage(np.asarray(img), zoom=1.0), (xy[i, 0], xy[i, 1]),
                             frameon=True, pad=0.15,
                             bboxprops={"edgecolor": colours[i], "linewidth": 2})
        ax.add_artist(box)


def plot_embedding_map(features: np.ndarray | Any, path: str | Path, *,
                       labels: Sequence[int] | None = None, classes: Sequence[str] | None = None,
                       thumbnail: Callable[[int], Image.Image] | None = None,
                       thumbnails: int = 12, method: str = "auto",
                       title: str | None = None) -> str:
    """Draw the 2-D map of ``features`` [N, D] (a numpy array or a tensor) to the PNG
    ``path``: one point per row, coloured by ``labels`` [N] (class indices; names from
    ``classes``) when given, and ``thumbnails`` images (``thumbnail(i)``: row i's image)
    drawn at points spread over the map. Returns the projection used (``umap``, ``tsne``
    or ``pca``: :func:`project_2d`, seed 0: the same map for the same features)."""
    x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ConfigError(f"an embedding map needs at least 2 embeddings [N, D], got shape "
                          f"{tuple(x.shape)}")
    if labels is not None and len(labels) != x.shape[0]:
        raise ValueError(f"{len(labels)} labels for {x.shape[0]} embeddings")
    xy, used = project_2d(x, method, seed=0)
    fig = new_figure(figsize=(8, 8))
    ax = fig.add_subplot(1, 1, 1)
    colours = _scatter(ax, xy, labels, classes)
    if thumbnail is not None:
        _thumbnails(ax, xy, thumbnail, thumbnails, colours)
    ax.margins(0.08)  # room for the thumbnails at the edges
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{x.shape[0]} embeddings ({x.shape[1]}-d), {used.upper()}")
    fig.tight_layout()
    save_figure(fig, Path(path))
    return used


def labels_from_names(names: Sequence[str]) -> tuple[list[int] | None, list[str]]:
    """Class labels from relative file names in the ImageFolder layout (``class/file.jpg``,
    any depth below): the top folder of each name, when every name has one and there are at
    least two; else ``(None, [])``."""
    tops = [n.split("/", 1)[0] if "/" in n and ":" not in n else None for n in names]
    if not tops or any(t is None for t in tops):
        return None, []
    classes = sorted({t for t in tops if t is not None})
    if len(classes) < 2:
        return None, []
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in tops if t is not None], classes


def read_embedding_file(path: str | Path) -> tuple[np.ndarray, list[str], str]:
    """What ``moco embed`` wrote: the embeddings [N, D], the file names (relative to the
    image root) and the image root, from FILE.npy + FILE.npy.json or FILE.safetensors."""
    p = Path(path)
    if p.suffix == ".npy":
        side = json.loads(p.with_name(p.name + ".json").read_text())
        return np.load(p, allow_pickle=False), list(side["files"]), str(side.get("root", ""))
    from safetensors import safe_open

    with safe_open(str(p), framework="numpy") as f:
        meta = f.metadata() or {}
        return f.get_tensor("embeddings"), json.loads(meta.get("files", "[]")), meta.get("root", "")


def plot_embedding_file(embeddings: str | Path, path: str | Path, *, method: str = "auto",
                        thumbnails: int = 12) -> str:
    """:func:`plot_embedding_map` of a file written by ``moco embed`` (``moco embed --plot``):
    coloured by the images' top folders when they are class folders, thumbnails read from
    the image root (none for tar shards). Returns the projection used."""
    from moco.data.source import open_rgb

    x, names, root = read_embedding_file(embeddings)
    labels, classes = labels_from_names(names)
    base = Path(root) if root else None
    if base is not None and base.is_file():  # one image: its name is relative to its folder
        base = base.parent
    if base is None or not base.is_dir() or any(".tar:" in n for n in names):
        base = None  # tar shards (SHARD.tar:KEY.jpg), or the images moved: no thumbnails
    load = (lambda i: open_rgb(base / names[i])) if base is not None else None
    return plot_embedding_map(x, path, labels=labels, classes=classes or None, thumbnail=load,
                              thumbnails=thumbnails, method=method,
                              title=f"{Path(embeddings).name}: {x.shape[0]} images")
