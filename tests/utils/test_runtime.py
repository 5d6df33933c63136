"""moco.utils.runtime: device names normalised to indexed devices, the precision chosen from the GPU's
capability, backend flags, and small tensors sent in one copy. The hardware is an argument, so
each CUDA decision is checked here without a GPU."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moco.engine.loop as train_mod
import moco.engine.run as run_mod
from moco.core.device import normalize_device, packed_to_device, same_device, to_device
from moco.utils.runtime import (
    DeviceError,
    configure_backends,
    default_workers,
    native_bf16_here,
    needs_grad_scaler,
    precision_name,
    resolve_device,
    resolve_precision,
)

ONE_GPU = (True, 1, 0)  # CUDA available, 1 GPU, current index 0
TWO_GPUS_ON_1 = (True, 2, 1)
NO_GPU = (False, 0, 0)


# ----- devices: a bare 'cuda' against the 'cuda:0' tensors report ---------------------------------

def test_an_unindexed_cuda_device_differs_from_cuda_0() -> None:
    """Why devices are resolved to an index: torch compares devices field by field, so a bare
    ``cuda`` is not the ``cuda:0`` every CUDA tensor reports."""
    assert torch.device("cuda") != torch.device("cuda", 0)


@pytest.mark.parametrize(("name", "cuda", "expected"), [
    ("auto", ONE_GPU, torch.device("cuda", 0)),
    ("cuda", ONE_GPU, torch.device("cuda", 0)),
    ("auto", TWO_GPUS_ON_1, torch.device("cuda", 1)),  # the current GPU, as torch picks it
    ("cuda", TWO_GPUS_ON_1, torch.device("cuda", 1)),
    ("cuda:0", TWO_GPUS_ON_1, torch.device("cuda", 0)),
    ("auto", NO_GPU, torch.device("cpu")),
    ("cpu", ONE_GPU, torch.device("cpu")),
])
def test_resolve_device_gives_an_indexed_device(name: str, cuda: tuple[bool, int, int],
                                                expected: torch.device) -> None:
    dev = resolve_device(name, cuda=cuda)
    assert dev == expected and (dev.type != "cuda" or dev.index is not None)


@pytest.mark.parametrize(("name", "cuda", "message"), [
    ("gpu", ONE_GPU, "--device 'gpu' is not a device (auto, cpu, cuda, cuda:1, ...)"),
    ("cuda", NO_GPU, "--device cuda: CUDA is not available on this machine; use --device cpu"),
    ("cuda:2", TWO_GPUS_ON_1, "--device cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1"),
])
def test_bad_devices_are_one_line_errors(name: str, cuda: tuple[bool, int, int], message: str) -> None:
    with pytest.raises(DeviceError) as e:
        resolve_device(name, cuda=cuda)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_same_device_treats_cuda_as_the_current_gpu() -> None:
    assert same_device("cuda", torch.device("cuda", 0), current_index=0)
    assert same_device(torch.device("cuda", 1), "cuda", current_index=1)
    assert not same_device("cuda", "cuda:1", current_index=0)
    assert not same_device("cuda:0", "cpu")
    assert same_device("cpu", torch.device("cpu")) and same_device("cpu", "cpu:0")
    assert normalize_device("cuda", current_index=3) == torch.device("cuda", 3)
    assert normalize_device("cpu") == torch.device("cpu")


# ----- precision: bf16 only with bf16 units -------------------------------------------------------

def test_auto_precision_follows_the_gpu_capability() -> None:
    gpu = torch.device("cuda", 0)
    assert resolve_precision("auto", gpu, native_bf16=True) == torch.bfloat16  # A100, H100
    assert resolve_precision("auto", gpu, native_bf16=False) == torch.float16  # V100, T4
    assert resolve_precision("auto", torch.device("cpu"), native_bf16=True) is None
    assert needs_grad_scaler(torch.float16) and not needs_grad_scaler(torch.bfloat16)
    assert not needs_grad_scaler(None)


def test_explicit_precisions() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda", 0), native_bf16=True) is None
    with pytest.raises(DeviceError, match="--precision fp16 needs CUDA"):
        resolve_precision("fp16", cpu)
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_native_bf16_counts_no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.cuda.is_bf16_supported()`` says True on a V100 by default (emulation); the
    lookup asks for native units only."""
    asked: list[object] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # a V100: emulated only

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    assert native_bf16_here(torch.device("cuda", 0)) is False and asked == [False]
    assert native_bf16_here(torch.device("cpu")) is False


