"""Choices of settings that come from a registry: the pretraining methods
(:mod:`moco.core.methods`), the optimizers and the lr schedules
(:mod:`moco.engine.optimizers`). Each is read when it is used, so a name registered after
the config was imported is a valid value, and ``moco pretrain --help`` lists it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, SupportsIndex


class Registered(tuple[str, ...]):
    """The names a registry holds *now*, read on every use: the choices of a setting whose
    values can be registered after this module is imported (``moco.register_method``). It
    is a tuple to everything that reads choices (``in``, iteration, ``len``, ``join``)."""

    def __new__(cls, names: Callable[[], tuple[str, ...]]) -> Registered:
        obj = super().__new__(cls)
        obj._names = names  # type: ignore[attr-defined]
        return obj

    def _now(self) -> tuple[str, ...]:
        names: tuple[str, ...] = self._names()  # type: ignore[attr-defined]
        return names

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def __contains__(self, value: object) -> bool:
        return value in self._now()

    def __getitem__(self, i: SupportsIndex | slice) -> Any:
        return self._now()[i]

    def __eq__(self, other: object) -> bool:
        return self._now() == (tuple(other) if isinstance(other, tuple) else other)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return repr(self._now())


def _methods() -> tuple[str, ...]:
    from moco.core.methods import available_methods

    return available_methods()


def _optimizers() -> tuple[str, ...]:
    from moco.engine.optimizers import optimizer_names

    return optimizer_names()


def _lr_schedules() -> tuple[str, ...]:
    from moco.engine.optimizers import lr_schedule_names

    return lr_schedule_names()


#: The registered pretraining methods (``moco.core.methods``), read when used.
MECHANISMS = Registered(_methods)
OPTIMIZERS = Registered(_optimizers)
LR_SCHEDULES = Registered(_lr_schedules)
