"""PostHocEMA on an Ignite engine: the adapter that :meth:`PostHocEMA.attach <ignite_ema.PostHocEMA.attach>` adds.

It turns the engine's iterations into the core's updates (through
:class:`~ignite_ema.handlers._engine.EngineClock`, which goes on across
runs), resolves ``"ep"``/``"dur"`` when a run starts, writes the snapshots
through Ignite's ``DiskSaver``, publishes the momenta and ends a completed run
with a snapshot. Everything else, the state included, is the core's
(:mod:`ignite_ema.posthoc.core`).
"""

from __future__ import annotations

from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver

from ignite_ema._checks import warn_at_caller
from ignite_ema.handlers._engine import EngineClock, Event, attach_update, resumed_without_state
from ignite_ema.posthoc.core import PostHocEMA, _steps_between_snapshots

__all__ = ["EngineAdapter", "PostHocEMA"]


class EngineAdapter:
    """Updates a :class:`~ignite_ema.PostHocEMA` on ``event`` of ``engine``; built by its ``attach``.

    Args:
        posthoc: the post-hoc EMA it updates.
        engine, name, warn_if_exists: as :meth:`PostHocEMA.attach <ignite_ema.PostHocEMA.attach>`'s.
        attached: the engine ``posthoc`` is attached to already, if any (an error: one engine per handler).
        event: when to update; ``None`` for ``Events.ITERATION_COMPLETED``.

    Attributes:
        engine: the engine.
        clock: the engine's iterations as steps, going on across runs.
    """

    def __init__(
        self,
        posthoc: PostHocEMA,
        engine: object,
        attached: Engine | None,
        name: str,
        warn_if_exists: bool,
        event: Event | None,
    ) -> None:
        self.posthoc = posthoc
        self.clock = EngineClock()
        if posthoc._restored:  # a state loaded before attach()
            self.restore(posthoc._loaded_offset)
        event = Events.ITERATION_COMPLETED if event is None else event
        self.engine = attach_update("PostHocEMA", engine, attached, self._update, name, warn_if_exists, event)
        setattr(self.engine.state, name, None)
        self.engine.add_event_handler(Events.STARTED, self._on_started)
        self.engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def restore(self, offset: int) -> None:
        """Take the clock's offset from a loaded state."""
        self.clock.offset = offset
        self.clock.restored = True

    def _on_started(self, engine: Engine) -> None:
        posthoc = self.posthoc
        posthoc._every = _steps_between_snapshots(
            posthoc._snapshot_every, (engine.state.epoch_length, engine.state.max_epochs)
        )
        if not isinstance(posthoc._writer, DiskSaver):
            posthoc._writer = DiskSaver(posthoc.snapshot_dir, atomic=True, create_dir=True, require_empty=False)
        posthoc._start()
        if self.clock.start_run(engine, posthoc.last_step):
            consequence = "its first update copies the student, which then stands for every iteration before it"
            warn_at_caller(resumed_without_state("PostHocEMA", engine, consequence, "posthoc"))

    def _update(self, engine: Engine, name: str) -> None:
        step = self.clock.now(engine)
        if step <= self.posthoc.last_step:  # two events at one iteration: nothing new to average
            return
        setattr(engine.state, name, self.posthoc._update(step))

    def _on_completed(self, engine: Engine) -> None:
        """A run that reached its end (not one terminated early) ends with a snapshot of its last update."""
        state = engine.state
        end = state.max_iters
        if end is None and state.epoch_length is not None and state.max_epochs is not None:
            end = state.epoch_length * state.max_epochs
        if end is not None and state.iteration >= end and self.posthoc.last_step > 0:
            self.posthoc.snapshot()
