"""Image headers, original-size crops and batched device decoding (MoCo v1 §4.1: the crops of
``RandomResizedCrop(224, scale=(0.2, 1))`` are drawn on the decoded full-resolution image).

* :func:`header_info`: (height, width, kind) from a file's first bytes; a JPEG's SOF segment
  is parsed directly (tens of µs), other formats through PIL's lazy open.
* :func:`decode_views`: one image's bytes -> its views' crops, uint8 [V,3,S,S], each crop box
  given in the ORIGINAL image's pixels. JPEGs whose every crop is at least ``s * S`` pixels
  on both sides are decoded at 1/s size in the DCT domain (``PIL.Image.draft``, s = 2, 4 or
  8) and the box is scaled by 1/s; otherwise the full image is decoded
  (``torchvision.io.decode_jpeg``, the same libjpeg-turbo pixels as PIL, compared with it in
  docs/benchmarks.md; PIL for other formats) and cropped + resized as
  ``torchvision.transforms.functional.resized_crop`` (antialiased bilinear).
* :func:`decode_on_device`: a batch's JPEG bytes decoded in one call on a device (nvJPEG on
  CUDA; its outputs allocated on a stream of their own, :func:`device_batch_decode`), a
  failed call split until the bad files are found, and those and the files nvJPEG cannot
  take decoded on the CPU one by one.
* :func:`crop_on_device`: crops + resizes of device-decoded images -> float [V,3,S,S], one
  ``roi_align`` per image size.

Pixels agree with torchvision's ``RandomResizedCrop`` on the PIL image to within one level
(libjpeg-turbo decodes the same pixels for PIL and torchvision; the resampling filters are
the same triangle filter). A reduced decode is the DCT's own 1/s downscale instead of the
resize's first 1/s, so its views differ slightly more (within a bound the tests check).
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from moco.core.device import to_device
from moco.data.source import DataError, open_rgb


def _decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device | str = "cpu"
                 ) -> torch.Tensor | list[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` to RGB, without the DeprecationWarning torchvision 0.29
    gives on every call (its codecs move to TorchCodec; the function is unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

KIND_JPEG = 0  # 3-component baseline/extended/progressive JPEG: any device decodes it
KIND_JPEG_CPU = 1  # grayscale, CMYK or arithmetic-coded JPEG: decoded on the CPU
KIND_OTHER = 2  # PNG, BMP, TIFF, WebP...: PIL
KIND_BAD = 3  # no readable header: unreadable
HEADER_READS = (4096, 1 << 16)  # bytes read for the header, then more for a large EXIF/ICC
DRAFT_SCALES = (8, 4, 2)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(head: bytes) -> tuple[int, int, int] | None:
    """(height, width, kind) from a JPEG's SOF segment in ``head`` (the file's first bytes),
    or None when ``head`` is not a JPEG or ends before the SOF (read more, or ask PIL)."""
    if head[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(head)
    while pos + 4 <= n:
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", head[pos + 2:pos + 4])
        if marker in _SOF:
            if pos + 10 > n:
                return None
            h, w = struct.unpack(">HH", head[pos + 5:pos + 9])
            comps = head[pos + 9]
            if h == 0 or w == 0:
                return None  # height defined later (DNL): let PIL decide
            kind = KIND_JPEG if comps == 3 and marker in (0xC0, 0xC1, 0xC2) else KIND_JPEG_CPU
            return h, w, kind
        if marker == 0xDA or length < 2:  # scan data before any SOF
            return None
        pos += 2 + length
    return None


def header_info(path: str | Path | None = None, data: bytes | None = None) -> tuple[int, int, int]:
    """(height, width, kind) of an image file (or of its bytes ``data``); (0, 0, KIND_BAD)
    when no image header can be read. Only the header is read."""
    try:
        if data is None:
            assert path is not None
            with open(path, "rb") as f:
                head = f.read(HEADER_READS[0])
                found = jpeg_header(head)
                for more in (HEADER_READS[1], -1):  # the SOF may follow a large EXIF/ICC
                    if found is not None or head[:2] != b"\xff\xd8" or len(head) < HEADER_READS[0]:
                        break
                    chunk = f.read(more)
                    if not chunk:
                        break
                    head += chunk
                    found = jpeg_header(head)
        else:
            found = jpeg_header(data)
        if found is not None:
            return found
        with Image.open(path if data is None else io.BytesIO(data)) as img:  # type: ignore[arg-type]
            w, h = img.size
            fmt = img.format
        if fmt == "JPEG":  # e.g. a DNL height, or a SOF our parser could not place
            return h, w, KIND_JPEG_CPU
        return h, w, KIND_OTHER
    except Exception:  # OSError, SyntaxError, struct.error, DecompressionBombError...
        return 0, 0, KIND_BAD


def draft_scale(crops: torch.Tensor, size: int, kind: int) -> int:
    """The largest DCT scale s in (8, 4, 2) at which every crop [V,4] (i, j, h, w) keeps at
    least ``size`` pixels on both sides (so the resize still only shrinks), else 1."""
    if kind in (KIND_OTHER, KIND_BAD):
        return 1
    short = int(torch.minimum(crops[:, 2], crops[:, 3]).min())
    for s in DRAFT_SCALES:
        if short >= s * size:
            return s
    return 1


def _bad(name: str, e: Exception) -> DataError:
    if isinstance(e, DataError):
        return e
    return DataError(f"cannot read image {name}: {type(e).__name__}: {e}")


def _views_pil(img: Image.Image, crops: torch.Tensor, size: int, scale: int) -> torch.Tensor:
    out = torch.empty((len(crops), 3, size, size), dtype=torch.uint8)
    for v, (i, j, h, w) in enumerate(crops.tolist()):
        if scale == 1:  # as torchvision's resized_crop on a PIL image: crop, then resize
            view = img.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BILINEAR)
        else:  # the box in the reduced image's coordinates: pixel p' covers [p's, (p'+1)s)
            box = (j / scale, i / scale, (j + w) / scale, (i + h) / scale)
            view = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        out[v] = torch.from_numpy(np.array(view)).permute(2, 0, 1)
    return out


def decode_full(data: bytes, kind: int, name: str) -> torch.Tensor:
    """The whole image as uint8 [3,H,W] on the CPU: ``decode_jpeg`` for JPEGs, PIL (any mode
    made 8-bit RGB as :func:`moco.data.source.to_rgb`) for the rest. Raises :class:`DataError`."""
    if kind in (KIND_JPEG, KIND_JPEG_CPU):
        try:
            x = _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            assert isinstance(x, torch.Tensor)
            return x
        except RuntimeError:
            pass  # a JPEG libjpeg refuses (truncated...): PIL's verdict and message below
    try:
        img = open_rgb(io.BytesIO(data))  # type: ignore[arg-type]  # PIL opens file objects
    except DataError as e:  # its message names the BytesIO: name the file instead
        raise DataError(f"cannot read image {name}: {str(e).split('>: ', 1)[-1]}") from None
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def decode_views(data: bytes, crops: torch.Tensor, size: int, kind: int, name: str,
                 reduce: bool = True, pil: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Views of one image: uint8 [V,3,size,size], each the crop ``crops[v]`` = (i, j, h, w)
    of the ORIGINAL image resized to ``size`` (antialiased bilinear), and the (height,
    width) of the image as decoded at full size.

    ``reduce``: decode a JPEG at 1/s size when :func:`draft_scale` allows; ``pil``: decode
    and resize with PIL only (as the original recipe: the benchmark's comparison path).
    Raises :class:`DataError` naming ``name`` when the bytes are not a readable image.
    """
    s = draft_scale(crops, size, kind) if reduce else 1
    if pil and s == 1:
        try:
            img = open_rgb(io.BytesIO(data))  # type: ignore[arg-type]
        except DataError as e:
            raise DataError(f"cannot read image {name}: {str(e).split('>: ', 1)[-1]}") from None
        return _views_pil(img, crops, size, 1), (img.height, img.width)
    try:
        if s > 1:
            with Image.open(io.BytesIO(data)) as img:
                full = (img.height, img.width)
                img.draft("RGB", (img.width // s, img.height // s))
                got = max(1, round(full[1] / img.width)) if img.width else 1
                if got != s:  # draft chose another scale: decode whole instead
                    s = 1
                else:
                    img.load()
                    rgb = img if img.mode == "RGB" else img.convert("RGB")
                    return _views_pil(rgb, crops, size, s), full
        x = decode_full(data, kind, name)
    except (DataError, OSError, SyntaxError, ValueError) as e:
        raise _bad(name, e) from None
    full = (int(x.shape[1]), int(x.shape[2]))
    out = torch.empty((len(crops), 3, size, size), dtype=torch.uint8)
    for v, (i, j, h, w) in enumerate(crops.tolist()):
        out[v] = TF.resized_crop(x, i, j, h, w, [size, size], antialias=True)
    return out, full


def _as_tensor(data: bytes | torch.Tensor) -> torch.Tensor:
    """A file's bytes as a contiguous uint8 [n] CPU tensor (a tensor is used as it is)."""
    if isinstance(data, torch.Tensor):
        return data.contiguous()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_bytes(data: bytes | torch.Tensor) -> bytes:
    return data.numpy().tobytes() if isinstance(data, torch.Tensor) else data


_ALLOC_STREAMS: dict[int, torch.cuda.Stream] = {}


def _allocation_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream nvJPEG's outputs are allocated on: one per GPU, used for nothing else."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    stream = _ALLOC_STREAMS.get(idx)
    if stream is None:
        stream = _ALLOC_STREAMS[idx] = torch.cuda.Stream(torch.device("cuda", idx))
    return stream


def device_batch_decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``decode_jpeg`` of a list of JPEGs in one call on ``device`` -> uint8 [3,H,W] each;
    raises RuntimeError when any file fails (the whole call fails).

    On CUDA, torchvision allocates the outputs on the current stream and nvJPEG writes them
    from a stream of its own. Allocated on the consumer's stream, an output could get a block
    that the consumer's queued kernels still read (freed by Python, so free for that stream)
    and be overwritten under them. So the outputs are allocated on a stream that runs nothing
    (:func:`_allocation_stream`), the consumer (the current stream) waits for it, and each
    output is marked as used by the consumer (``record_stream``): its block is reused only
    after the consumer's work on it has finished."""
    if device.type != "cuda":
        out = _decode_jpeg(tensors, device)
        assert isinstance(out, list)
        return out
    consumer = torch.cuda.current_stream(device)
    alloc = _allocation_stream(device)
    with torch.cuda.device(device), torch.cuda.stream(alloc):
        out = _decode_jpeg(tensors, device)
    assert isinstance(out, list)
    consumer.wait_stream(alloc)  # torchvision made alloc wait for nvJPEG's stream
    for x in out:
        x.record_stream(consumer)
    return out


BatchDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def _decode_split(tensors: list[torch.Tensor], idx: list[int], device: torch.device,
                  batch: BatchDecoder) -> dict[int, torch.Tensor]:
    """``tensors[idx]`` decoded in one call; when it fails, each half is tried again, so a bad
    file costs about 2·log2(n) more calls and only the files that fail alone are missing."""
    try:
        return dict(zip(idx, batch([tensors[k] for k in idx], device), strict=True))
    except RuntimeError:
        if len(idx) == 1:
            return {}
        mid = len(idx) // 2
        return {**_decode_split(tensors, idx[:mid], device, batch),
                **_decode_split(tensors, idx[mid:], device, batch)}


def decode_on_device(datas: Sequence[bytes | torch.Tensor], kinds: Sequence[int],
                     names: Sequence[str], device: torch.device, cpu_fallback: bool = True,
                     fallbacks: list[int] | None = None,
                     batch: BatchDecoder = device_batch_decode) -> list[torch.Tensor | DataError]:
    """Decode a batch: uint8 [3,H,W] per image on ``device``, or the :class:`DataError` of
    an unreadable one. ``datas``: each file's bytes, or a uint8 [n] CPU tensor of them (e.g.
    views of one shared-memory buffer). JPEGs (``KIND_JPEG``) go to ``batch`` (default
    :func:`device_batch_decode`: ``decode_jpeg`` in one call on the device, nvJPEG on CUDA);
    a call that fails (one bad file fails it) is split in halves until the files that fail
    alone are found. Those, and the other kinds, are decoded on the CPU one by one and copied
    over (non-blocking, from pinned memory), their indices appended to ``fallbacks`` when
    given (``cpu_fallback`` False: they are DataErrors)."""
    out: list[torch.Tensor | DataError | None] = [None] * len(datas)
    jpegs = [k for k, kind in enumerate(kinds) if kind == KIND_JPEG]
    if jpegs:
        tensors = [_as_tensor(d) for d in datas]
        for k, img in _decode_split(tensors, jpegs, device, batch).items():
            out[k] = img
    for k, done in enumerate(out):
        if done is not None:
            continue
        if fallbacks is not None:
            fallbacks.append(k)
        if not cpu_fallback:
            out[k] = DataError(f"cannot decode {names[k]} on {device}")
            continue
        try:
            out[k] = to_device(decode_full(_as_bytes(datas[k]), kinds[k], names[k]), device)
        except (DataError, OSError, SyntaxError, ValueError) as e:
            out[k] = _bad(names[k], e)
    return out  # type: ignore[return-value]


def crop_on_device(images: Sequence[torch.Tensor], crops: torch.Tensor, source: Sequence[int],
                   size: int) -> torch.Tensor:
    """View v = crop ``crops[v]`` (i, j, h, w) of ``images[source[v]]`` (uint8 [3,H,W] on the
    device) resized to ``size`` -> float32 [V,3,size,size] in [0, 1] on the images' device.

    One ``torchvision.ops.roi_align`` per distinct image size (the images of that size
    stacked), not one resize per view. Each output pixel is the mean of ceil(h/size) x
    ceil(w/size) bilinear samples spread evenly over its bin, the box in continuous pixel
    coordinates (``aligned=True``: pixel p covers [p, p+1), as ``interpolate`` with
    ``align_corners=False``). Enlarging a crop this is bilinear interpolation, equal to
    ``interpolate``'s except on the border rows and columns, where it reads the image beyond
    the box instead of repeating the box's edge; shrinking, it averages each bin (a box
    filter) where the CPU's antialiased resize (``resized_crop``, PIL) weights a triangle
    twice as wide: views differ from the per-view resize by under a level on average
    (a bound the tests check)."""
    dev = images[0].device
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, img in enumerate(images):
        by_size.setdefault((int(img.shape[1]), int(img.shape[2])), []).append(k)
    views_of: dict[int, list[int]] = {}
    for v, k in enumerate(source):
        views_of.setdefault(int(k), []).append(v)
    c = crops.tolist()
    order: list[int] = []
    parts = []
    for members in by_size.values():
        rows = []
        for pos, k in enumerate(members):
            for v in views_of.get(k, []):
                i, j, h, w = c[v]
                rows.append((float(pos), float(j), float(i), float(j + w), float(i + h)))
                order.append(v)
        if not rows:
            continue
        stack = torch.stack([images[k] for k in members]).to(torch.float32)
        boxes = to_device(torch.tensor(rows, dtype=torch.float32), dev)
        parts.append(roi_align(stack, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != list(range(len(order))):
        out = out[to_device(torch.argsort(torch.tensor(order)), dev)]
    return out.clamp_(0.0, 255.0).mul_(1.0 / 255.0)
