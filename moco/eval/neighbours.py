"""Nearest-neighbour retrieval grids: a few query images, each followed by its top-k most
similar images of a bank, with the cosine similarity under each (``moco neighbours``).

The features are the kNN protocol's (:func:`moco.eval.features.source_features`: the
pretraining run's evaluation pipeline and settings, L2-normalised), so a grid shows what the
kNN monitor's neighbours are. When the queries are drawn from the bank itself, each query's
first neighbour is the query (similarity 1.00): a check of the grid that costs one column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from moco.core.errors import ConfigError
from moco.data.source import ImageSource
from moco.eval.config import NeighboursConfig
from moco.utils.runlog import new_figure, save_figure

if TYPE_CHECKING:
    from moco.eval.features import EvalSettings

#: Pixels of one grid cell (an image), and of the caption row under it.
CELL_PX = 112
CAPTION_PX = 28
QUERY_SOURCES = ("auto", "heldout", "bank")


@torch.no_grad()
def nearest_neighbours(query: torch.Tensor, bank: torch.Tensor, k: int,
                       chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar bank rows of each query: ``(similarities [Q, k], indices
    [Q, k])``, most similar first, for L2-normalised ``query`` [Q, D] and ``bank`` [N, D]
    (cosine similarity = dot product). The bank is scanned in chunks of ``chunk`` rows."""
    k = min(k, bank.shape[0])
    best_s = torch.full((query.shape[0], 0), float("-inf"))
    best_i = torch.zeros((query.shape[0], 0), dtype=torch.long)
    q = query.float().cpu()
    for start in range(0, bank.shape[0], chunk):
        sim = q @ bank[start:start + chunk].float().cpu().T
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)
        best_s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
    return best_s, best_i


@dataclass
class GridCell:
    """One image of the grid and its caption; ``match``: same class as the row's query
    (True/False, drawn green/red) or None (unlabeled)."""

    image: Image.Image
    caption: str
    match: bool | None = None


def grid_pixels(rows: int, columns: int, title: bool = False) -> tuple[int, int]:
    """(height, width) in pixels of a grid of ``rows`` x ``columns`` cells (and a title
    strip of one caption's height when ``title``)."""
    return (CAPTION_PX if title else 0) + rows * (CELL_PX + CAPTION_PX), columns * CELL_PX


