"""Where ignite_ema's update time goes: engine events, Python glue, the multi-tensor calls.

The rows that time ignite_ema's own pieces reach into its private attributes
(``_update``, ``_averager``, ``_schedule``, ...); a row whose attribute is gone
is left empty rather than failing. The raw ``torch._foreach_*`` rows need no
private access: they run on the same tensors, looked up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from ignite.engine import Events
from torch import Tensor, nn

from benchmarks.contenders import (
    BARE,
    MOMENTUM,
    Contender,
    EngineContender,
    floor_lerp,
    foreach_lerp_alone,
    ours_on_engine,
    per_update,
)
from benchmarks.measure import Settings, calls_for, interleaved, mean_call_seconds, median
from benchmarks.models import ModelSpec, averaged_pairs
from benchmarks.report import paired_ratio, print_table, us

__all__ = ["engine_overheads", "forward_hook_cost", "model_breakdown", "print_breakdown"]

FLOOR_ROW = "floor: one lerp_ over as many elements"


def _noop(*args: object) -> None:
    return None


def engine_overheads(settings: Settings) -> dict[str, float]:
    """Per-iteration engine costs, above the bare engine (us): no-op handlers, ours on a 2-tensor model."""
    n = 500 if settings.quick else 2000
    one, two = EngineContender("one"), EngineContender("two")
    one.engine.add_event_handler(Events.ITERATION_COMPLETED, _noop)
    two.engine.add_event_handler(Events.ITERATION_STARTED, _noop)
    two.engine.add_event_handler(Events.ITERATION_COMPLETED, _noop)
    tiny = ours_on_engine(nn.Linear(1, 1), MOMENTUM)
    tiny.name = "tiny"
    contenders: list[Contender] = [EngineContender(BARE), one, two, tiny]
    times = interleaved({c.name: partial(c.timed_run, n) for c in contenders}, settings.rounds, settings.warmup)
    above_bare = {name: us(median(seconds)) for name, seconds in per_update(times, contenders, n).items()}
    return {
        "bare engine, per iteration": above_bare[BARE],
        "+ one no-op ITERATION_COMPLETED handler": above_bare["one"],
        "+ no-op ITERATION_STARTED and ITERATION_COMPLETED handlers": above_bare["two"],
        "+ ignite_ema attached, on nn.Linear(1, 1) (2 tensors)": above_bare["tiny"],
    }


def _raw_calls(handler: Any) -> dict[str, Callable[[], object]]:
    """torch's multi-tensor calls alone, on the tensors ours averages and copies."""
    ema_f, st_f, ema_i, st_i = averaged_pairs(handler.ema_model, handler.model)
    sizes = [t.numel() for t in st_f]
    flat_e, flat_s = (list(torch.randn(sum(sizes)).split_with_sizes(sizes)) for _ in range(2))

    @torch.no_grad()
    def lerp(shadows: list[Tensor], students: list[Tensor]) -> None:
        torch._foreach_lerp_(shadows, students, MOMENTUM)

    @torch.no_grad()
    def copy() -> None:
        if ema_i:
            torch._foreach_copy_(ema_i, st_i)

    return {
        FLOOR_ROW: floor_lerp(handler.model, MOMENTUM).update,
        "    torch._foreach_lerp_, tensors as registered (Parameters)": partial(lerp, ema_f, st_f),
        "    same, on .detach()ed views (plain Tensors)": foreach_lerp_alone(handler.model, MOMENTUM).update,
        "    same sizes, as views of one flat buffer": partial(lerp, flat_e, flat_s),
        "    torch._foreach_copy_ of the integer buffers": copy,
    }


def _ours_calls(handler: Any, engine: Any) -> dict[str, Callable[[], object] | None]:
    """ignite_ema's pieces, called directly (None where an attribute is missing)."""
    ema = getattr(handler, "_ema", None)
    update = getattr(handler, "_update", None)
    averager, copier, watch = (getattr(ema, a, None) for a in ("_averager", "_copier", "_watch"))
    schedule = getattr(ema, "schedule", None) or getattr(handler, "_schedule", None)  # the handler's before 0.2

    def update_at_the_next_iteration() -> None:
        # Each update must come at a later step than the last one: the engine moves one iteration per call.
        engine.state.iteration += 1
        update(engine, "ema_momentum")  # type: ignore[misc]

    return {
        "_update() called directly (no engine)": update and update_at_the_next_iteration,
        "  ShadowAverager.update (averaged tensors)": averager and partial(averager.update, MOMENTUM),
        "  TensorCopier.copy (integer buffers)": copier and copier.copy,
        "  TensorWatch.changed (replaced student tensors)": watch and watch.changed,
        "  MomentumSchedule call": schedule and partial(schedule, 10, 9, 8),
        "  _check_teacher()": getattr(handler, "_check_teacher", None),
        "_on_iteration_started() (each ITERATION_STARTED)": getattr(handler, "_on_iteration_started", None)
        and partial(handler._on_iteration_started, engine),
        "ModelEMA.rebind() (each STARTED, once per run)": getattr(ema, "rebind", None),
    }


