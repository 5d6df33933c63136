"""One feature vector per image of a folder (``moco embed``).

Every image under ``IMAGES`` (recursively, sorted by path) goes through the pretrained
encoder with the evaluation preprocessing (resize + center crop, the pretraining run's
normalisation) and yields one row of an [N, D] float32 matrix. Output:

* ``FILE.npy``: the matrix (``np.load``) plus ``FILE.npy.json`` with ``files`` (paths
  relative to ``IMAGES``, row order) and what produced them;
* ``FILE.safetensors``: tensor ``embeddings`` [N, D]; the file list (JSON) and the same
  description in the metadata.

With ``--plot MAP.png`` it also draws their 2-D map (:func:`moco.eval.maps.plot_embedding_file`:
UMAP, t-SNE or PCA, coloured by class folder, a few images at their points).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moco.data.folders import images_under
from moco.data.shards import ShardSource, shard_source
from moco.data.source import IMAGE_EXTENSIONS, DataError, open_rgb
from moco.eval.config import EMBED_SUFFIXES, EmbedConfig
from moco.utils.paths import check_output, check_writable_parent
from moco.utils.settings import checked_instance, from_parameters

OUTPUT_SUFFIXES = EMBED_SUFFIXES
__all__ = ["EmbedConfig", "EmbedResult", "embed_images", "list_images"]


@dataclass
class EmbedResult:
    path: Path
    files: list[str]
    embeddings_shape: tuple[int, int]
    skipped: list[str] = field(default_factory=list)
    sidecar: Path | None = None
    plot: Path | None = None  # the 2-D map (--plot), and the projection it used
    plot_method: str | None = None


def list_images(root: str | Path, skip_bad: bool = False) -> list[Path]:
    """Image files under ``root`` (any depth, hidden files and folders skipped), sorted; or
    ``root`` itself when it is an image file. A folder that cannot be listed is an error, or
    with ``skip_bad`` a warning naming how many were left out."""
    r = Path(root)
    if r.is_file():
        if r.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{r} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [r]
    if not r.is_dir():
        raise DataError(f"{r} does not exist")
    unreadable: list[tuple[Path, str]] = []
    files = images_under(r, unreadable)
    if unreadable:
        where, why = unreadable[0]
        if not skip_bad:
            raise DataError(f"cannot list the folder {where}: {why} ({len(unreadable)} "
                            f"unreadable folder(s) under {r}); fix its permissions, or pass "
                            "--skip-bad to leave it out")
        logging.getLogger(__name__).warning(
            f"moco embed: warning: left out {len(unreadable)} unreadable folder(s), e.g. "
            f"{where} ({why})")
    if not files:
        raise DataError(f"no images found under {r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


class _Files(Dataset[tuple[torch.Tensor, int]]):
    """Item i -> (image [3,S,S], i), or (zeros, -1 - i) for an unreadable file (the error is
    raised in the main process, so the message is not wrapped in a worker traceback)."""

    def __init__(self, files: list[Path], transform: Any, size: int) -> None:
        self.files, self.transform, self.size = files, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return self.transform(open_rgb(self.files[i])), i
        except DataError:
            return torch.zeros(3, self.size, self.size), -1 - i


class _Samples(_Files):
    """:class:`_Files` over the samples of tar shards (:mod:`moco.data.shards`)."""

    def __init__(self, source: ShardSource, transform: Any, size: int) -> None:
        super().__init__([], transform, size)
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return self.transform(self.source.load(i)), i
        except DataError:
            return torch.zeros(3, self.size, self.size), -1 - i


def _checked(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], files: list[Path],
             skip_bad: bool, shards: ShardSource | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, idx in batches:
        bad = idx[idx < 0]
        if len(bad) and not skip_bad and shards is not None:
            shards.load(-1 - int(bad[0]))  # raises its DataError, naming the sample
        if len(bad) and not skip_bad:
            f = files[-1 - int(bad[0])]
            try:
                open_rgb(f)
            except DataError as e:
                raise DataError(f"{e} (pass --skip-bad to leave unreadable images out)") from None
            raise DataError(f"cannot read image {f} (pass --skip-bad to leave it out)")
        yield x, idx


def embed_images(images: str | Path | EmbedConfig, pretrained: str | Path | None = None,
                 out: str | Path | None = None, *, progress: bool = True,
                 **settings: Any) -> EmbedResult:
    """Write the features [N, D] of every image under ``images`` to ``out`` (.npy or
    .safetensors) with the file list; see the module docstring. ``settings``: the fields of
    :class:`EmbedConfig` (``features="head"``, ``normalize=True``, ``device="cpu"``, ...), each
    checked (an error names the parameter); or pass an :class:`EmbedConfig` as ``images``."""
    if isinstance(images, EmbedConfig):
        cfg = checked_instance(EmbedConfig, "embed_images", {**asdict(images), **settings})
    else:
        if pretrained is None or out is None:
            raise TypeError("embed_images() needs pretrained (the checkpoint) and out (the "
                            "file to write)")
        cfg = checked_instance(EmbedConfig, "embed_images", {
            "images": images, "pretrained": pretrained, "out": out, **settings})
    cfg.validate(from_parameters("embed_images"))
    root, out_p = Path(cfg.images), Path(cfg.out)
    shards = shard_source(root)  # a .tar shard or a folder of them: their samples
    files = list_images(root, cfg.skip_bad) if shards is None else []
    _check_outputs(out_p, cfg.pretrained, root, files)
    if cfg.plot:
        _check_plot(cfg, root, files)
    emb, index, info, size = _embed(cfg, files, shards, progress)
    ok = index >= 0
    base = root if root.is_dir() else root.parent
    names = ([p.relative_to(base).as_posix() for p in files] if shards is None else
             [shards.short_name(i) for i in range(len(shards))])
    skipped = [n for n, good in zip(names, ok.tolist(), strict=True) if not good]
    if skipped:
        emb = emb[ok]
        names = [n for n, good in zip(names, ok.tolist(), strict=True) if good]
    meta = {"root": str(root), "checkpoint": str(cfg.pretrained), "arch": info.arch,
            "cifar_stem": info.cifar_stem, "features": info.features,
            "feature_dim": int(emb.shape[1]), "image_size": size, "normalized": cfg.normalize,
            "count": len(names)}
    sidecar = _write(out_p, emb, meta, names, skipped)
    result = EmbedResult(out_p, names, (int(emb.shape[0]), int(emb.shape[1])), skipped, sidecar)
    if cfg.plot:
        from moco.eval.maps import plot_embedding_file

        result.plot = Path(cfg.plot)
        result.plot_method = plot_embedding_file(out_p, cfg.plot, method=cfg.plot_method)
    return result


def _check_plot(cfg: EmbedConfig, root: Path, files: list[Path]) -> None:
    """``--plot``: a PNG that is none of the inputs nor ``--out``, outside the image folder,
    in a writable folder; its ``--plot-method``'s package installed (before any work)."""
    from moco.eval.maps import MIN_POINTS_NONLINEAR, resolve_method

    check_output(cfg.plot, "--plot", files={"the input checkpoint (--pretrained)": cfg.pretrained,
                                            "an input image": files, "--out": cfg.out},
                 folders={"the image folder": root if root.is_dir() else None})
    check_writable_parent(Path(cfg.plot), "--plot")
    resolve_method(cfg.plot_method, MIN_POINTS_NONLINEAR)


