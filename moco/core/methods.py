"""Pretraining methods, registered by name: the next method is one module.

A method is an ``nn.Module`` subclass of :class:`~moco.core.method_base.PretrainingMethod`
(one step: two views in, a :class:`~moco.core.method_base.StepOutput` out; what it trains,
what it updates each step, what it saves, which encoder evaluation uses) and a
:class:`MethodSpec` registered under its name (how it is built from the run's settings, how
the run's summary line describes it, which settings it refuses, what it warns about, what
memory it holds). ``--mechanism NAME`` (alias ``--method``) picks one; its choices are the
names registered here::

    from moco import PretrainingMethod, StepOutput, register_method

    @register_method("toy", title="toy", help="a toy method")
    def build_toy(settings, encoder, num_samples):
        return Toy(encoder, t=settings.moco_t)

The built-in methods (MoCo v1/v2's queue, the end-to-end and memory-bank mechanisms
MoCo v1 compares against, §3.2 / Figure 2, and MoCo v3) register themselves the same way in the modules
named in :data:`BUILTIN_MODULES`, which are imported on first use: listing the names loads
no torch. ``settings`` is the run's configuration (``moco.engine.config.MocoConfig`` in a
run, any object with the fields a builder reads elsewhere): this package never imports the
engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from moco.core.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from moco.core.method_base import PretrainingMethod

#: ``builder(settings, encoder, num_samples) -> PretrainingMethod``. ``encoder`` is the
#: backbone with its classification head replaced by the projection head ([B,3,H,W] ->
#: [B, moco_dim]), built and seeded by the run; ``num_samples`` the training-set size
#: (None when unknown, e.g. a step benchmark on synthetic images).
Builder = Callable[[Any, "nn.Module", "int | None"], "PretrainingMethod"]
#: ``(what, bytes, how to lower it)``: memory a method holds besides the weights.
MemoryNeed = tuple[str, int, str]

#: Where the built-in methods are registered (imported when a name is first looked up).
BUILTIN_MODULES: dict[str, str] = {
    "moco": "moco.core.model",
    "end-to-end": "moco.core.mechanisms",
    "memory-bank": "moco.core.mechanisms",
    "mocov3": "moco.core.mocov3",
}


def _no_check(_settings: Any) -> None:
    return None


def _no_advice(_settings: Any, _images: int) -> list[str]:
    return []


def _no_memory(_settings: Any, _num_samples: int | None) -> list[MemoryNeed]:
    return []


def _no_dictionary(_settings: Any, _images: int) -> str:
    return ""


def _no_options(_settings: Any) -> dict[str, Any]:
    return {}


def _projection_head(settings: Any) -> str:
    return "MLP head" if getattr(settings, "mlp", False) else "linear head"


def _no_chance(_settings: Any, _batch: int, _world: int) -> float | None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, its builder and what the run asks of it besides the
    module. Every hook has a default that does nothing.

    Attributes:
        name: the ``--mechanism`` / ``--method`` value.
        build: :data:`Builder`.
        title: how the run's summary line names it ("MoCo pretraining: ...").
        help: one line: what it is (``available_methods`` and the docs show it).
        dictionary: ``(settings, training images) -> text``: what each query is contrasted
            with, for the summary line ("K 65536, m 0.999"); "" leaves it out.
        check: ``settings -> None``: raise :class:`ConfigError` for settings that contradict
            the method (before anything is built).
        advise: ``(settings, training images) -> [warning]``: settings that run but cannot
            work as meant on this many images (logged, not refused).
        memory: ``(settings, training-set size or None) -> [(what, bytes, fix)]``: buffers
            besides the weights (a queue, a bank), refused before they are allocated when
            they cannot fit.
        has_queue: the queue diagnostics (``--staleness-every``) apply: the module has
            MoCo's ``encode_query`` / ``encode_key`` / ``key_queue`` / ``t``.
        shuffle_bn: the method uses MoCo's Shuffling BN (``--shuffle-bn``, ``--bn-splits``:
            SplitBatchNorm on one process, the key batch shuffled across processes). False:
            no shuffle, the model's BatchNorm normalises the global batch (plain BatchNorm on
            one process, synchronised across processes; MoCo v3 §5).
        backbone_options: ``settings -> {field: value}``: the
            :class:`~moco.core.backbones.BackboneOptions` the method's backbone is built with
            (MoCo v3: ``zero_init_residual``), over the run's own (image and patch size, ...).
        head: ``settings -> text``: the projection head, for the summary line ("MLP head").
        chance: ``(settings, per-process batch, processes) -> loss``: the loss of an encoder
            that has learned nothing (every logit alike: ln of the logits' width per InfoNCE
            term, times the terms and their factor; MoCo: ln(K+1)), the level the training
            monitor compares the loss with; None: unknown (the comparison is left out).
    """

    name: str
    build: Builder
    title: str = ""
    help: str = ""
    dictionary: Callable[[Any, int], str] = _no_dictionary
    check: Callable[[Any], None] = _no_check
    advise: Callable[[Any, int], list[str]] = _no_advice
    memory: Callable[[Any, int | None], list[MemoryNeed]] = _no_memory
    has_queue: bool = False
    shuffle_bn: bool = True
    backbone_options: Callable[[Any], dict[str, Any]] = _no_options
    head: Callable[[Any], str] = _projection_head
    chance: Callable[[Any, int, int], float | None] = _no_chance


_REGISTRY: dict[str, MethodSpec] = {}
B = TypeVar("B", bound=Callable[..., Any])


@overload
def register_method(name: str, builder: None = None, **hooks: Any) -> Callable[[B], B]: ...


@overload
def register_method(name: str, builder: B, **hooks: Any) -> B: ...


def register_method(name: str, builder: Any = None, **hooks: Any) -> Any:
    """Register the pretraining method ``name``: as a decorator of its builder
    (``@register_method("toy", title="toy")``) or called with it
    (``register_method("toy", build_toy)``). ``hooks`` are the other :class:`MethodSpec`
    fields. Registering a name again replaces it (a module reloaded); an empty or
    non-text name is a :class:`ConfigError`. Returns the builder."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ConfigError(f"a method name must be non-empty text without surrounding spaces, "
                          f"got {name!r}")

    def add(build: Any) -> Any:
        if not callable(build):
            raise ConfigError(f"register_method({name!r}): the builder must be callable, got "
                              f"{type(build).__name__}")
        _REGISTRY[name] = MethodSpec(name, build, **{"title": name, **hooks})
        return build

    return add(builder) if builder is not None else add


def available_methods() -> tuple[str, ...]:
    """The names of the registered methods, the built-in ones first."""
    return tuple(dict.fromkeys([*BUILTIN_MODULES, *_REGISTRY]))


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; an unknown name is a :class:`ConfigError` naming
    the registered ones."""
    if name not in _REGISTRY and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"expected --mechanism to be one of {', '.join(available_methods())}, "
                          f"got {name!r}; register a method with moco.register_method")
    return spec


def build_method(name: str, settings: Any, encoder: nn.Module,
                 num_samples: int | None = None) -> PretrainingMethod:
    """Method ``name`` around ``encoder``, checked to be a
    :class:`~moco.core.method_base.PretrainingMethod`."""
    from moco.core.method_base import PretrainingMethod

    spec = method_spec(name)
    spec.check(settings)
    method = spec.build(settings, encoder, num_samples)
    if not isinstance(method, PretrainingMethod):
        raise ConfigError(f"the builder of method {name!r} returned a {type(method).__name__}, "
                          "not a moco.PretrainingMethod (subclass it: forward(im_q, im_k, "
                          "shuffle, index) -> StepOutput)")
    return method