_ORDER = (
    FLOOR_ROW,
    "_update() called directly (no engine)",
    "  ShadowAverager.update (averaged tensors)",
    "    torch._foreach_lerp_, tensors as registered (Parameters)",
    "    same, on .detach()ed views (plain Tensors)",
    "    same sizes, as views of one flat buffer",
    "  TensorCopier.copy (integer buffers)",
    "    torch._foreach_copy_ of the integer buffers",
    "  TensorWatch.changed (replaced student tensors)",
    "  MomentumSchedule call",
    "  _check_teacher()",
    "_on_iteration_started() (each ITERATION_STARTED)",
    "ModelEMA.rebind() (each STARTED, once per run)",
)


def model_breakdown(spec: ModelSpec, settings: Settings) -> dict[str, dict[str, float] | None]:
    """Each piece's time per call (us) and its ratio to the floor, all measured in the same rounds."""
    ours = ours_on_engine(spec.build(), MOMENTUM)
    ours.timed_run(2)
    calls = {**_raw_calls(ours.handler), **_ours_calls(ours.handler, ours.engine)}
    runs = {label: partial(mean_call_seconds, fn, calls_for(fn)) for label, fn in calls.items() if fn is not None}
    times = interleaved(runs, settings.rounds, settings.warmup)
    return {
        label: None
        if label not in times
        else {"us": us(median(times[label])), "x_floor": paired_ratio(times[label], times[FLOOR_ROW])}
        for label in _ORDER
    }


def forward_hook_cost(settings: Settings) -> dict[str, float]:
    """What ours' teacher probe costs: per forward of the EMA model it watches, and per training iteration.

    The probe is a forward hook on the EMA model, put on at ``ITERATION_STARTED`` and taken off at
    ``ITERATION_COMPLETED`` while a teacher warning may still be due (a model with floating buffers).
    """
    from ignite.engine import Engine

    from ignite_ema.handlers.ema_handler import _ForwardProbe

    x = torch.randn(1, 1)
    plain, hooked = nn.Linear(1, 1), nn.Linear(1, 1)
    hooked.register_forward_hook(_ForwardProbe(Engine(lambda e, b: None)))
    target = nn.Linear(1, 1)
    probe = _ForwardProbe(Engine(lambda e, b: None))

    def put_on_and_take_off() -> None:
        target.register_forward_hook(probe).remove()

    calls = calls_for(partial(plain, x))
    runs = {
        "plain": partial(mean_call_seconds, partial(plain, x), calls),
        "hooked": partial(mean_call_seconds, partial(hooked, x), calls),
        "on_off": partial(mean_call_seconds, put_on_and_take_off, calls),
    }
    times = interleaved(runs, settings.rounds, settings.warmup)
    return {
        "nn.Linear(1, 1) forward": us(median(times["plain"])),
        "same, with ignite_ema's teacher probe on it": us(median(times["hooked"])),
        "putting the probe on and taking it off (per training iteration)": us(median(times["on_off"])),
    }


def print_breakdown(
    pieces: dict[str, dict[str, dict[str, float] | None]],
    attached: dict[str, dict[str, Any]],
    engine: dict[str, float],
    hook: dict[str, float],
) -> None:
    """One table of ours' pieces per model (us and x floor), then the engine and hook costs."""
    keys = list(pieces)
    header = ["", *(f"{k} us" for k in keys), *(f"{k} x floor" for k in keys)]
    first: list[object] = ["attached to an engine, per update (table)"]
    first += [attached[k]["us_per_update"] for k in keys] + [attached[k]["ratio_to_floor"] for k in keys]
    rows: list[list[object]] = [first]
    for label in _ORDER:
        cells = [pieces[k][label] for k in keys]
        rows.append([label, *(c["us"] if c else None for c in cells), *(c["x_floor"] if c else None for c in cells)])
    print_table("ignite_ema's update, piece by piece (per call; '-': attribute not found)", header, rows)
    print_table("engine cost per iteration (us), model-independent", ["", "us"], [[k, v] for k, v in engine.items()])
    print_table("the teacher probe on the EMA model (us)", ["", "us"], [[k, v] for k, v in hook.items()])