def plot_grid(rows: Sequence[Sequence[GridCell]], path: str | Path, title: str | None = None) -> None:
    """Draw ``rows`` of cells (each row: the query, framed in blue, then its neighbours) as
    one PNG of exactly :func:`grid_pixels` pixels, ``title`` on a strip above."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    height, width = grid_pixels(n_rows, n_cols, bool(title))
    fig = new_figure(figsize=(width / 100, height / 100))
    top = CAPTION_PX if title else 0
    for r, row in enumerate(rows):
        y0 = top + r * (CELL_PX + CAPTION_PX)  # pixels from the top of the figure
        for c, cell in enumerate(row):
            box = (c * CELL_PX / width, 1 - (y0 + CELL_PX) / height, CELL_PX / width,
                   CELL_PX / height)
            ax = fig.add_axes(box)
            ax.imshow(np.asarray(cell.image.convert("RGB")), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = {True: "tab:green", False: "tab:red", None: "black"}[cell.match]
            for side in ax.spines.values():
                side.set_edgecolor("tab:blue" if c == 0 else colour)
                side.set_linewidth(3 if c == 0 else 1.5)
            fig.text((c + 0.5) * CELL_PX / width, 1 - (y0 + CELL_PX + CAPTION_PX / 2) / height,
                     cell.caption, ha="center", va="center", fontsize=7, color=colour)
    if title:
        fig.text(0.5, 1 - CAPTION_PX / 2 / height, title, ha="center", va="center", fontsize=8)
    save_figure(fig, Path(path))


def _name(source: ImageSource, i: int) -> str:
    if source.files is not None:
        return str(source.files[i])
    return f"{source.name or 'images'}[{i}]"


def _label_text(source: ImageSource, i: int) -> str:
    if source.labels is None:
        return ""
    y = source.labels[i]
    return source.classes[y] if 0 <= y < len(source.classes) else str(y)


def _thumb(source: ImageSource, i: int) -> Image.Image:
    return source.load(i).convert("RGB").resize((CELL_PX, CELL_PX), Image.Resampling.BILINEAR)


@dataclass
class Retrieval:
    """Queries and their neighbours: indices into ``query_source`` and ``bank_source``,
    similarities [Q, k]."""

    query_source: ImageSource
    bank_source: ImageSource
    queries: list[int]
    neighbours: torch.Tensor
    similarities: torch.Tensor
    same_class: list[list[bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        qs, bs = self.query_source, self.bank_source
        if qs.labels is not None and bs.labels is not None and qs.classes == bs.classes:
            self.same_class = [[bs.labels[int(j)] == qs.labels[q] for j in row]
                               for q, row in zip(self.queries, self.neighbours, strict=True)]

    def cells(self) -> list[list[GridCell]]:
        rows = []
        for r, q in enumerate(self.queries):
            label = _label_text(self.query_source, q)
            row = [GridCell(_thumb(self.query_source, q), f"query {label}".strip())]
            for c, (j, s) in enumerate(zip(self.neighbours[r].tolist(),
                                           self.similarities[r].tolist(), strict=True)):
                match = self.same_class[r][c] if self.same_class else None
                text = f"{s:.2f} {_label_text(self.bank_source, j)}".strip()
                row.append(GridCell(_thumb(self.bank_source, j), text, match))
            rows.append(row)
        return rows

    def same_class_rate(self) -> float | None:
        """The share of neighbours of the query's class (%), when both are labeled."""
        flat = [m for row in self.same_class for m in row]
        return 100.0 * sum(flat) / len(flat) if flat else None

    def names(self) -> tuple[list[str], list[list[str]]]:
        """The queries' names and their neighbours' names (files, or SOURCE[i])."""
        return ([_name(self.query_source, q) for q in self.queries],
                [[_name(self.bank_source, int(j)) for j in row] for row in self.neighbours])


def pick(n_total: int, n: int, seed: int, labels: list[int] | None = None) -> list[int]:
    """``n`` of ``n_total`` indices drawn with ``seed`` (class-balanced when ``labels``),
    sorted; all of them when ``n`` is 0 or at least ``n_total``."""
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    if labels is not None:
        from moco.data.datasets import class_balanced_subset

        return sorted(class_balanced_subset(labels, n, seed))
    from moco.core.seeding import keyed_generator

    order = torch.randperm(n_total, generator=keyed_generator("moco-neighbours", seed))
    return sorted(order[:n].tolist())


def check_query_source(value: str) -> None:
    if value not in QUERY_SOURCES:
        raise ConfigError(f"expected --queries-from one of {', '.join(QUERY_SOURCES)}, got "
                          f"{value!r}")


#: The settings of :func:`neighbour_grid` (``moco neighbours --help`` describes each),
#: declared once in :mod:`moco.eval.config`.
NeighbourOptions = NeighboursConfig


@dataclass
class NeighbourResult:
    path: Path
    retrieval: Retrieval
    features: str
    feature_dim: int
    queries_from: str


def neighbour_sources(data: str | Path, o: NeighbourOptions) -> tuple[ImageSource, ImageSource, str]:
    """The bank (``--bank-images`` of DATA's train split, class-balanced when labeled), the
    query source and where the queries come from (``heldout``: val/ or test/; ``bank``)."""
    from moco.data.splits import find_dataset

    splits = find_dataset(data)
    bank = splits.train.subset(pick(len(splits.train), o.bank_images, o.seed, splits.train.labels))
    where = o.queries_from
    if where == "auto":
        where = "heldout" if splits.test is not None else "bank"
    if where == "heldout" and splits.test is None:
        raise ConfigError(f"--queries-from heldout: {data} has no val/ or test/ split; pass "
                          "--queries-from bank")
    return bank, (splits.test if where == "heldout" else bank) or bank, where


