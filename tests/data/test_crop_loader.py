"""Original-size crops (moco.data.crop_loader, moco.data.input_plan): crop boxes drawn on each file's
original size with RandomResizedCrop's distribution, views equal to torchvision's on the
original image, exact resume, process-count independence, bad files, the path choice."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from helpers import KS_CRIT, cfg_for, jpegs, ks, loader_for
from PIL import Image
from torchvision import transforms as T

from moco.data.crop_loader import CropTrainLoader, CropWork, FileReader, Meta
from moco.data.decode import KIND_JPEG
from moco.data.folders import image_folder
from moco.data.index import listed_folder
from moco.data.input_plan import original_crops_loader
from moco.data.source import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


# what the short-side cache (256 px short side, long side center-cut to 512) cannot give
BEYOND_CACHE = {(375, 500): lambda c: (c[:, 2] > 256).any(),  # boxes taller than it holds
                (120, 700): lambda c: ((c[:, 1] < 94).any()  # the panorama's cut-off ends
                                       and (c[:, 1] + c[:, 3] > 606).any())}


@pytest.mark.parametrize("hw", [(375, 500), (120, 700)])
def test_crop_boxes_follow_random_resized_crop_on_the_original_size(hw: tuple[int, int]) -> None:
    """KS against torchvision's RandomResizedCrop.get_params on the ORIGINAL image size (a
    short-side cache draws them on 256 x 341, or cuts the panorama to 120 x 512)."""
    h, w = hw
    n_img, steps = 500, 20
    meta = Meta(np.full(n_img, h), np.full(n_img, w), np.full(n_img, KIND_JPEG))
    cfg = cfg_for(batch_size=n_img, crop_min_scale=0.2)
    work = CropWork(cfg, FileReader([]), meta, 0, 1, False)
    ours = torch.cat([work.params(0, s, list(range(n_img))).crop for s in range(steps)]).numpy()
    n = len(ours)
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)], dtype=np.float64)
    crit = KS_CRIT * np.sqrt(20000 / n)
    ours = ours.astype(np.float64)
    for name, f in [("area", lambda c: c[:, 2] * c[:, 3] / (h * w)),
                    ("log ratio", lambda c: np.log(c[:, 3] / c[:, 2])),
                    ("height", lambda c: c[:, 2]), ("top", lambda c: c[:, 0]),
                    ("left", lambda c: c[:, 1])]:
        d = ks(f(ours), f(ref))
        assert d < crit, f"{name}: KS {d:.4f} >= {crit:.4f}"
    assert BEYOND_CACHE[hw](ours) and BEYOND_CACHE[hw](ref)


def test_views_are_torchvision_resized_crops_of_the_original_file(tmp_path: Path) -> None:
    jpegs(tmp_path / "imgs", [(60, 90), (80, 50), (45, 45), (70, 100)])
    files = image_folder(tmp_path / "imgs").files or []
    cfg = cfg_for(batch_size=4)
    loader = loader_for(tmp_path / "imgs", cfg)
    work = loader.work(0, 1, [3, 0, 2, 1])
    order = [3, 0, 2, 1]
    for k, i in enumerate(order):
        img = Image.open(files[i]).convert("RGB")
        for row in (k, 4 + k):  # q view, then k view
            a, b, hh, ww = work.crops[row].tolist()
            assert a >= 0 and b >= 0 and a + hh <= img.height and b + ww <= img.width
            ref = torch.from_numpy(np.array(F.resized_crop(img, a, b, hh, ww, [24, 24]))).permute(2, 0, 1)
            assert (work.views[row].int() - ref.int()).abs().max() <= 1


def test_resume_and_worker_count_give_bit_identical_batches(tmp_path: Path) -> None:
    jpegs(tmp_path / "imgs", [(40 + 3 * k, 50 + 2 * k) for k in range(12)])
    cfg = cfg_for()
    full = list(loader_for(tmp_path / "imgs", cfg).batches(1))
    assert len(full) == 3
    workers = list(loader_for(tmp_path / "imgs", cfg, workers=2).batches(1))
    resumed = list(loader_for(tmp_path / "imgs", cfg).batches(1, start_step=2))
    for a, b in zip(full, workers, strict=True):
        assert torch.equal(a.im_q, b.im_q) and torch.equal(a.im_k, b.im_k)
    assert torch.equal(full[2].im_q, resumed[0].im_q) and torch.equal(full[2].index, resumed[0].index)
    other_epoch = next(loader_for(tmp_path / "imgs", cfg).batches(2))
    assert not torch.equal(other_epoch.im_q, full[0].im_q)


def test_two_processes_see_the_slices_of_one(tmp_path: Path) -> None:
    jpegs(tmp_path / "imgs", [(40 + 3 * k, 50 + 2 * k) for k in range(12)])
    one = next(loader_for(tmp_path / "imgs", cfg_for(batch_size=6)).batches(0))
    for r in range(2):
        part = next(loader_for(tmp_path / "imgs", cfg_for(batch_size=3), rank=r, world=2).batches(0))
        sl = slice(3 * r, 3 * r + 3)
        assert torch.equal(part.index, one.index[sl])
        assert torch.equal(part.im_q, one.im_q[sl]) and torch.equal(part.im_k, one.im_k[sl])


def test_device_decoding_matches_worker_decoding(tmp_path: Path) -> None:
    """--decode gpu's path (bytes in workers, the batch decoded on the device in one call,
    cropped there in float) on the CPU device: the same boxes, pixels within the batched
    crop's resampling of the workers' full decodes (a reduced decode differs more: not
    compared here). With workers, the bytes cross the process boundary as one shared tensor
    and give the same batches."""
    jpegs(tmp_path / "imgs", [(40 + 3 * k, 50 + 2 * k) for k in range(8)])
    cfg = cfg_for()
    cpu = list(loader_for(tmp_path / "imgs", cfg, reduce=False).batches(0))
    dev = list(loader_for(tmp_path / "imgs", cfg, device_decode=True).batches(0))
    workers = list(loader_for(tmp_path / "imgs", cfg, device_decode=True, workers=2).batches(0))
    for a, b, c in zip(cpu, dev, workers, strict=True):
        assert torch.equal(a.index, b.index)
        assert_within_resampling(a.im_q, b.im_q)
        assert_within_resampling(a.im_k, b.im_k)
        assert torch.equal(b.im_q, c.im_q) and torch.equal(b.im_k, c.im_k)


def assert_within_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """A uint8 view (worker path) vs a float one, both normalised (std 0.224): under half a
    level on average, a few levels at most (colour jitter scales the rounding by up to 1.4
    per op)."""
    d = (a - b).abs() * 0.224 * 255
    assert float(d.mean()) < 0.5 and float(d.max()) < 4, (float(d.mean()), float(d.max()))


def assert_within_resampling(a: torch.Tensor, b: torch.Tensor) -> None:
    """A worker's view (antialiased resize, uint8) vs the device path's (roi_align, float),
    both normalised: under a level on average (measured 0.45-0.72 over these batches), up
    to a dozen on a border pixel (measured 11.5; colour jitter scales the differences)."""
    d = (a - b).abs() * 0.224 * 255
    assert float(d.mean()) < 1.0 and float(d.max()) < 16, (float(d.mean()), float(d.max()))


def test_a_steps_bytes_travel_as_one_tensor_and_stay_unpinned(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Device decoding: a worker's step holds the files' bytes in one uint8 tensor (moved
    between processes in shared memory), file k at offsets[k]:offsets[k+1]; the pinning
    thread pins the views and parameters, not the bytes."""
    files = jpegs(tmp_path / "imgs", [(40, 50 + k) for k in range(4)])
    loader = loader_for(tmp_path / "imgs", cfg_for(), device_decode=True)
    work = loader.work(0, 0, [2, 0, 3, 1])
    assert work.blob.dtype == torch.uint8 and work.views.numel() == 0
    order = image_folder(tmp_path / "imgs").files or []
    for k, i in enumerate([2, 0, 3, 1]):
        assert work.files()[k].numpy().tobytes() == Path(order[i]).read_bytes()
    assert int(work.offsets[-1]) == sum(f.stat().st_size for f in files)
    pinned: list[int] = []

    def fake_pin(t: torch.Tensor) -> torch.Tensor:
        pinned.append(t.data_ptr())
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    p = work.pin_memory()
    assert p.blob is work.blob and work.blob.data_ptr() not in pinned
    assert work.crops.data_ptr() in pinned and not torch.equal(p.indices, torch.tensor([0, 1, 2, 3]))


