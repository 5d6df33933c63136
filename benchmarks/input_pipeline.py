"""The input pipeline at ImageNet scale on this machine (issue 16), on synthetic ImageNet-like
JPEGs generated in a temporary folder (``--workdir``; nothing is downloaded):

  decode  decode + augment images/s per core (one process, one torch thread; a core's work
          in a DataLoader worker plus its share of the main process's augmentation):
            short-side (before)  today's worker decoding: PIL decode, resize to short side 256
                                 (long side cut to 512), crops drawn on that (moco.data.cache's
                                 layout, DecodeTrainLoader)
            original, PIL        crops drawn on the original size, PIL decode + crop + resize
            original, decode_jpeg  the same with torchvision.io.decode_jpeg on the CPU
            original, reduced    decode_jpeg, or PIL's draft (DCT 1/2-1/8 decode) where every
                                 crop of the image allows it (the default)
          Process CPU time is the per-core figure (steady under load); wall time is printed too.
  startup seconds from nothing to a listed dataset with every image's size, for --images
          ImageNet-like files and --tiny tiny files: today (listing + the decoded cache's size
          probe, declined as it is at ImageNet scale, at every start), with the index (first
          start: listing + parallel header reads; later starts: the stored index). Each in a
          fresh process; the files are in the page cache (the first start's cold-disk cost
          is not measured).
  shards  write the set as tar shards (moco shard), then read every sample's bytes: shards in
          a reader's order (sequential) vs the folder's files in an epoch's order, from the
          page cache and cold (posix_fadvise DONTNEED on those files first), MB/s.

    .venv/bin/python benchmarks/input_pipeline.py                       # all; generates the sets
    .venv/bin/python benchmarks/input_pipeline.py --only decode --images 20000 --decode-images 2048
    .venv/bin/python benchmarks/input_pipeline.py --only startup --baseline-src /tmp/moco-head

``--baseline-src DIR``: also time the start-up of another copy of the package (e.g. the
commit before the index: ``git archive <commit> moco | tar -x -C DIR``; it must be complete:
a module missing there is taken from the editable install).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def synthetic_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields (a few random colours upsampled bicubic)
    plus 2-pixel texture and fine noise, so JPEG sizes and decode times are close to
    ImageNet's (~110 KB and a few ms at 500x375, quality 90)."""
    small = rng.integers(0, 256, (int(rng.integers(6, 14)), int(rng.integers(6, 14)), 3),
                         dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC),
                      dtype=np.float32)
    tex = rng.normal(0, 18, (h // 2 + 1, w // 2 + 1, 1)).astype(np.float32)
    tex = np.repeat(np.repeat(tex, 2, 0), 2, 1)[:h, :w]
    noise = rng.normal(0, 5, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + tex + noise, 0, 255).astype(np.uint8))


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(w, h): long side 500 for 3 images in 4 (as most of ImageNet), else 300-1000, and 1 in
    50 a large photo (1500-3000); short side 0.6-0.85 of the long; landscape 3 in 4."""
    u = rng.random()
    long = 500 if u < 0.75 else int(rng.integers(1500, 3001)) if u > 0.98 else int(rng.integers(300, 1001))
    short = int(long * rng.uniform(0.6, 0.85))
    return (long, short) if rng.random() < 0.75 else (short, long)


def make_imagenet_like(root: Path, n: int, seed: int = 0, classes: int = 100,
                       quality: int = 90) -> Path:
    """ROOT/train/cNNN/NNNNNN.jpg: ``n`` JPEGs (sizes :func:`imagenet_like_size`) in
    ``classes`` folders. Existing files are kept (a rerun completes a partial set)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = imagenet_like_size(rng)
        sub = rng.integers(0, 2**31)
        path = root / "train" / f"c{i % classes:03d}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(np.random.default_rng(sub), w, h).save(path, quality=quality)
    return root


def make_tiny(root: Path, n: int, seed: int = 0, classes: int = 1000) -> Path:
    """ROOT/train/cNNNN/NNNNNNN.jpg: ``n`` tiny JPEGs (8-40 px, random sizes) for start-up
    timings, where only the file count matters."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / "train" / f"c{i % classes:04d}" / f"{i:07d}.jpg"
        w, h = (int(x) for x in rng.integers(8, 41, 2))
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    return root


# ----- decode + augment ------------------------------------------------------------------

def bench_decode(root: Path, cache: Path, n: int, batch: int, size: int, aug: str,
                 repeat: int) -> None:
    import torch

    from moco.data.batch_augment import BatchAugment
    from moco.data.batches import step_generator
    from moco.data.crop_loader import CropTrainLoader, FileReader, Meta
    from moco.data.decode import draft_scale
    from moco.data.index import listed_folder
    from moco.data.input_plan import cache_short_side
    from moco.data.tensor_loader import _DecodeBatches
    from moco.engine.config import MocoConfig

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    src = listed_folder(root / "train", cache_dir=cache)
    h = src.headers(os.cpu_count() or 1)
    cfg = MocoConfig(batch_size=batch, image_size=size, aug=aug)
    order = np.random.default_rng(0).permutation(len(src))[: n - n % batch]
    steps = [order[k:k + batch].tolist() for k in range(0, len(order), batch)]
    short = _DecodeBatches(src, cache_short_side(size), "stop")
    aug_ = BatchAugment(cfg.aug, size, cfg.crop_min_scale, cfg.mean, cfg.std)
    crops = CropTrainLoader(cfg, FileReader(src.files or []), Meta(h[:, 0], h[:, 1], h[:, 2]),
                            torch.device("cpu"), 0)
    reduced = {"n": 0}

    def short_side(step: int, idx: list[int]) -> tuple[float, float]:
        c = time.process_time()
        imgs, sizes, _ = short[[(i, 0) for i in idx]]
        c1 = time.process_time()
        p = aug_.params(sizes[:, 0], sizes[:, 1], step_generator(0, 0, step))
        aug_.two_views(imgs, p)
        return c1 - c, time.process_time() - c1

    def original(pil: bool, reduce: bool):  # noqa: ANN202
        def run(step: int, idx: list[int]) -> tuple[float, float]:
            crops.work.pil, crops.work.reduce = pil, reduce
            c = time.process_time()
            work = crops.work(0, step, idx)
            c1 = time.process_time()
            crops.finish(work)
            if reduce:
                b = len(idx)
                reduced["n"] += sum(draft_scale(work.crops[[k, b + k]], size, int(h[i, 2])) > 1
                                    for k, i in enumerate(idx))
            return c1 - c, time.process_time() - c1
        return run

    variants = {"short-side (before)": short_side, "original, PIL": original(True, False),
                "original, decode_jpeg": original(False, False),
                "original, reduced (default)": original(False, True)}
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(repeat):  # interleaved: a burst of load hits every variant alike
        for name, fn in variants.items():
            w0 = time.perf_counter()
            parts = [fn(s, idx) for s, idx in enumerate(steps)]
            wall = time.perf_counter() - w0
            dec, augt = sum(p[0] for p in parts), sum(p[1] for p in parts)
            if name not in best or dec + augt < sum(best[name][:2]):
                best[name] = (dec, augt, wall)
    imgs = len(order)
    print(f"\ndecode + augment: {imgs} ImageNet-like JPEGs, batches of {batch}, {size} px crops, "
          f"aug {aug}, 1 torch thread, best of {repeat}")
    print(f"{'path':30s} {'img/s/core':>11s} {'decode+crop':>12s} {'augment':>9s} {'wall img/s':>11s}")
    base = None
    for name, (dec, augt, wall) in best.items():
        per_core = imgs / (dec + augt)
        base = base or per_core
        print(f"{name:30s} {per_core:11.1f} {imgs / dec:10.1f}/s {imgs / augt:7.1f}/s "
              f"{imgs / wall:11.1f}   x{per_core / base:.2f}")
    print(f"reduced-size decodes: {reduced['n'] / (imgs * repeat):.1%} of the images "
          f"(every crop of the image >= 2 x {size} px)")


# ----- start-up -----------------------------------------------------------------------------

TODAY = """
import sys, time
from pathlib import Path
t = time.perf_counter()
try:
    from moco.data.folders import image_folder
    from moco.data.cache import cached_images
except ImportError:  # a --baseline-src copy from before the moco/data/ layout
    from moco.data import image_folder
    from moco.cache import cached_images
t1 = time.perf_counter()
src = image_folder(Path(sys.argv[1]) / "train")  # the listing without the index
cached_images(src, sys.argv[2], budget=1, log=lambda m: None)  # probes every file, declines
print(time.perf_counter() - t1, t1 - t, len(src))
"""
INDEXED = """
import sys, time
t = time.perf_counter()
from moco.data.splits import find_dataset
t1 = time.perf_counter()
src = find_dataset(sys.argv[1], cache_dir=sys.argv[2]).train
h = src.headers(int(sys.argv[3]))
print(time.perf_counter() - t1, t1 - t, len(src))
"""


def _child(code: str, args: list[str], pythonpath: Path, imports: list[float]) -> float:
    """Seconds of the data work in a fresh process (its imports' seconds go to ``imports``)."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, check=True)
    data, imp, _ = out.stdout.split()
    imports.append(float(imp))
    return float(data)


def bench_startup(sets: list[Path], cache: Path, workers: int, baseline: Path | None) -> None:
    print(f"\nstart-up: listing + every image's size, each in a fresh process ({workers} "
          "header-reading processes for the index); seconds after the imports")
    print(f"{'files':>8s} {'today':>9s} {'baseline':>9s} {'1st start':>10s} {'later':>7s} "
          f"{'later 2':>8s}")
    imports: list[float] = []
    for root in sets:
        c = cache / f"startup-{root.name}"
        shutil.rmtree(c, ignore_errors=True)
        c.mkdir(parents=True)
        today = _child(TODAY, [str(root), str(c)], REPO, imports)
        base = (_child(TODAY, [str(root), str(c)], baseline, imports) if baseline
                else float("nan"))
        shutil.rmtree(c / "index", ignore_errors=True)
        first = _child(INDEXED, [str(root), str(c), str(workers)], REPO, imports)
        later = [_child(INDEXED, [str(root), str(c), str(workers)], REPO, imports)
                 for _ in range(2)]
        n = sum(1 for _ in (root / "train").rglob("*.jpg"))
        print(f"{n:8d} {today:8.2f}s {base:8.2f}s {first:9.2f}s {later[0]:6.2f}s {later[1]:7.2f}s")
    print(f"(imports of moco + torch before that: {min(imports):.1f}-{max(imports):.1f} s per "
          "process)")


# ----- shards -----------------------------------------------------------------------------

def _drop(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_shards(root: Path, cache: Path, shard_size: str, repeat: int) -> None:
    from moco.data.crop_loader import FileReader
    from moco.data.datasets import epoch_order
    from moco.data.index import listed_folder
    from moco.data.shard_loader import epoch_stream
    from moco.data.shard_writer import parse_size, write_shards
    from moco.data.shards import ShardSource, shard_index

    out = cache / f"shards-{root.name}"
    shutil.rmtree(out, ignore_errors=True)
    src = listed_folder(root / "train", cache_dir=cache)
    files = src.files or []
    t = time.perf_counter()
    written = write_shards(root, out, parse_size(shard_size), progress=False)[0]
    wt = time.perf_counter() - t
    shards = ShardSource(shard_index(out / "train", cache))
    print(f"\nshards: wrote {written.samples} images ({written.bytes / 1e6:.0f} MB) in "
          f"{len(written.shards)} shards of <= {shard_size} in {wt:.1f} s "
          f"({written.bytes / 1e6 / wt:.0f} MB/s)")
    folder_order = epoch_order(len(files), 0, 0)[0].tolist()
    shard_order = epoch_stream(shards.table[:, 0], 0, 0).tolist()
    reader = FileReader(files)
    os.sync()  # written pages must reach the disk before they can be dropped from the cache
    ways = {"folder, epoch order": (reader.read, folder_order, files),
            "shards, reader order": (lambda i: shards.read(i, True), shard_order, written.shards)}
    for label, drop in (("page cache", False), ("cold (fadvise)", True)):
        best: dict[str, float] = {}
        for _ in range(repeat):  # interleaved, best of: the disk is shared with other jobs
            for name, (fn, order, paths) in ways.items():
                if drop:
                    _drop(list(paths))
                shards._files = {}  # reopened: no read buffer carried over
                t = time.perf_counter()
                nbytes = sum(len(fn(i)) for i in order)
                best[name] = max(best.get(name, 0.0), nbytes / 1e6 / (time.perf_counter() - t))
        print(f"read, {label:15s}: " + "; ".join(f"{k} {v:6.0f} MB/s" for k, v in best.items()))
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moco-input-bench"),
                    help="where the synthetic sets are generated (kept for reruns)")
    ap.add_argument("--images", type=int, default=20000, help="ImageNet-like JPEGs")
    ap.add_argument("--tiny", type=int, default=200000, help="tiny files for the start-up figure")
    ap.add_argument("--decode-images", type=int, default=1024, help="images per decode measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--aug", default="v2", choices=("v1", "v2"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="header-reading processes of the index")
    ap.add_argument("--shard-size", default="256MB")
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--only", choices=("decode", "startup", "shards"), default=None)
    args = ap.parse_args()
    big = args.workdir / f"imagenet{args.images // 1000}k"
    tiny = args.workdir / f"tiny{args.tiny // 1000}k"
    t = time.perf_counter()
    make_imagenet_like(big, args.images)
    if args.only in (None, "startup"):
        make_tiny(tiny, args.tiny, seed=1)
    print(f"sets ready in {time.perf_counter() - t:.0f} s: {big}, {tiny}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    cache = args.workdir / "cache"
    if args.only in (None, "decode"):
        bench_decode(big, cache, args.decode_images, args.batch, args.image_size, args.aug,
                     args.repeat)
    if args.only in (None, "startup"):
        bench_startup([big, tiny], cache, args.workers, args.baseline_src)
    if args.only in (None, "shards"):
        bench_shards(big, cache, args.shard_size, args.repeat)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
