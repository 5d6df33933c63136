"""The numeric arguments of the evaluation functions and commands (knn, embed, lincls),
checked as the pretrain settings are (:func:`moco.utils.settings.coerce`: integers, finite
numbers, ranges), with errors naming the flag."""

from __future__ import annotations

from typing import Any

from moco.utils.settings import Setting, coerce, from_command_line

# Flags of knn / embed / lincls (the pretrain flags are declared in MocoConfig).
FLAGS: dict[str, Setting] = {
    "k": Setting(("--k",), "", "", kind="int", min=1),
    "t": Setting(("--t",), "", "", kind="float", min=0, min_open=True),
    "batch_size": Setting(("--batch-size",), "", "", kind="int", min=1),
    "bank_chunk": Setting(("--bank-chunk",), "", "", kind="int", min=1),
    "workers": Setting(("--workers",), "", "", kind="int", min=-1, max=1024),
    "image_size": Setting(("--image-size",), "", "", kind="int", min=8),
    "epochs": Setting(("--epochs",), "", "", kind="int", min=1),
    "lr": Setting(("--lr",), "", "", kind="float", min=0),
    "momentum": Setting(("--momentum",), "", "", kind="float", min=0, max=1, max_open=True),
    "wd": Setting(("--wd",), "", "", kind="float", min=0),
    "seed": Setting(("--seed",), "", "", kind="int", min=0, max=2**32 - 1),
    "schedule": Setting(("--schedule",), "", "", kind="int_list", min=0),
}


def check_numbers(**values: Any) -> None:
    """Raise :class:`~moco.core.errors.ConfigError` naming the first flag whose value is of the
    wrong type or out of range (None: not given); a batch of images at ``image_size`` must fit
    in the memory available."""
    for name, value in values.items():
        if value is not None:
            coerce(name, FLAGS[name], value, from_command_line)
    size, batch = values.get("image_size"), values.get("batch_size")
    if size and batch:
        from moco.utils.memory import refuse_if_too_big

        refuse_if_too_big(f"one batch (-b {batch} images of --image-size {size} px, float32)",
                          batch * 3 * size * size * 4, "lower --batch-size or --image-size")