def _break(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])  # header intact, data cut: found at decode


@pytest.mark.parametrize("device_decode", [False, True])
def test_unreadable_files_stop_or_are_replaced(tmp_path: Path, device_decode: bool) -> None:
    files = jpegs(tmp_path / "imgs", [(40 + 3 * k, 50 + 2 * k) for k in range(8)])
    _break(files[5])
    with pytest.raises(DataError, match=rf"{files[5].name}.*--on-bad-image skip"):
        for _ in loader_for(tmp_path / "imgs", cfg_for(), device_decode=device_decode).batches(0):
            pass
    loader = loader_for(tmp_path / "imgs", cfg_for(on_bad_image="skip"), device_decode=device_decode,
                        reduce=False)
    batches = list(loader.batches(0))
    assert len(batches) == 2 and loader.bad_images == {image_folder(tmp_path / "imgs").files.index(files[5])}  # type: ignore[union-attr]
    assert all(torch.isfinite(b.im_q).all() for b in batches)
    ref = list(loader_for(tmp_path / "imgs", cfg_for(on_bad_image="skip"), reduce=False).batches(0))
    for a, b in zip(ref, batches, strict=True):  # both paths replace it the same way
        (assert_within_resampling if device_decode else assert_within_rounding)(a.im_q, b.im_q)


