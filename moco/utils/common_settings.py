"""The settings that several commands share, declared once: ``-j/--workers``, ``--device``,
``--image-size``, ``-b/--batch-size``, ``--precision`` and ``--seed``.

Each function returns a dataclass field declared with :func:`moco.utils.settings.setting`: the
flags, type and range are fixed here; a command chooses the default, the help text and its
group (and the precisions it supports). ``MocoConfig`` (``moco pretrain``) and the evaluation
commands' configurations (``LinclsConfig``, ``KnnConfig``, ``EmbedConfig``, ...) use them, so
``--seed 99999999999`` or ``-j 2000`` gives the same one-line error from every command.
"""

from __future__ import annotations

from typing import Any

from moco.utils.settings import setting

MAX_SEED = 2**32 - 1
MAX_WORKERS = 1024
MIN_IMAGE_SIZE = 8
WORKERS_HELP = "data-loading processes; -1 = cores - 1 on CPU, up to 8 on GPU"
DEVICE_HELP = "auto (CUDA when present), cpu, cuda, cuda:1, ..."
#: ``--image-size`` of the commands that read a checkpoint.
FROM_CHECKPOINT = "the pretraining run's, else 32 for a CIFAR stem, 224"


def workers(*, group: str, help: str = WORKERS_HELP, **kw: Any) -> Any:
    """``-j/--workers``: -1 (automatic) or 0 to 1024 processes; may differ between ranks."""
    return setting(-1, "-j", "--workers", group=group, min=-1, max=MAX_WORKERS, role="runtime",
                   per_rank=True, help=help, **kw)


def device(*, group: str, help: str = DEVICE_HELP, **kw: Any) -> Any:
    """``--device``: auto, cpu, cuda, cuda:N, ... (checked when it is resolved)."""
    return setting("auto", "--device", group=group, role="runtime", help=help, **kw)


def image_size(default: int | None, *, group: str, help: str, **kw: Any) -> Any:
    """``--image-size`` in pixels, at least 8 (None: :data:`FROM_CHECKPOINT`)."""
    if default is None:
        kw.setdefault("default_text", FROM_CHECKPOINT)
    return setting(default, "--image-size", group=group, min=MIN_IMAGE_SIZE, help=help, **kw)


def batch_size(default: int, *, group: str, help: str, **kw: Any) -> Any:
    """``-b/--batch-size``: at least 1."""
    return setting(default, "-b", "--batch-size", group=group, min=1, help=help, **kw)


def precision(default: str | None, choices: tuple[str, ...], *, group: str, help: str,
              **kw: Any) -> Any:
    """``--precision``: one of ``choices`` (auto, fp32, bf16, fp16)."""
    return setting(default, "--precision", group=group, choices=choices, help=help, **kw)


def seed(*, group: str, help: str, **kw: Any) -> Any:
    """``--seed``: 0 to 2**32 - 1 (what ``numpy`` and the samplers accept)."""
    return setting(0, "--seed", group=group, min=0, max=MAX_SEED, help=help, **kw)


def dist_timeout(*, group: str, help: str, **kw: Any) -> Any:
    """``--dist-timeout`` in minutes, under torchrun: (0, one year]."""
    return setting(30.0, "--dist-timeout", group=group, min=0, min_open=True, max=525600,
                   metavar="MINUTES", role="runtime", help=help, **kw)


def check_batch_fits(batch_size: int, image_size: int | None) -> None:
    """Refuse a batch of ``batch_size`` float32 images of ``image_size`` px (when given) that
    cannot fit in the memory available (a one-line error naming -b and --image-size)."""
    if not image_size:
        return
    from moco.utils.memory import refuse_if_too_big

    refuse_if_too_big(f"one batch (-b {batch_size} images of --image-size {image_size} px, "
                      "float32)", batch_size * 3 * image_size * image_size * 4,
                      "lower --batch-size or --image-size")