def retrieve(model: nn.Module, cfg: EvalSettings, bank: ImageSource, query_src: ImageSource,
             device: torch.device, options: NeighbourOptions | None = None, *,
             progress: bool = False) -> Retrieval:
    """The ``options.queries`` queries of ``query_src`` and their ``options.k`` nearest images
    of ``bank`` through ``model`` (images -> features; e.g. ``strip_head(encoder_q)`` of a
    run, trained or not), with the evaluation pipeline of ``cfg`` (a checkpoint's
    :func:`moco.eval.features.eval_config`, or ``EvalSettings(run_cfg.input_settings(),
    run_cfg.precision)`` for a run in memory: image size, mean, std, loader and precision;
    :func:`moco.eval.features.source_features`). ``query_src is bank``:
    the queries are drawn from the bank and their features reused."""
    from tqdm import tqdm

    from moco.core.seeding import keyed_seed
    from moco.eval.features import source_features
    from moco.utils.runtime import default_workers, resolve_precision

    o = options or NeighbourOptions()
    nw = o.workers if o.workers >= 0 else default_workers(device)
    autocast = resolve_precision(cfg.precision, device)
    heldout = query_src is not bank
    queries = pick(len(query_src), o.queries, keyed_seed("moco-neighbour-queries", o.seed),
                   query_src.labels)
    total = len(bank) + (len(queries) if heldout else 0)
    with tqdm(total=total, desc="features", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        bank_f, _ = source_features(model, bank, cfg.inputs, device, nw, autocast_dtype=autocast,
                                    batch_size=o.batch_size, progress=bar)
        query_f = (source_features(model, query_src.subset(queries), cfg.inputs, device, nw,
                                   autocast_dtype=autocast, batch_size=o.batch_size,
                                   progress=bar)[0] if heldout else bank_f[queries])
    sims, idx = nearest_neighbours(query_f, bank_f, o.k)
    return Retrieval(query_src, bank, queries, idx, sims)


def neighbour_grid(pretrained: str | Path, data: str | Path, out: str | Path,
                   options: NeighbourOptions | None = None, *,
                   progress: bool = False) -> NeighbourResult:
    """Write the retrieval grid of checkpoint ``pretrained`` on ``data`` (anything ``moco
    pretrain`` reads) to the PNG ``out``: ``queries`` images (from val/ or test/, else from
    the bank; seeded, class-balanced when labeled), each with its ``k`` nearest images of the
    bank (the train split, ``bank_images`` of it; 0: all)."""
    from moco.eval.encoders import load_encoder
    from moco.eval.features import eval_config
    from moco.utils.paths import check_output, check_writable_parent
    from moco.utils.runtime import default_workers, resolve_device

    o = options or NeighbourOptions()
    check_query_source(o.queries_from)
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--output {out}: the grid is a PNG image; give a name ending in .png")
    check_output(out, "--output", files={"the input checkpoint": pretrained},
                 folders={"the data folder": data})
    check_writable_parent(out, "--output")
    bank, query_src, where = neighbour_sources(data, o)
    dev = resolve_device(o.device)
    model, info = load_encoder(pretrained, None, dev, features=o.features)
    cfg = eval_config(info.config, image_size=o.image_size or info.image_size, mean=info.mean,
                      std=info.std, workers=o.workers if o.workers >= 0 else default_workers(dev),
                      precision=o.precision)
    r = retrieve(model, cfg, bank, query_src, dev, o, progress=progress)
    plot_grid(r.cells(), out, o.title)
    return NeighbourResult(Path(out), r, info.features, info.feature_dim, where)