def test_a_file_changed_since_indexing_gets_crops_for_its_real_size(tmp_path: Path) -> None:
    jpegs(tmp_path / "imgs", [(60, 60)] * 4)
    loader = loader_for(tmp_path / "imgs", cfg_for())
    files = image_folder(tmp_path / "imgs").files or []
    Image.new("RGB", (30, 20), (9, 99, 200)).save(files[0])  # now 20 x 30
    for k in range(3):
        work = loader.work(k, 0, [0, 1, 2, 3])
        i, j, h, w = work.crops[0].tolist()
        assert i + h <= 20 and j + w <= 30
        a, b, hh, ww = work.crops[4].tolist()
        assert a + hh <= 20 and b + ww <= 30


def _folder(tmp_path: Path, sizes: list[tuple[int, int]]) -> Path:
    data = tmp_path / "data"
    jpegs(data / "train", sizes)
    return data


def test_the_path_taken_and_why(tmp_path: Path) -> None:
    """auto: the decoded cache when it keeps every image whole, else original-size crops;
    the log line says which and why."""
    small = _folder(tmp_path / "s", [(24, 24)] * 8)
    big = _folder(tmp_path / "b", [(24, 24)] * 7 + [(80, 50)])
    said: list[str] = []
    dev = torch.device("cpu")
    for data, crops, expect in [(small, "auto", None), (big, "auto", CropTrainLoader),
                                (big, "short-side", None), (small, "original", CropTrainLoader)]:
        src = listed_folder(data / "train", cache_dir=tmp_path / "cache")
        got = original_crops_loader(cfg_for(crops=crops), src, dev, 0, log=said.append)
        assert (got is None) if expect is None else isinstance(got, expect), (data, crops)
    assert "decoded cache" in said[0] and "at most 24x24" in said[0]
    assert "original-size crops" in said[1] and "1 of 8 images are larger" in said[1]
    assert "short-side" in said[2] and "--crops original" in said[3]
    quiet: list[str] = []
    original_crops_loader(cfg_for(), listed_folder(big / "train", cache_dir=tmp_path / "cache"),
                          dev, 0, rank=1, log=quiet.append)
    assert not quiet  # one line per run, from rank 0


def test_a_file_without_a_header_stops_before_training(tmp_path: Path) -> None:
    data = _folder(tmp_path, [(60, 80)] * 8)
    (data / "train" / "c0" / "zz.jpg").write_text("not an image")
    src = listed_folder(data / "train", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"zz\.jpg: not an image file.*--on-bad-image skip"):
        original_crops_loader(cfg_for(crops="original"), src, torch.device("cpu"), 0)
    loader = original_crops_loader(cfg_for(crops="original", on_bad_image="skip"), src,
                                   torch.device("cpu"), 0)
    assert loader is not None and sum(1 for _ in loader.batches(0)) == 2
    assert len(loader.bad_images) == 1  # type: ignore[attr-defined]


def test_decode_gpu_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    data = _folder(tmp_path, [(60, 80)] * 8)
    src = listed_folder(data / "train", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="--decode gpu.*trains on cpu"):
        original_crops_loader(cfg_for(crops="original", decode="gpu"), src, torch.device("cpu"), 0)


def test_png_and_cmyk_files_take_the_cpu_decoders(tmp_path: Path) -> None:
    files = jpegs(tmp_path / "imgs", [(40, 50)] * 4)
    Image.open(files[1]).convert("CMYK").save(files[1])
    png = files[2].with_suffix(".png")
    Image.open(files[2]).save(png)
    files[2].unlink()
    for dev in (False, True):
        loader = loader_for(tmp_path / "imgs", cfg_for(), device_decode=dev)
        b = next(loader.batches(0))
        assert torch.isfinite(b.im_q).all() and not loader.bad_images
    buf = io.BytesIO()
    Image.open(files[1]).save(buf, "JPEG")
    assert Image.open(buf).mode == "CMYK"


def test_no_readable_image_is_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "data" / "train" / "c0"
    d.mkdir(parents=True)
    for k in range(8):
        (d / f"{k}.jpg").write_text("not an image")
    src = listed_folder(tmp_path / "data" / "train", cache_dir=tmp_path / "cache")
    for crops in ("auto", "original"):
        with pytest.raises(DataError, match="none of the 8 images"):
            original_crops_loader(cfg_for(crops=crops, on_bad_image="skip"), src,
                                  torch.device("cpu"), 0)
