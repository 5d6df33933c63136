"""moco.data.decode: JPEG headers, original-size crops (full and reduced decodes) and batched
decoding on a device (run here with device="cpu", the same code path as CUDA's)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image

from moco.data.decode import (
    KIND_BAD,
    KIND_JPEG,
    KIND_JPEG_CPU,
    KIND_OTHER,
    crop_on_device,
    decode_full,
    decode_on_device,
    decode_views,
    draft_scale,
    header_info,
    jpeg_header,
)
from moco.data.source import DataError, open_rgb


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colours plus texture: JPEG-friendly, and crops of it differ visibly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=float)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, mode: str = "RGB", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_header_of_every_kind(tmp_path: Path) -> None:
    arr = photo(37, 53)
    cases = {
        "rgb.jpg": (jpeg_bytes(arr), KIND_JPEG),
        "prog.jpg": (jpeg_bytes(arr, progressive=True), KIND_JPEG),
        "gray.jpg": (jpeg_bytes(arr, "L"), KIND_JPEG_CPU),
        "cmyk.jpg": (jpeg_bytes(arr, "CMYK"), KIND_JPEG_CPU),
        # a 100 KB EXIF block before the frame header: found past the first reads
        "exif.jpg": (jpeg_bytes(arr, exif=b"Exif\x00\x00" + bytes(60000)), KIND_JPEG),
    }
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    cases["img.png"] = (png.getvalue(), KIND_OTHER)
    for name, (data, kind) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert header_info(tmp_path / name) == (37, 53, kind), name
        assert header_info(data=data)[:2] == (37, 53), name
    (tmp_path / "text.jpg").write_text("not an image")
    assert header_info(tmp_path / "text.jpg") == (0, 0, KIND_BAD)
    assert header_info(tmp_path / "missing.jpg") == (0, 0, KIND_BAD)
    assert jpeg_header(jpeg_bytes(arr)[:20]) is None  # ends before the frame header


def test_header_sizes_match_pil_on_random_jpegs(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for k in range(20):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        data = jpeg_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        with Image.open(io.BytesIO(data)) as img:
            assert header_info(data=data)[:2] == (img.height, img.width), k


@pytest.mark.parametrize("pil", [False, True])
def test_full_decode_views_equal_torchvision_resized_crop(pil: bool) -> None:
    """The crop box is applied to the ORIGINAL image: the view equals torchvision's
    resized_crop of the decoded file (PIL's pixels) to within one level."""
    data = jpeg_bytes(photo(300, 420))
    img = open_rgb(io.BytesIO(data))  # type: ignore[arg-type]
    crops = torch.tensor([[10, 20, 150, 260], [0, 0, 300, 420], [250, 400, 50, 20]])
    views, full = decode_views(data, crops, 64, KIND_JPEG, "x.jpg", pil=pil)
    assert full == (300, 420) and views.shape == (3, 3, 64, 64) and views.dtype == torch.uint8
    for v, (i, j, h, w) in enumerate(crops.tolist()):
        ref = torch.from_numpy(np.array(F.resized_crop(img, i, j, h, w, [64, 64]))).permute(2, 0, 1)
        diff = (views[v].int() - ref.int()).abs().max()
        assert diff <= (0 if pil else 1), (v, int(diff))


def test_reduced_decode_only_when_every_crop_allows_it() -> None:
    assert draft_scale(torch.tensor([[0, 0, 400, 500]]), 100, KIND_JPEG) == 4
    assert draft_scale(torch.tensor([[0, 0, 400, 500], [0, 0, 220, 900]]), 100, KIND_JPEG) == 2
    assert draft_scale(torch.tensor([[0, 0, 199, 500]]), 100, KIND_JPEG) == 1
    assert draft_scale(torch.tensor([[0, 0, 900, 900]]), 100, KIND_OTHER) == 1
    data = jpeg_bytes(photo(480, 640))
    img = open_rgb(io.BytesIO(data))  # type: ignore[arg-type]
    crops = torch.tensor([[40, 64, 400, 560], [0, 0, 480, 640]])
    reduced, full = decode_views(data, crops, 100, KIND_JPEG, "x.jpg")
    exact, _ = decode_views(data, crops, 100, KIND_JPEG, "x.jpg", reduce=False)
    assert full == (480, 640)
    for v, (i, j, h, w) in enumerate(crops.tolist()):
        ref = torch.from_numpy(np.array(F.resized_crop(img, i, j, h, w, [100, 100]))).permute(2, 0, 1)
        err_exact = (exact[v].float() - ref.float()).abs().mean()
        err_reduced = (reduced[v].float() - ref.float()).abs().mean()
        assert err_exact < 0.6 and 0 < err_reduced < 3.0, (v, float(err_exact), float(err_reduced))


def test_unreadable_bytes_name_the_file() -> None:
    data = jpeg_bytes(photo(64, 64))
    crops = torch.tensor([[0, 0, 32, 32]])
    for bad in (data[:300], b"plain text", data[: len(data) // 2]):
        with pytest.raises(DataError, match=r"cannot read image shard\.tar:k\.jpg"):
            decode_views(bad, crops, 16, KIND_JPEG, "shard.tar:k.jpg")


def test_decode_full_any_mode_is_rgb() -> None:
    arr = photo(20, 30)
    for mode in ("L", "CMYK"):
        x = decode_full(jpeg_bytes(arr, mode), KIND_JPEG_CPU, "f.jpg")
        ref = np.asarray(open_rgb(io.BytesIO(jpeg_bytes(arr, mode))))  # type: ignore[arg-type]
        assert x.shape == (3, 20, 30) and (x.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1
    rgba = io.BytesIO()
    Image.fromarray(np.dstack([arr, np.full((20, 30), 128, np.uint8)])).save(rgba, "PNG")
    assert decode_full(rgba.getvalue(), KIND_OTHER, "f.png").shape == (3, 20, 30)


def test_batch_decode_on_a_device_with_cpu_fallbacks() -> None:
    """One call for the JPEGs; a truncated one fails that call, so every file is then judged
    alone: the good ones decode, the bad one is a DataError naming it."""
    arrs = [photo(30 + k, 40, seed=k) for k in range(4)]
    png = io.BytesIO()
    Image.fromarray(arrs[3]).save(png, "PNG")
    datas = [jpeg_bytes(arrs[0]), jpeg_bytes(arrs[1], "CMYK"), jpeg_bytes(arrs[2])[:200],
             png.getvalue(), jpeg_bytes(arrs[0], "L")]
    kinds = [KIND_JPEG, KIND_JPEG_CPU, KIND_JPEG, KIND_OTHER, KIND_JPEG_CPU]
    names = [f"f{k}" for k in range(5)]
    out = decode_on_device(datas, kinds, names, torch.device("cpu"))
    assert isinstance(out[2], DataError) and "f2" in str(out[2])
    for k in (0, 1, 3, 4):
        x = out[k]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.shape[0] == 3
        ref = np.asarray(open_rgb(io.BytesIO(datas[k])))  # type: ignore[arg-type]
        assert np.abs(x.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1, k
    good = decode_on_device([datas[0], jpeg_bytes(arrs[2])], [KIND_JPEG, KIND_JPEG], ["a", "b"],
                            torch.device("cpu"))
    assert [tuple(x.shape) for x in good] == [(3, 30, 40), (3, 32, 40)]  # type: ignore[union-attr]


def test_crop_on_device_equals_torchvision_on_float_tensors() -> None:
    imgs = [torch.from_numpy(photo(50, 70, s)).permute(2, 0, 1).contiguous() for s in range(2)]
    crops = torch.tensor([[3, 5, 40, 60], [0, 0, 50, 70], [10, 10, 20, 12]])
    out = crop_on_device(imgs, crops, [0, 1, 1], 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    for v, (src, (i, j, h, w)) in enumerate(zip([0, 1, 1], crops.tolist(), strict=True)):
        ref = F.resized_crop(imgs[src].float(), i, j, h, w, [32, 32], antialias=True) / 255
        assert torch.allclose(out[v], ref.clamp(0, 1), atol=1e-5), v
