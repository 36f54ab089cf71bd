"""EMAHandler: Ignite events -> the momentum schedule -> :class:`~ignite_ema.ModelEMA`.

The handler keeps only what needs an engine: when to update and with which
momentum, the EMA model's train/eval mode, the teacher warnings, and the
counters of its own clock. The EMA itself is a :class:`~ignite_ema.ModelEMA`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from ignite.base.mixins import Serializable
from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList
from torch import nn
from torch.utils.hooks import RemovableHandle

from ignite_ema._checks import (
    check_bool,
    check_keys,
    warn_at_caller,
)
from ignite_ema.handlers._engine import EngineClock, attach_update, resumed_without_state
from ignite_ema.model_ema import STATE_KEYS, ModelEMA
from ignite_ema.schedules import MomentumSchedule, momentum_from_half_life

__all__ = ["EMAHandler"]

SYNC_BUFFERS_MODES = (None, "update")


class _Default(float):
    """Ignite's default momentum, distinguishable from the same number passed on purpose."""


_MOMENTUM_DEFAULT = _Default(0.0002)
# What the handler's state adds to its ModelEMA's: the updates it skipped, and its clock's offset.
_COUNTERS = ("num_skipped", "iteration_offset")


class _ForwardProbe:
    """A forward hook on the EMA model, present only during training iterations: did it run inside the step?

    A forward counts when the trainer's last event is ``ITERATION_STARTED`` or
    a custom event fired by the step; not during ``ITERATION_COMPLETED``
    handlers (an evaluator run there is no teacher).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ran = False

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        last = self.engine.last_event_name
        if last is Events.ITERATION_STARTED or not isinstance(last, Events):
            self.ran = True


class EMAHandler(Serializable):
    r"""Keep an exponential moving average (EMA) of a model's weights during an Ignite run.

    A drop-in for :class:`ignite.handlers.EMAHandler` (0.5.x): the same
    arguments, the same :meth:`attach`, the same ``ema_model``. After each
    update, :math:`\theta_{EMA} \leftarrow (1 - m)\,\theta_{EMA} + m\,\theta`,
    and the momentum ``m`` of that update is published as
    ``engine.state.<name>``.

    Args:
        model: the student. ``DataParallel``, ``DistributedDataParallel`` and
            ``torch.compile`` wrappers are unwrapped.
        momentum: weight of the student per update, in (0, 1). Default 0.0002.
        momentum_warmup: Ignite's linear warm-up: momentum of the first
            update, moving linearly to ``momentum`` over ``warmup_iters``
            iterations (give both or neither).
        warmup_iters: length of the linear warm-up, in iterations.
        handle_buffers: what happens to buffers (BatchNorm statistics):

            - ``"copy"`` (default): the EMA model is in eval mode; at each
              update every buffer is copied *by value* from the student.
            - ``"update"``: eval mode; floating buffers are averaged with the
              same momentum as the weights, integer buffers copied.
            - ``"ema_train"``: the EMA model is put back in train mode at the
              start of every training iteration and its buffers are left to
              its own forward passes: the mode for a mean-teacher teacher.

    Keyword Args:
        half_life: instead of ``momentum``, the iterations after which the
            student's contribution has halved: a number, ``"500it"``,
            ``"2ep"`` (epochs) or ``"0.05dur"`` (fraction of the run). An
            update ``delta`` iterations after the previous one uses
            ``1 - 0.5 ** (delta / half_life)``, so ``every=k`` keeps it.
        mean_teacher_warmup: ``max(m, 1 / (n + 1))`` at the ``n``-th averaging
            update (Tarvainen & Valpola): ``power_warmup=(1, 1)``.
        power_warmup: ``(gamma, power)``: ``max(m, (1 + n / gamma) ** -power)``
            at the ``n``-th averaging update, timm's and diffusers' warm-up.
        start_iteration: updates up to and including this iteration copy the
            student; averaging (and any warm-up) starts after it. A number of
            iterations, or in the units of ``half_life`` (``"2ep"``,
            ``"0.1dur"``), resolved when a run starts, whole iterations.
        exclude: tensor names or ``fnmatch`` patterns copied from the student
            at every update instead of averaged (see :class:`~ignite_ema.ModelEMA`).
        ema_model: an EMA module built by the caller (see
            :class:`~ignite_ema.ModelEMA`); by default a deep copy of ``model``.
        device: keep the EMA model on this device (the student's by default).
        shadow_dtype: dtype of the floating averages; by default float32 for
            bf16/fp16 tensors, the tensor's own dtype otherwise.
        sync_buffers: ``None`` or ``"update"``: after every update, set the EMA
            model's floating buffers to their mean over the ranks of
            ``torch.distributed`` (each rank's statistics come from its own
            batches). A no-op on one process.
        skip_nonfinite: skip an update when a student tensor it reads has NaN
            or Inf (counted, warned about once, agreed across ranks); the
            next update's ``delta`` spans the skipped one.
        asynchronous: average beside the next iteration's forward and backward
            passes instead of in the event (see :class:`~ignite_ema.ModelEMA`);
            the optimiser's step, an evaluator's or a teacher's forward pass,
            the swap and the state wait for it. Bit-identical results.

    Attributes:
        ema_model: the averaged model (``requires_grad`` off).
        model: the student, unwrapped.
        momentum: the per-update momentum (with ``half_life``, the momentum of
            a one-iteration update, known once the run starts).
        handle_buffers: the buffer mode.

    Example:

        >>> import torch
        >>> from ignite.engine import Engine, Events
        >>> from ignite_ema import EMAHandler
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> def step(engine, batch):
        ...     with torch.no_grad():
        ...         model.weight.add_(1.0)   # stands for an optimiser step
        >>> trainer = Engine(step)
        >>> ema = EMAHandler(model, momentum=0.5)
        >>> ema.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
        >>> _ = trainer.run(range(4), max_epochs=1)
        >>> ema.ema_model.weight          # 1 -> 1.5 -> 2.25 -> 3.125 -> 4.0625
        Parameter containing:
        tensor([[4.0625, 4.0625]])
        >>> trainer.state.ema_momentum
        0.5

        A half-life that does not depend on how often the EMA is updated:

        >>> ema = EMAHandler(model, half_life="0.1dur", handle_buffers="ema_train")
        >>> trainer = Engine(step)
        >>> ema.attach(trainer, event=Events.ITERATION_COMPLETED(every=4))
        >>> _ = trainer.run(range(100), max_epochs=2)
        >>> round(trainer.state.ema_momentum, 6)   # 1 - 0.5 ** (4 / 20)
        0.129449
    """

    _state_dict_all_req_keys = (*STATE_KEYS, *_COUNTERS)

    def __init__(
        self,
        model: nn.Module,
        momentum: float = _MOMENTUM_DEFAULT,
        momentum_warmup: float | None = None,
        warmup_iters: int | None = None,
        handle_buffers: str = "copy",
        *,
        half_life: float | str | None = None,
        mean_teacher_warmup: bool = False,
        power_warmup: tuple[float, float] | None = None,
        start_iteration: int | str = 0,
        exclude: str | Sequence[str] = (),
        ema_model: nn.Module | None = None,
        device: torch.device | str | None = None,
        shadow_dtype: torch.dtype | None = None,
        sync_buffers: str | None = None,
        skip_nonfinite: bool = False,
        asynchronous: bool = False,
    ) -> None:
        # Ignite's default momentum applies when neither momentum nor half_life is given (and is not warned about);
        # a momentum passed on purpose is checked like any other.
        given: float | None = momentum
        if isinstance(momentum, _Default):
            given = None if half_life is not None else float(momentum)
        self._schedule_args: dict[str, Any] = {
            "momentum": given,
            "half_life": half_life,
            "momentum_warmup": momentum_warmup,
            "warmup_iters": warmup_iters,
            "mean_teacher_warmup": mean_teacher_warmup,
            "power_warmup": power_warmup,
            "start_iteration": start_iteration,
        }
        # Every argument checked now, at the caller: a half-life in epochs or in fractions of the run is resolved
        # against a stand-in run here, against the engine's when a run starts.
        schedule = MomentumSchedule.of(**self._schedule_args, run=(1, 1))
        assert schedule is not None  # a momentum or a half-life, always
        if sync_buffers not in SYNC_BUFFERS_MODES:
            raise ValueError(
                f"sync_buffers can only be None or 'update' (average the EMA model's floating buffers over the "
                f"ranks after every update); found {sync_buffers!r}"
            )
        self._skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)

        self._ema = ModelEMA(
            model,
            handle_buffers,
            exclude=exclude,
            ema_model=ema_model,
            device=device,
            shadow_dtype=shadow_dtype,
            asynchronous=asynchronous,
        )
        # The module itself, for what the handler does to it (its mode, a probe) without waiting for an update in
        # flight the way a reader of ema_model does.
        self._ema_module = self._ema.ema_model if self._ema.has_ema_model else None
        self.model = self._ema.model
        self.handle_buffers = handle_buffers
        self.momentum: float | None = schedule.momentum
        # A momentum without warm-ups or a start phase is known before any update: attach() publishes it, as Ignite's.
        self._constant = schedule.momentum is not None and schedule == MomentumSchedule(momentum=schedule.momentum)
        self._sync_buffers = sync_buffers

        self._num_skipped = 0
        self._clock = EngineClock()  # the iterations of the schedule: the engine's, going on across runs
        self._engine: Engine | None = None
        self._probe: _ForwardProbe | None = None
        self._probe_handle: RemovableHandle | None = None
        self._warned: set[str] = set()
        self._swap_stack = ExitStack()

    @property
    def ema_model(self) -> nn.Module:
        """The averaged model; see :attr:`ignite_ema.ModelEMA.ema_model` (a sharded student may have none)."""
        return self._ema.ema_model

    def wait(self) -> None:
        """Return when the update in flight (``asynchronous=True``) is over; see :meth:`ignite_ema.ModelEMA.wait`."""
        self._ema.wait()

    @property
    def has_ema_model(self) -> bool:
        """Whether :attr:`ema_model` is a module: ``False`` only for a sharded student built without ``ema_model=``."""
        return self._ema.has_ema_model

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps (``torch.save(handler)``, as with Ignite's handler): all but the engine it is attached
        to and this run's hooks. An unpickled handler is attached anew, to its engine or another."""
        if self._ema.is_swapped:
            raise RuntimeError("an EMAHandler cannot be pickled while it is swapped into the student")
        state = self.__dict__.copy()
        state.update(_engine=None, _probe=None, _probe_handle=None, _swap_stack=ExitStack())
        return state

    # ------------------------------------------------------------------ attach

    def attach(
        self,
        engine: Engine,
        name: str = "ema_momentum",
        warn_if_exists: bool = True,
        event: str | Events | CallableEventWithFilter | EventsList = Events.ITERATION_COMPLETED,
    ) -> None:
        """Update the EMA model on ``event`` of ``engine`` and publish the momentum as ``engine.state.<name>``.

        Args:
            engine: the trainer. A handler belongs to one engine: its counters
                are that engine's iterations.
            name: attribute of ``engine.state`` that receives each update's
                momentum (before the first update: the momentum if it is
                constant, as Ignite publishes it, else 0.0, nothing applied);
                give each handler on one engine its own name.
            warn_if_exists: warn if ``engine.state`` already has ``name``.
            event: when to update, e.g. ``Events.ITERATION_COMPLETED(every=4)``.
                Warm-ups and half-life count iterations, not updates.
        """
        self._engine = attach_update("EMAHandler", engine, self._engine, self._update, name, warn_if_exists, event)
        setattr(engine.state, name, self.momentum if self._constant else None)
        if self._skip_nonfinite:
            setattr(engine.state, f"{name}_skipped", self._num_skipped)
        engine.add_event_handler(Events.STARTED, self._on_started, name)
        engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._remove_probe)

    def _on_started(self, engine: Engine, name: str) -> None:
        self._remove_probe()  # one left by a step that raised
        self._ema.rebind()
        self._ema.check_outside_writes()
        run = (engine.state.epoch_length, engine.state.max_epochs)
        schedule = MomentumSchedule.of(**self._schedule_args, run=run, warn=False)  # warned at construction
        assert schedule is not None
        self._ema.schedule = schedule
        if schedule.half_life is not None:
            self.momentum = momentum_from_half_life(schedule.half_life, 1)
        if self._skip_nonfinite:  # after load_state_dict, the restored count
            setattr(engine.state, f"{name}_skipped", self._num_skipped)
        if getattr(engine.state, name, None) is None:
            # Before the first update the student has had no weight: 0.0, a number loggers (TensorboardLogger) can
            # log from the first iteration on, and not a momentum that will not be applied (with every=k, the first
            # update's depends on k).
            setattr(engine.state, name, 0.0)
        if self._clock.start_run(engine, self._ema.last_step):
            self._ema.last_step = self._clock.now(engine)  # delta counted from where the run resumed
            consequence = "the EMA goes on from the EMA model as it is, its warm-up and half-life counted from here"
            self._warn_once("not_restored", resumed_without_state("EMAHandler", engine, consequence, "ema"))

    # ------------------------------------------------------------------ per iteration

    def _on_iteration_started(self, engine: Engine) -> None:
        ema_model = self._ema_module
        if ema_model is None:  # a sharded student's EMA without a module
            return
        self._set_ema_mode(ema_model)
        if self._watching_forwards() and self._probe_handle is None:
            self._probe = self._probe or _ForwardProbe(engine)
            self._probe_handle = ema_model.register_forward_hook(self._probe)

    def _set_ema_mode(self, ema_model: nn.Module) -> None:
        """Train mode in "ema_train", eval mode otherwise: an evaluator's ``eval()`` does not stick."""
        want_train = self.handle_buffers == "ema_train"
        if ema_model.training != want_train:
            ema_model.train(want_train)

    def _watching_forwards(self) -> bool:
        """Whether a teacher warning may still be due: the EMA model has statistics and it was not given yet."""
        key = "no_forward" if self.handle_buffers == "ema_train" else "teacher"
        return self._ema.has_statistics and key not in self._warned

    def _remove_probe(self) -> None:
        """Take the hook off after each step, so that ``ema_model`` stays a plain module (picklable, scriptable)."""
        if self._probe_handle is not None:
            self._probe_handle.remove()
            self._probe_handle = None

    def _update(self, engine: Engine, name: str) -> None:
        iteration = self._clock.now(engine)
        if self._skip_nonfinite and (nonfinite := self._ema.nonfinite_student()) is not None:
            self._num_skipped += 1
            setattr(engine.state, f"{name}_skipped", self._num_skipped)
            self._warn_once(
                "nonfinite",
                f"iteration {engine.state.iteration}: {nonfinite} has NaN or Inf values, so this EMA update was "
                "skipped and the EMA model left as it was (skip_nonfinite=True). Skipped updates are counted in "
                f"engine.state.{name}_skipped; this warning is not repeated. Look for the cause in the student "
                "(learning rate, loss scaling, data).",
            )
            self._check_teacher()
            return
        momentum = self._ema.update(step=iteration)
        setattr(engine.state, name, momentum)
        if self._sync_buffers == "update":
            self._ema.average_buffers_across_ranks()
        self._check_teacher()

    def _check_teacher(self) -> None:
        probe = self._probe
        if probe is None:
            return
        ran, probe.ran = probe.ran, False
        if ran and self.handle_buffers != "ema_train":
            self._warn_once(
                "teacher",
                f"the EMA model ran forward passes during training iterations (a mean-teacher teacher?) in "
                f"handle_buffers={self.handle_buffers!r} mode: it runs in eval mode on BatchNorm statistics "
                f"{'copied from' if self.handle_buffers == 'copy' else 'averaged from'} the student, which belong "
                "to other weights. Use handle_buffers='ema_train' so the teacher keeps statistics of its own.",
            )
        elif not ran and self.handle_buffers == "ema_train":
            self._warn_once(
                "no_forward",
                "handle_buffers='ema_train' leaves the EMA model's buffers to its own forward passes, but it ran "
                "none during training iterations since the last update, so its BatchNorm statistics do not move. "
                "Run the EMA model (the teacher) inside the training step, or use handle_buffers='copy' or "
                "'update', or re-estimate its statistics before evaluating.",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_at_caller(message)

    # ------------------------------------------------------------------ EMA weights in the student

    def swapped(self) -> AbstractContextManager[None]:
        """``with handler.swapped():`` the student module holds the EMA's weights and buffers; see
        :meth:`ignite_ema.ModelEMA.swapped`."""
        return self._ema.swapped()

    def swap_during(self, evaluator: Engine) -> None:
        """Give the student the EMA's weights while ``evaluator`` runs: from its ``STARTED`` to its ``COMPLETED``.

        The student is restored when the evaluator completes, terminates, is
        interrupted or raises (the exception then goes on as it would have).
        For a wrapped, compiled or sharded student, evaluate the student
        module itself: its wrappers and compiled graphs see the EMA weights.

        Args:
            evaluator: the engine that evaluates the student.
        """
        if not isinstance(evaluator, Engine):
            raise TypeError(f"swap_during expects an ignite Engine; found {type(evaluator).__name__}")

        def enter() -> None:
            if not self._ema.is_swapped:
                self._swap_stack.enter_context(self._ema.swapped())

        def leave_and_reraise(engine: Engine, error: BaseException) -> None:
            self._swap_stack.close()
            # With no other EXCEPTION_RAISED handler, Ignite would have raised: this one must not swallow it.
            if len(engine._event_handlers[Events.EXCEPTION_RAISED]) == 1:
                raise error

        evaluator.add_event_handler(Events.STARTED, enter)
        evaluator.add_event_handler(Events.ITERATION_STARTED, enter)  # again after a resumed interrupt
        evaluator.add_event_handler(Events.COMPLETED | Events.TERMINATE | Events.INTERRUPT, self._swap_stack.close)
        evaluator.add_event_handler(Events.EXCEPTION_RAISED, leave_and_reraise)

    def average_buffers_across_ranks(self) -> None:
        """Set the EMA model's floating buffers to their mean over the ranks, now.

        What ``sync_buffers="update"`` does after every update, for those who
        would rather pay it only where the statistics are read (before an
        evaluation or a checkpoint): a collective, so call it on every rank at
        the same point. A no-op on one process.
        """
        self._ema.average_buffers_across_ranks()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything the next update depends on: the EMA's tensors (float32 shadows included) and the counters.

        Tensors are references, as in ``nn.Module.state_dict``; a sharded
        student's are whole, on the CPU, on rank 0 only (see
        :meth:`ignite_ema.ModelEMA.state_dict`).
        """
        return {**self._ema.state_dict(), **self._counters()}

    def sharded_state_dict(self, *, copy: bool = False) -> dict[str, Any]:
        """:meth:`state_dict` with a sharded student's tensors as DTensors of this rank's shards, for
        ``torch.distributed.checkpoint``; ``copy=True`` for a state that ``dcp.load`` fills (see
        :meth:`ignite_ema.ModelEMA.sharded_state_dict`)."""
        return {**self._counters(), **self._ema.sharded_state_dict(copy=copy)}

    def _counters(self) -> dict[str, int]:
        return {"num_skipped": self._num_skipped, "iteration_offset": self._clock.offset}

    def model_state_dict(self) -> dict[str, Any]:
        """The EMA's weights as a state dict of the model (whole tensors): see
        :meth:`ignite_ema.ModelEMA.model_state_dict`."""
        return self._ema.model_state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` or :meth:`sharded_state_dict`. Raises naming what does not fit, before anything
        changes."""
        super().load_state_dict(state_dict)  # a mapping with every key
        check_keys(state_dict, self._state_dict_all_req_keys, "the EMAHandler state")
        for key in _COUNTERS:
            value = state_dict[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EMAHandler state '{key}' must be a non-negative int; found {value!r}")
        self._ema.load_state_dict({k: state_dict[k] for k in STATE_KEYS})  # checks everything before it copies
        self._num_skipped = state_dict["num_skipped"]
        self._clock.offset = state_dict["iteration_offset"]
        self._clock.restored = True
