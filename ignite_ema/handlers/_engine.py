"""What the package's Ignite handlers do alike with their engine: attach to one engine, and keep a clock across runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList

from ignite_ema._checks import warn_at_caller

__all__ = ["EngineClock", "attach_update", "resumed_without_state"]

Event = str | Events | CallableEventWithFilter | EventsList


def attach_update(
    owner: str,
    engine: object,
    attached: Engine | None,
    update: Callable[..., Any],
    name: str,
    warn_if_exists: bool,
    event: Event,
) -> Engine:
    """Check and add ``update(engine, name)`` on ``event``; returns the engine. Nothing changes if a check fails.

    Args:
        owner: the handler's class name, for the messages.
        engine: what the caller passed as the engine.
        attached: the engine the handler is attached to already, if any: a handler belongs to one.
        update: the handler's update, called with ``name``.
        name: the attribute of ``engine.state`` the handler publishes.
        warn_if_exists: warn if ``engine.state`` has ``name`` already.
        event: when to update; Ignite checks it as the handler is added, which comes first.
    """
    if not isinstance(engine, Engine):
        raise TypeError(f"attach expects an ignite Engine; found {type(engine).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a valid attribute name for engine.state; found {name!r}")
    if attached is not None:
        where = "this engine" if attached is engine else "another engine"
        raise RuntimeError(
            f"this {owner} is attached to {where} already: its counters follow one engine's iterations. Build one "
            f"{owner} per engine (load_state_dict() carries its state over to a new one)"
        )
    engine.add_event_handler(event, update, name)
    if hasattr(engine.state, name) and warn_if_exists:
        warn_at_caller(
            f"Attribute '{name}' already exists in Engine.state. It might be because 1. the engine has loaded its "
            f"state dict or 2. {name} is already created by another handler. Turn off this warning by setting "
            "warn_if_exists to False."
        )
    return engine


class EngineClock:
    """A handler's count of iterations across runs of its engine: the engine's iteration plus an offset.

    A new ``engine.run()`` restarts the engine's count; the clock goes on
    from the handler's last update instead, so warm-ups and start phases
    happen once per handler and the time since the last update stays positive.
    The last update's reading is the core's (``ModelEMA.last_step``,
    ``PostHocEMA.last_step``): the clock holds only what needs an engine.

    Attributes:
        offset: what the clock adds to the engine's iteration (saved as ``iteration_offset``).
        restored: whether the handler's state was loaded.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.restored = False

    def now(self, engine: Engine) -> int:
        """The clock's reading at the engine's current iteration."""
        return self.offset + engine.state.iteration

    def start_run(self, engine: Engine, last_update: int) -> bool:
        """Call when a run starts. ``True`` when the engine resumes past iteration 0 but the handler has neither
        updated nor loaded a state: a checkpoint restored everything but the handler.

        Args:
            engine: the engine whose run starts.
            last_update: the clock's reading at the handler's last update (0: none yet).
        """
        if self.now(engine) < last_update:
            self.offset = last_update - engine.state.iteration
            return False
        return engine.state.iteration > 0 and last_update == 0 and not self.restored


def resumed_without_state(owner: str, engine: Engine, consequence: str, key: str) -> str:
    """The warning for an engine that resumes past iteration 0 while the handler has neither updated nor loaded a
    state (a checkpoint restored everything but the handler): what happens instead, and how to resume exactly."""
    return (
        f"the engine resumes at iteration {engine.state.iteration}, but this {owner} has never updated and its "
        f"state was not loaded: {consequence}. To resume it exactly, checkpoint the handler itself "
        f"(Checkpoint(to_save={{{key!r}: handler, ...}}))"
    )