def _check_outputs(out: Path, pretrained: str, root: Path, files: list[Path]) -> None:
    """The output file (and the .npy's sidecar) is never the checkpoint or an image, never
    inside the image folder, and its folder is writable."""
    outputs = [out] + ([out.with_name(out.name + ".json")] if out.suffix == ".npy" else [])
    for o in outputs:
        check_output(o, "--out", files={"the input checkpoint (--pretrained)": pretrained,
                                        "an input image": files},
                     folders={"the image folder": root if root.is_dir() else None})
    check_writable_parent(out, "--out")


def _embed(cfg: EmbedConfig, files: list[Path], shards: ShardSource | None,
           progress: bool) -> tuple[torch.Tensor, torch.Tensor, Any, int]:
    """The features [N, D] of every image (rows of unreadable ones with index < 0), their
    indexes, what the checkpoint is, and the image size used."""
    from tqdm import tqdm

    from moco.data.augment import eval_transform
    from moco.eval.encoders import load_encoder
    from moco.eval.features import extract_features
    from moco.utils.runtime import default_workers, resolve_device

    dev = resolve_device(cfg.device)
    model, info = load_encoder(cfg.pretrained, cfg.arch, dev, features=cfg.features)
    size = cfg.image_size or info.image_size
    tf = eval_transform(size, info.mean, info.std)
    nw = cfg.workers if cfg.workers >= 0 else default_workers(dev)
    data = _Files(files, tf, size) if shards is None else _Samples(shards, tf, size)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False,
                        num_workers=nw, pin_memory=dev.type == "cuda")
    with tqdm(total=len(data), desc="embed", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        emb, index = extract_features(model, _checked(loader, files, cfg.skip_bad, shards), dev,
                                      n=len(data), normalize=cfg.normalize, progress=bar)
    return emb, index, info, size


def _write(out: Path, emb: torch.Tensor, meta: dict[str, Any], names: list[str],
           skipped: list[str]) -> Path | None:
    """``out`` as .npy (+ its JSON sidecar, returned) or .safetensors (file list in the
    metadata), each written atomically."""
    from moco.eval.export import write_safetensors
    from moco.utils.atomic import atomic_write, atomic_write_text

    if out.suffix == ".npy":
        array = emb.numpy()
        atomic_write(out, lambda f: np.save(f, array))
        sidecar = out.with_name(out.name + ".json")
        text = json.dumps({**meta, "files": names, "skipped": skipped}, indent=1) + "\n"
        atomic_write_text(sidecar, text)
        return sidecar
    metadata = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}
    metadata["files"] = json.dumps(names)
    metadata["skipped"] = json.dumps(skipped)
    write_safetensors(out, {"embeddings": emb.contiguous()}, metadata)
    return None
