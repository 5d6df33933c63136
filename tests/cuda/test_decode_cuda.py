"""The CUDA tier (``pytest -m cuda``, skipped without CUDA; part of ``make gpu-check``): JPEGs
decoded on the GPU in one call (nvJPEG), a bad file falling back alone, the outputs' memory
safe from kernels still queued, the batched crops, and the original-size crops pipeline on
the device, from folders and tar shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_FLAGS, cfg_for, jpegs, loader_for, run_cli
from PIL import Image

from moco.data.crop_loader import CropTrainLoader, FileReader, Meta
from moco.data.decode import KIND_JPEG, KIND_JPEG_CPU, KIND_OTHER, crop_on_device, decode_on_device
from moco.data.folders import image_folder
from moco.data.input_plan import source_headers
from moco.data.source import DataError, open_rgb

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda tier)"),
]
GPU_FLAGS = [f for f in TINY_FLAGS if f not in ("--channels-last", "false")]


def _jpeg(arr: np.ndarray, mode: str = "RGB", subsampling: int = 0) -> bytes:
    """JPEG bytes; ``subsampling`` 0 is 4:4:4 (no chroma upsampling, so nvJPEG and libjpeg
    differ only by their IDCTs), 2 is 4:2:0 (their chroma upsampling differs too)."""
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=float)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def test_a_batch_decodes_on_the_gpu_and_only_the_bad_file_falls_back() -> None:
    """A truncated JPEG inside the batch: the good JPEGs are still decoded by nvJPEG (not in
    ``fallbacks``), the truncated one is a DataError or, if nvJPEG accepts it, an image of its
    size; the CMYK, grayscale and PNG files take the CPU. 4:4:4 files, so nvJPEG and libjpeg
    differ by their IDCTs only: within a level on average, a few at most."""
    arrs = [_photo(40 + k, 60, k) for k in range(4)]
    png = io.BytesIO()
    Image.fromarray(arrs[3]).save(png, "PNG")
    datas = [_jpeg(arrs[0]), _jpeg(arrs[1], "CMYK"), _jpeg(arrs[2])[:300], png.getvalue(),
             _jpeg(arrs[0], "L"), _jpeg(arrs[2])]
    kinds = [KIND_JPEG, KIND_JPEG_CPU, KIND_JPEG, KIND_OTHER, KIND_JPEG_CPU, KIND_JPEG]
    fallbacks: list[int] = []
    out = decode_on_device(datas, kinds, [f"f{k}" for k in range(6)], torch.device("cuda"),
                           fallbacks=fallbacks)
    assert 0 not in fallbacks and 5 not in fallbacks, fallbacks
    assert {1, 3, 4} <= set(fallbacks)
    bad = out[2]
    assert (isinstance(bad, DataError) and "f2" in str(bad)) or (
        isinstance(bad, torch.Tensor) and tuple(bad.shape) == (3, 42, 60))
    for k in (0, 1, 3, 4, 5):
        x = out[k]
        assert isinstance(x, torch.Tensor) and x.is_cuda and x.dtype == torch.uint8
        ref = torch.from_numpy(np.array(open_rgb(io.BytesIO(datas[k])))).permute(2, 0, 1)  # type: ignore[arg-type]
        diff = (x.cpu().float() - ref.float()).abs()
        assert float(diff.mean()) < 1.0 and float(diff.max()) <= 6, (k, float(diff.mean()), float(diff.max()))


def test_decoded_images_are_not_overwritten_under_queued_kernels() -> None:
    """nvJPEG writes its outputs from a stream of its own. Kernels queued on the current
    stream (held back here by a ~0.1 s spin) read batch A; A is dropped and batch B, of the
    same sizes, decoded at once: the queued reads must still see A's pixels, i.e. B must not
    get A's memory before those kernels ran."""
    a_arrs = [_photo(256, 256, 10 + k) for k in range(8)]
    b_arrs = [255 - x for x in a_arrs]
    cuda = torch.device("cuda", torch.cuda.current_device())
    names = [f"f{k}" for k in range(8)]
    a = decode_on_device([_jpeg(x) for x in a_arrs], [KIND_JPEG] * 8, names, cuda)
    expected = [float(x.float().sum()) for x in a]  # type: ignore[union-attr]
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles before the reads below
    sums = torch.stack([x.float().sum() for x in a])  # type: ignore[union-attr]
    del a
    b = decode_on_device([_jpeg(x) for x in b_arrs], [KIND_JPEG] * 8, names, cuda)
    assert sums.tolist() == pytest.approx(expected, rel=1e-6)
    assert all(isinstance(x, torch.Tensor) for x in b)