def test_the_commands_share_one_resolve_device() -> None:
    import moco.engine.run as run
    import moco.eval.encoders as encoders

    assert run.resolve_device is resolve_device
    assert encoders.resolve_device is resolve_device


def test_pretrainer_resolves_precision_and_sets_backends(monkeypatch: pytest.MonkeyPatch,
                                                         tiny_data: Path, tmp_path: Path) -> None:
    """The training run takes its precision and backend flags from moco.utils.runtime."""
    seen: list[tuple[str, torch.device]] = []
    real = run_mod.resolve_precision

    def spy(precision: str, device: torch.device, native_bf16: bool | None = None) -> torch.dtype | None:
        seen.append((precision, device))
        return real(precision, device, native_bf16)

    configured: list[torch.device] = []
    monkeypatch.setattr(run_mod, "resolve_precision", spy)
    monkeypatch.setattr(run_mod, "configure_backends", configured.append)
    from helpers import TINY_FLAGS

    from moco.cli import build_parser
    from moco.cli.pretrain import config_from_args

    cfg = config_from_args(build_parser().parse_args(
        ["pretrain", str(tiny_data), *TINY_FLAGS, "--output", str(tmp_path / "r"), "--knn-every", "0"]))
    p = train_mod.Pretrainer(cfg, log=lambda _m: None, progress=False)
    p.runlog.close()
    assert seen == [("auto", torch.device("cpu"))] and configured == [torch.device("cpu")]


# ----- backends: cudnn.benchmark ------------------------------------------------------------------

def test_cudnn_benchmark_is_set_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_backends(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


def test_default_workers() -> None:
    assert default_workers(torch.device("cuda", 0), cores=16) == 8
    assert default_workers(torch.device("cuda", 0), processes_here=8, cores=16) == 2
    assert default_workers(torch.device("cpu"), cores=2) == 1


# ----- small copies -----------------------------------------------------------------------------

class CopiesToDevice(TorchDispatchMode):
    """Counts the operations that copy CPU data onto another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if src.device.type == "cpu" and dst.device.type != "cpu":
                self.copies += 1
        return out


def test_packed_to_device_is_one_copy_and_exact() -> None:
    tensors = {"crop": torch.tensor([[3, 5, 20, 2**40]]), "flip": torch.tensor([True, False]),
               "f64": torch.tensor([0.1, -2.5e-7], dtype=torch.float64),
               "f32": torch.tensor([1 / 3], dtype=torch.float32)}
    with CopiesToDevice() as mode:
        on_meta = packed_to_device(tensors, torch.device("meta"))
    assert mode.copies == 1
    assert {k: (v.dtype, v.shape, v.device.type) for k, v in on_meta.items()} == {
        k: (v.dtype, v.shape, "meta") for k, v in tensors.items()}
    # the values survive the float64 packing (checked on the CPU, where meta has no values)
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors.values()])
    pos = 0
    for t in tensors.values():
        back = flat[pos:pos + t.numel()].view(t.shape).to(t.dtype)
        assert torch.equal(back, t)
        pos += t.numel()
    assert packed_to_device(tensors, torch.device("cpu")) is tensors
    x = torch.ones(2)
    assert to_device(x, torch.device("cpu")) is x


def test_lincls_precision_follows_the_runtime_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The linear protocol's frozen backbone: bf16 where pretraining's auto would pick bf16
    (native units), fp32 on other GPUs (never fp16) and on the CPU; explicit values as given."""
    import moco.eval.lincls_protocol as protocol

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(protocol, "native_bf16_here", lambda d: True)
    monkeypatch.setattr("moco.utils.runtime.native_bf16_here", lambda d: True)
    assert protocol.autocast_dtype("auto", gpu) == torch.bfloat16
    monkeypatch.setattr(protocol, "native_bf16_here", lambda d: False)
    assert protocol.autocast_dtype("auto", gpu) is None
    assert protocol.autocast_dtype("auto", torch.device("cpu")) is None
    assert protocol.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert protocol.autocast_dtype("fp32", gpu) is None
