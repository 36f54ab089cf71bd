"""The EMA implementations compared, behind one interface: time ``n`` updates, or do one.

Engine-based contenders (ignite_ema's and Ignite's handlers) run an Ignite
:class:`~ignite.engine.Engine` whose step does nothing and time its epoch
(``EPOCH_STARTED`` to ``EPOCH_COMPLETED``, so per-run work such as a handler's
``STARTED`` callback is left out); the bare engine is timed the same way, and
its time is subtracted per iteration. The others are called in a plain loop.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from ignite.engine import CallableEventWithFilter, Engine, Events
from ignite.handlers import EMAHandler as IgniteEMAHandler
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmarks.measure import clock
from benchmarks.models import averaged_pairs, describe
from ignite_ema import EMAHandler

__all__ = [
    "BARE",
    "FLOOR",
    "FOREACH",
    "IGNITE",
    "MOMENTUM",
    "NOTES",
    "OURS",
    "TIMM",
    "TORCH",
    "Contender",
    "DirectContender",
    "EngineContender",
    "build_contenders",
    "floor_lerp",
    "foreach_lerp_alone",
    "load_timm_model_ema",
    "ours_on_engine",
    "per_update",
]

MOMENTUM = 0.0002  # Ignite's default; timm and torch get decay = 1 - MOMENTUM

OURS, IGNITE, TIMM, TORCH, FLOOR, FOREACH, BARE = (
    "ignite_ema",
    "ignite EMAHandler",
    "timm ModelEmaV3",
    "torch AveragedModel",
    "floor (one lerp_)",
    "_foreach_lerp_ alone",
    "bare engine",
)

NOTES = {
    OURS: "handle_buffers='update': parameters and floating buffers averaged with one torch._foreach_lerp_ per "
    "(device, dtype) group built once; integer buffers copied by value (one torch._foreach_copy_)",
    IGNITE: "handle_buffers='update': a Python loop of mul_ + add_ per tensor; on an integer buffer mul_ raises, "
    "the RuntimeError is caught and the buffer is aliased (ema_b.data = model_b.data), not copied",
    TIMM: "foreach=True, decay = 1 - momentum: walks both state_dict()s every update, foreach-lerps the floating "
    "entries, copies integer entries one by one (copy_ in a Python loop)",
    TORCH: "multi_avg_fn=get_ema_multi_avg_fn(1 - momentum), use_buffers=True: builds and groups the tensor lists "
    "every update; averages ALL buffers: integer ones (num_batches_tracked) as p_ema.copy_(p_ema * decay + "
    "p_model * (1 - decay)), i.e. averaged in float and truncated, not copied, with temporaries; the first "
    "update copies",
    FLOOR: "one in-place Tensor.lerp_ over a contiguous buffer with as many elements as the averaged tensors",
    FOREACH: "reference, not an EMA handler: one torch._foreach_lerp_ over the same floating tensors (plain "
    "detached tensors, each its own allocation), integer buffers left alone: what any implementation that keeps "
    "the student's tensors separate pays on this torch build",
    BARE: "Engine with a no-op step and no handler (subtracted from the engine-based rows)",
}


class Contender:
    """Something that does EMA updates: ``timed_run(n)`` returns seconds for ``n`` of them."""

    name: str

    def timed_run(self, n: int) -> float:
        raise NotImplementedError

    def update_once(self) -> None:
        """One update, for memory profiling (for an engine: a one-iteration run)."""
        self.timed_run(1)


@dataclass
class DirectContender(Contender):
    """An update function called ``n`` times in a loop."""

    name: str
    update: Callable[[], None]

    def timed_run(self, n: int) -> float:
        update = self.update
        start = clock()
        for _ in range(n):
            update()
        return clock() - start

    def update_once(self) -> None:
        self.update()


def _noop_step(engine: Engine, batch: Any) -> None:
    return None


@dataclass
class EngineContender(Contender):
    """An Engine with a no-op step and optional handlers, its epoch timed."""

    name: str
    handler: Any = None
    engine: Engine = field(default_factory=lambda: Engine(_noop_step))
    _start: float = 0.0
    _elapsed: float = 0.0

    def __post_init__(self) -> None:
        self.engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        self.engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)

    def _on_epoch_started(self) -> None:
        self._start = clock()

    def _on_epoch_completed(self) -> None:
        self._elapsed = clock() - self._start

    def timed_run(self, n: int) -> float:
        self.engine.run(range(n), max_epochs=1)
        return self._elapsed


def ours_on_engine(
    student: nn.Module, momentum: float, event: Events | CallableEventWithFilter = Events.ITERATION_COMPLETED
) -> EngineContender:
    """ignite_ema's EMAHandler (handle_buffers='update') on a fresh engine, updating on ``event``."""
    handler = EMAHandler(student, momentum=momentum, handle_buffers="update")
    contender = EngineContender(OURS, handler=handler)
    handler.attach(contender.engine, event=event)
    return contender