def test_nvjpeg_against_libjpeg_by_chroma_subsampling() -> None:
    """4:4:4: the IDCTs alone (within a level on average). 4:2:0: nvJPEG's chroma upsampling
    may differ from libjpeg's smooth ("fancy") upsampling; bounded loosely here, measured by
    make gpu-check's decode section."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    for sub, mean_max in ((0, 1.0), (2, 4.0)):
        datas = [_jpeg(_photo(120, 160, 20 + k), subsampling=sub) for k in range(4)]
        out = decode_on_device(datas, [KIND_JPEG] * 4, ["x"] * 4, cuda)
        for d, x in zip(datas, out, strict=True):
            ref = torch.from_numpy(np.array(open_rgb(io.BytesIO(d)))).permute(2, 0, 1)  # type: ignore[arg-type]
            diff = (x.cpu().float() - ref.float()).abs()  # type: ignore[union-attr]
            assert float(diff.mean()) < mean_max, (sub, float(diff.mean()), float(diff.max()))


def test_batched_crops_on_the_gpu_equal_the_cpus() -> None:
    """crop_on_device (roi_align per image size) gives the same views on CUDA as on the CPU."""
    imgs = [torch.from_numpy(_photo(h, w, s)).permute(2, 0, 1).contiguous()
            for s, (h, w) in enumerate([(120, 160), (90, 130), (120, 160)])]
    crops = torch.tensor([[3, 5, 100, 140], [0, 0, 90, 130], [10, 10, 20, 12], [50, 60, 60, 90]])
    source = [0, 1, 2, 1]
    cpu = crop_on_device(imgs, crops, source, 32)
    gpu = crop_on_device([x.cuda() for x in imgs], crops, source, 32)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_original_crops_decoded_on_the_gpu_match_the_cpu_workers(tmp_path: Path) -> None:
    jpegs(tmp_path / "imgs", [(40 + 3 * k, 50 + 2 * k) for k in range(8)])
    cpu = list(loader_for(tmp_path / "imgs", cfg_for(), reduce=False).batches(0))
    src = image_folder(tmp_path / "imgs")
    h = source_headers(src, 1)
    cuda = torch.device("cuda")
    gpu_loader = CropTrainLoader(cfg_for(), FileReader(src.files or []),
                                 Meta(h[:, 0], h[:, 1], h[:, 2]), cuda, 2, decode_device=cuda)
    gpu = list(gpu_loader.batches(0))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.im_q.is_cuda and torch.equal(a.index, b.index.cpu())
        d = (a.im_q - b.im_q.cpu()).abs() * 0.224 * 255
        # nvJPEG's IDCT and chroma upsampling (4:2:0 files) + the batched crop's resampling
        assert float(d.mean()) < 2.0, float(d.mean())


@pytest.mark.parametrize("shards", [False, True])
def test_pretrain_decodes_on_the_gpu(tmp_path: Path, shards: bool) -> None:
    data = tmp_path / "data"
    jpegs(data / "train", [(48 + k, 64 + 2 * k) for k in range(32)])
    where = data
    if shards:
        rc, _, err = run_cli(["shard", str(data), str(tmp_path / "shards"), "--shard-size",
                              "64KB", "--no-progress"])
        assert rc == 0, err
        where = tmp_path / "shards"
    rc, stdout, err = run_cli(["pretrain", str(where), *GPU_FLAGS, "--output", str(tmp_path / "run"),
                               "--epochs", "1", "--knn-every", "0", "--crops", "original",
                               "--decode", "gpu", "--workers", "2"])
    assert rc == 0, err[-3000:]
    assert "decoded on cuda" in err, err[-3000:]
