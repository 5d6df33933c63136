"""What a later start costs to trust the stored file index and the decoded cache's key
(moco.data.index, moco.data.cache_entry.fingerprint), on ``--files`` tiny JPEGs in 1000
class folders (``--bad`` of them zero bytes, found unreadable, which every start stats again),
generated once in ``--workdir``; nothing is downloaded.

  index later start  find_dataset(DATA) + every image's size from the stored index, in a
                     fresh process (seconds after the imports; the index built before)
  cache key          the decoded cache's fingerprint of every file (one stat per file)

Each figure is the best of ``--repeat`` fresh processes, for this checkout and, with
``--baseline-src DIR``, for another copy of the package (e.g. ``git archive main moco | tar
-x -C DIR``), run the same way:

    .venv/bin/python benchmarks/index_startup.py --files 200000 --baseline-src /tmp/moco-main
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LATER_START = """
import sys, time
import moco.data.decode  # torch, torchvision: the header reader's imports, not the index's cost
from moco.data.splits import find_dataset
t1 = time.perf_counter()
src = find_dataset(sys.argv[1], on_bad_image="skip", cache_dir=sys.argv[2]).train
src.headers(1)
print(time.perf_counter() - t1, len(src))
"""
CACHE_KEY = """
import sys, time
from pathlib import Path
from moco.data.splits import find_dataset
src = find_dataset(sys.argv[1], on_bad_image="skip", cache_dir=sys.argv[2]).train
try:
    from moco.data.cache_entry import fingerprint
except ImportError:  # a copy from before moco/data/cache_entry.py
    from moco.data.cache import fingerprint
files = [Path(f) for f in src.files]
t = time.perf_counter()
fingerprint(files)
print(time.perf_counter() - t, len(files))
"""


def make_files(root: Path, n: int, bad: int, classes: int = 1000) -> Path:
    """ROOT/train/cNNNN/NNNNNNN.jpg: ``n`` copies of one 16 px JPEG, the first ``bad`` of
    them zero bytes; the folders' mtimes set a minute back (a settled tree)."""
    from PIL import Image

    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    for k in range(n):
        d = root / "train" / f"c{k % classes:04d}"
        if k < classes:
            d.mkdir(parents=True)
        (d / f"{k:07d}.jpg").write_bytes(b"" if k < bad else jpeg)
    t = time.time() - 60
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (t, t))
    (root / "done").write_text("")
    return root


def child(code: str, args: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.split()[0])


def measure(data: Path, cache: Path, src: Path, repeat: int) -> tuple[float, float]:
    shutil.rmtree(cache, ignore_errors=True)
    child(LATER_START, [str(data), str(cache)], src)  # builds the index (not timed)
    later = min(child(LATER_START, [str(data), str(cache)], src) for _ in range(repeat))
    key = min(child(CACHE_KEY, [str(data), str(cache)], src) for _ in range(repeat))
    return later, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moco-index-bench"))
    ap.add_argument("--files", type=int, default=200000)
    ap.add_argument("--bad", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline-src", type=Path, default=None)
    args = ap.parse_args()
    data = make_files(args.workdir / f"files{args.files}", args.files, args.bad)
    print(f"{args.files} files ({args.bad} unreadable), best of {args.repeat} fresh processes")
    print(f"{'package':10s} {'index later start':>18s} {'cache key':>10s}")
    for name, src in (("this", REPO), ("baseline", args.baseline_src)):
        if src is None:
            continue
        later, key = measure(data, args.workdir / f"cache-{name}", src, args.repeat)
        print(f"{name:10s} {later:17.3f}s {key:9.3f}s")


if __name__ == "__main__":
    main()
