"""The CUDA tier of issue 16 (``pytest -m cuda``, skipped without CUDA; part of ``make
gpu-check``): JPEGs decoded on the GPU in one call (nvJPEG), with the CPU fallbacks, and the
original-size crops pipeline on the device, from folders and tar shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_FLAGS, cfg_for, jpegs, loader_for, run_cli
from PIL import Image

from moco.data.crop_loader import CropTrainLoader, FileReader, Meta
from moco.data.decode import KIND_JPEG, KIND_JPEG_CPU, KIND_OTHER, decode_on_device
from moco.data.folders import image_folder
from moco.data.input_plan import source_headers
from moco.data.source import DataError, open_rgb

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuda tier)"),
]
GPU_FLAGS = [f for f in TINY_FLAGS if f not in ("--channels-last", "false")]


def _jpeg(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_batch_decodes_on_the_gpu_with_cpu_fallbacks() -> None:
    rng = np.random.default_rng(0)
    arrs = [np.clip(rng.normal(128, 40, (40 + k, 60, 3)), 0, 255).astype(np.uint8) for k in range(4)]
    png = io.BytesIO()
    Image.fromarray(arrs[3]).save(png, "PNG")
    datas = [_jpeg(arrs[0]), _jpeg(arrs[1], "CMYK"), _jpeg(arrs[2])[:300], png.getvalue(),
             _jpeg(arrs[0], "L"), _jpeg(arrs[2])]
    kinds = [KIND_JPEG, KIND_JPEG_CPU, KIND_JPEG, KIND_OTHER, KIND_JPEG_CPU, KIND_JPEG]
    out = decode_on_device(datas, kinds, [f"f{k}" for k in range(6)], torch.device("cuda"))
    assert isinstance(out[2], DataError) and "f2" in str(out[2])
    for k in (0, 1, 3, 4, 5):
        x = out[k]
        assert isinstance(x, torch.Tensor) and x.is_cuda and x.dtype == torch.uint8
        ref = torch.from_numpy(np.array(open_rgb(io.BytesIO(datas[k])))).permute(2, 0, 1)  # type: ignore[arg-type]
        diff = (x.cpu().float() - ref.float()).abs()
        assert float(diff.mean()) < 1.0 and float(diff.max()) <= 8, (k, float(diff.mean()))
    alone = decode_on_device(datas[:1] + datas[5:], [KIND_JPEG] * 2, ["a", "b"], torch.device("cuda"))
    assert all(isinstance(x, torch.Tensor) and x.is_cuda for x in alone)


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
        assert float(d.mean()) < 1.5, float(d.mean())  # nvJPEG's IDCT + float crops


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