def _ignite_on_engine(student: nn.Module, momentum: float) -> EngineContender:
    handler = IgniteEMAHandler(student, momentum=momentum, handle_buffers="update")
    contender = EngineContender(IGNITE, handler=handler)
    handler.attach(contender.engine)
    return contender


@functools.cache
def load_timm_model_ema() -> tuple[ModuleType, str]:
    """timm's ``timm/utils/model_ema.py``, imported through timm or, if that fails, loaded alone.

    ``import timm`` needs torchvision, huggingface_hub, ...; the file itself needs
    only torch, so a ``pip install --no-deps timm`` is enough to load it alone.
    """
    try:
        return importlib.import_module("timm.utils.model_ema"), f"timm {version('timm')}"
    except Exception:  # timm's own imports (torchvision beside this torch build, say) may fail
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("timm is not installed (pip install --no-deps timm)")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    file_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    if file_spec is None or file_spec.loader is None:
        raise ModuleNotFoundError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module, f"timm {version('timm')} (model_ema.py loaded alone: import timm failed)"


def _timm(student: nn.Module, momentum: float) -> DirectContender | None:
    try:
        model_ema, _ = load_timm_model_ema()
    except (ModuleNotFoundError, PackageNotFoundError):
        return None
    ema = model_ema.ModelEmaV3(student, decay=1.0 - momentum, foreach=True)
    return DirectContender(TIMM, lambda: ema.update(student))


def _averaged_model(student: nn.Module, momentum: float) -> DirectContender:
    ema_fn = get_ema_multi_avg_fn(1.0 - momentum)  # type: ignore[no-untyped-call]
    averaged = AveragedModel(student, multi_avg_fn=ema_fn, use_buffers=True)
    averaged.update_parameters(student)  # the first update only copies
    return DirectContender(TORCH, lambda: averaged.update_parameters(student))


def floor_lerp(student: nn.Module, momentum: float) -> DirectContender:
    numel = describe(student)["averaged_elements"]
    shadow, source = torch.randn(numel), torch.randn(numel)

    def lerp() -> None:
        shadow.lerp_(source, momentum)

    return DirectContender(FLOOR, lerp)


def foreach_lerp_alone(student: nn.Module, momentum: float) -> DirectContender:
    _, students, _, _ = averaged_pairs(student, student)
    sources = [t.detach() for t in students]
    shadows = [t.clone() for t in sources]

    @torch.no_grad()
    def lerp() -> None:
        torch._foreach_lerp_(shadows, sources, momentum)

    return DirectContender(FOREACH, lerp)


def build_contenders(student: nn.Module, momentum: float) -> list[Contender]:
    """Every contender on ``student``, each with its own EMA copy; timm is left out if not installed."""
    contenders: list[Contender | None] = [
        floor_lerp(student, momentum),
        foreach_lerp_alone(student, momentum),
        EngineContender(BARE),
        ours_on_engine(student, momentum),
        _ignite_on_engine(student, momentum),
        _timm(student, momentum),
        _averaged_model(student, momentum),
    ]
    return [c for c in contenders if c is not None]


def per_update(times: dict[str, list[float]], contenders: Sequence[Contender], n: int) -> dict[str, list[float]]:
    """Seconds per update, round by round: engine-based runs minus the bare engine of the same round."""
    bare = times[BARE]
    out: dict[str, list[float]] = {}
    for c in contenders:
        if isinstance(c, EngineContender) and c.name != BARE:
            out[c.name] = [(t - b) / n for t, b in zip(times[c.name], bare, strict=True)]
        else:
            out[c.name] = [t / n for t in times[c.name]]
    return out
