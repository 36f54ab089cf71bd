"""EMAHandler: the Ignite glue around :mod:`ignite_ema.averaging` and :mod:`ignite_ema.schedules`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList
from torch import Tensor, nn

from ignite_ema.averaging import ShadowAverager, shadow_dtype_for
from ignite_ema.schedules import HalfLife, MomentumSchedule, momentum_from_half_life

__all__ = ["EMAHandler"]

BUFFER_MODES = ("copy", "update", "ema_train")
SYNC_BUFFERS_MODES = (None, "update")


class _Default(float):
    """Ignite's default momentum, distinguishable from the same number passed on purpose."""


_MOMENTUM_DEFAULT = _Default(0.0002)
_COUNTER_KEYS = ("num_updates", "num_averaged", "last_update_iteration", "num_skipped")
_STATE_KEYS = ("handle_buffers", "tensors", *_COUNTER_KEYS)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DataParallel, DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner  # torch.compile's OptimizedModule
        else:
            return model


def named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters then buffers, by name, each shared tensor once (tied weights are averaged once)."""
    tensors: dict[str, Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


class _RankAverage:
    """Average fixed tensors over the ranks of ``ignite.distributed``: one all-reduce per (device, dtype).

    The tensors are packed into a flat buffer allocated once, here, so a sync
    is one copy in, one collective, one division and one copy out per group,
    whatever the number of tensors. Every rank ends with the same bits: the
    all-reduced sum is the same on every rank, and so is its division.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for tensor in tensors:
            buckets.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
        self._groups: list[tuple[list[Tensor], Tensor, list[Tensor]]] = []
        for (device, dtype), members in buckets.items():
            flat = torch.empty(sum(t.numel() for t in members), device=device, dtype=dtype)
            views = [
                v.view_as(t) for v, t in zip(torch.split(flat, [t.numel() for t in members]), members, strict=True)
            ]
            self._groups.append((members, flat, views))

    @torch.no_grad()
    def __call__(self, world_size: int) -> None:
        for members, flat, views in self._groups:
            torch._foreach_copy_(views, members)
            reduced = idist.all_reduce(flat, op="SUM")
            if isinstance(reduced, Tensor) and reduced is not flat:
                flat.copy_(reduced)  # horovod and XLA return a new tensor; torch.distributed reduces in place
            flat.div_(world_size)
            torch._foreach_copy_(members, views)


class EMAHandler:
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
              its own forward passes. This is the mode for a mean-teacher
              teacher: its statistics then belong to its own weights.

    Keyword Args:
        half_life: instead of ``momentum``, the number of iterations after
            which the student's contribution has halved: a number of
            iterations or a string ``"500it"``, ``"2ep"`` (epochs of the
            attached engine), ``"0.05dur"`` (fraction of the run). Each update
            uses ``1 - 0.5 ** (delta / half_life)``, ``delta`` being the
            iterations since the previous update, so attaching with
            ``every=k`` keeps the same time constant.
        mean_teacher_warmup: use ``max(m, 1 / (n + 1))`` at the ``n``-th
            update (Tarvainen & Valpola): the EMA is the plain average of
            the students seen until that weight falls below ``m``.
        start_iteration: updates at iterations up to and including this one
            copy the student; averaging (and any warm-up) starts after it.
        device: keep the EMA model on this device (the student's by default).
        shadow_dtype: dtype in which floating averages are kept. By default
            float32 for bf16/fp16 tensors and the tensor's own dtype
            otherwise: a bf16 average with momentum 2e-4 does not move at
            all. The float32 shadow costs 4 bytes per averaged element on top
            of the EMA model, which stays in the student's dtype.
        sync_buffers: ``None`` (default) or ``"update"``. In a distributed run
            (``torch.distributed`` through ``ignite.distributed``, world size
            above 1) the weights of a DDP student, and so the EMA weights, are
            the same on every rank, but the BatchNorm statistics are not: each
            rank's student (``"copy"``, ``"update"``) or teacher
            (``"ema_train"``) has seen its own batches, and a checkpoint keeps
            rank 0's. With ``"update"`` the EMA model's *floating* buffers
            (running means and variances) are all-reduced to their mean over
            the ranks after every update, so all ranks hold the same bits.
            Averaging ``running_var`` over ranks is the usual SyncBatchNorm-free
            approximation: it leaves out the spread of the means between
            ranks. Integer buffers (``num_batches_tracked``) are the same on
            every rank and are left alone. Why at every update rather than
            only where the statistics are read (evaluation, checkpoints): a
            BatchNorm running statistic is a linear recurrence in the batch
            statistics, so averaging at every update or once before the read
            gives the same numbers up to rounding, and the update event is the
            one point where every rank is sure to call the collective. A sync
            hidden in ``state_dict()`` would work under Ignite's Checkpoint,
            which calls it on every rank, but hang a hand-written
            ``if rank == 0: torch.save(ema.state_dict())``. The price is one
            all-reduce per update: with 2 gloo processes on a CPU, a CRNN
            with 226 BatchNorm statistics took about 1 ms per all-reduce
            against 20 us for the EMA update itself and 33 ms for a DDP
            training step (about 3% of the step). To pay it only where it
            matters, leave this ``None`` and call
            :meth:`average_buffers_across_ranks` on every rank before
            evaluating or checkpointing. A no-op without ``torch.distributed``
            or with one process.
        skip_nonfinite: skip an update when the student has NaN or Inf in any
            floating tensor the update reads (the averaged tensors, and the
            copied floating buffers in ``"copy"`` mode). A skipped update
            leaves the EMA model and its shadows exactly as they were and is
            not counted as an update: every counter the next update depends on
            stays as it was, so the next update's ``delta`` spans the skipped
            one. With ``half_life`` the next student then gets the weight of
            the whole time since the last good update (the average forgets at
            the same rate per iteration); with a fixed ``momentum`` the skipped
            update is simply lost; the mean-teacher ramp does not advance; the
            linear warm-up counts iterations and goes on. ``engine.state.<name>``
            keeps the last applied momentum. Skips are counted in
            ``state_dict()["num_skipped"]`` and published as
            ``engine.state.<name>_skipped`` (``ema_momentum_skipped`` under
            the default name); the first one is warned about, naming the
            tensor. With world size above 1 the ranks agree on skipping (one
            all-reduce of one number), so the EMA stays the same on every rank.
            The check is one multi-tensor 2-norm per dtype group (an exact
            per-tensor check runs only when that norm is not finite) and one
            host synchronisation per update, which on a GPU waits for the step
            to finish. On a CPU, one thread, it took an update from 23 to 84 us
            on a 56k-parameter CRNN and from 1.9 to 3.3 ms on a 10.5M-parameter
            model. Without this option a non-finite student enters the
            average and never leaves it: ``(1 - m) * NaN`` is NaN, so every
            later update keeps it (the way back is a checkpoint taken before
            the NaN).

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
        start_iteration: int = 0,
        device: torch.device | str | None = None,
        shadow_dtype: torch.dtype | None = None,
        sync_buffers: str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model should be an instance of nn.Module or its subclasses, but got {type(model).__name__}"
            )
        if handle_buffers not in BUFFER_MODES:
            raise ValueError(
                f"handle_buffers can only be one of 'copy', 'update', 'ema_train', but got {handle_buffers!r}"
            )
        momentum_given = not isinstance(momentum, _Default)
        self._half_life = None if half_life is None else HalfLife.parse(half_life)
        if self._half_life is not None and momentum_given:
            raise ValueError(
                f"give either momentum ({momentum}) or half_life ({half_life!r}), not both: each sets how fast "
                "the average forgets"
            )
        _check_fraction("momentum", momentum, low_open=True, high_open=True)
        if (momentum_warmup is None) != (warmup_iters is None):
            raise ValueError(
                "the linear warm-up needs both momentum_warmup and warmup_iters; found "
                f"momentum_warmup={momentum_warmup}, warmup_iters={warmup_iters}"
            )
        if momentum_warmup is not None:
            _check_fraction("momentum_warmup", momentum_warmup, low_open=False, high_open=False)
            _check_count("warmup_iters", warmup_iters, minimum=1)
            if mean_teacher_warmup:
                raise ValueError("choose one warm-up: the linear one (momentum_warmup) or mean_teacher_warmup")
        _check_count("start_iteration", start_iteration, minimum=0)
        if shadow_dtype is not None and not (isinstance(shadow_dtype, torch.dtype) and shadow_dtype.is_floating_point):
            raise TypeError(f"shadow_dtype must be a floating torch.dtype or None; found {shadow_dtype!r}")
        if sync_buffers not in SYNC_BUFFERS_MODES:
            raise ValueError(
                f"sync_buffers can only be None or 'update' (average the EMA model's floating buffers over the "
                f"ranks after every update); found {sync_buffers!r}"
            )
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(
                f"skip_nonfinite must be True or False; found {type(skip_nonfinite).__name__} {skip_nonfinite!r}"
            )

        self.model = unwrap_model(model)
        self.handle_buffers = handle_buffers
        self.momentum: float | None = None if self._half_life is not None else float(momentum)
        self._momentum_warmup = momentum_warmup
        self._warmup_iters = warmup_iters
        self._mean_teacher_warmup = mean_teacher_warmup
        self._start_iteration = start_iteration
        self._sync_buffers = sync_buffers
        self._skip_nonfinite = skip_nonfinite
        self._schedule = self._make_schedule(None)

        self.ema_model = deepcopy(self.model)
        if device is not None:
            self.ema_model.to(device)
        for param in self.ema_model.parameters():
            param.detach_()
            param.requires_grad_(False)
        self.ema_model.train(handle_buffers == "ema_train")

        ema_tensors = named_tensors(self.ema_model)
        param_names = {name for name, _ in self.ema_model.named_parameters()}
        self._shapes = {name: t.shape for name, t in ema_tensors.items()}
        averaged: list[str] = []
        copied: list[str] = []
        for name, tensor in ema_tensors.items():
            is_param = name in param_names
            if is_param or handle_buffers != "ema_train":
                floating = tensor.is_floating_point() or tensor.is_complex()
                average = floating and (is_param or handle_buffers == "update")
                (averaged if average else copied).append(name)
        self._averaged_names, self._copied_names = averaged, copied
        self._has_statistics = any(t.is_floating_point() for n, t in ema_tensors.items() if n not in param_names)

        student = named_tensors(self.model)
        self._averager = ShadowAverager(
            [ema_tensors[n] for n in averaged],
            [student[n] for n in averaged],
            [shadow_dtype or shadow_dtype_for(ema_tensors[n].dtype) for n in averaged],
        )
        # Copies are plain averages kept in the target's own dtype.
        self._copier = ShadowAverager(
            [ema_tensors[n] for n in copied],
            [student[n] for n in copied],
            [ema_tensors[n].dtype for n in copied],
        )
        # What a rank average acts on: a floating buffer's shadow when it is averaged (the next update reads the
        # shadow), the EMA model's own buffer otherwise.
        state_of = dict(zip(averaged, self._averager.shadows, strict=True))
        self._rank_average = _RankAverage(
            [
                state_of.get(name, tensor)
                for name, tensor in ema_tensors.items()
                if name not in param_names and tensor.is_floating_point()
            ]
        )

        self._num_updates = 0
        self._num_averaged = 0
        self._last_update_iteration = 0
        self._num_skipped = 0
        self._world_size = 1
        self._trainer: Engine | None = None
        self._ran_in_iteration = False
        self._warned: set[str] = set()
        self.ema_model.register_forward_hook(self._on_ema_forward)

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
            engine: the trainer.
            name: attribute of ``engine.state`` that receives each update's
                momentum; give each handler on one engine its own name.
            warn_if_exists: warn if ``engine.state`` already has ``name``
                (after a resume that is expected; otherwise two handlers
                share a name).
            event: when to update, e.g. ``Events.ITERATION_COMPLETED(every=4)``.
                Warm-up and half-life count iterations, not updates, so a
                filter does not change them.
        """
        if not isinstance(engine, Engine):
            raise TypeError(f"attach expects an ignite Engine; found {type(engine).__name__}")
        if hasattr(engine.state, name):
            if warn_if_exists:
                warnings.warn(
                    f"Attribute '{name}' already exists in Engine.state. It might be because 1. the engine has "
                    f"loaded its state dict or 2. {name} is already created by another handler. Turn off this "
                    "warning by setting warn_if_exists to False.",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            setattr(engine.state, name, self.momentum)
        if self._skip_nonfinite:
            setattr(engine.state, f"{name}_skipped", self._num_skipped)
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self._on_started, name)
        engine.add_event_handler(Events.ITERATION_STARTED, self._assert_mode)
        engine.add_event_handler(event, self._update, name)

    def _on_started(self, engine: Engine, name: str) -> None:
        self._bind_student()
        self._schedule = self._make_schedule(engine)
        if self.momentum is None and self._schedule.half_life is not None:
            self.momentum = momentum_from_half_life(self._schedule.half_life, 1)
            setattr(engine.state, name, self.momentum)
        # A new run of the same engine restarts its iteration count.
        self._last_update_iteration = min(self._last_update_iteration, engine.state.iteration)
        if self._skip_nonfinite:  # after load_state_dict, the restored count
            setattr(engine.state, f"{name}_skipped", self._num_skipped)
        if self._skip_nonfinite or self._sync_buffers is not None:
            self._world_size = idist.get_world_size()

    def _make_schedule(self, engine: Engine | None) -> MomentumSchedule:
        half_life = None
        if self._half_life is not None and engine is not None:
            half_life = self._half_life.in_iterations(engine.state.epoch_length, engine.state.max_epochs)
        elif self._half_life is not None and self._half_life.unit == "it":
            half_life = self._half_life.value
        return MomentumSchedule(
            momentum=self.momentum,
            half_life=half_life,
            momentum_warmup=self._momentum_warmup,
            warmup_iters=self._warmup_iters,
            mean_teacher=self._mean_teacher_warmup,
            start_iteration=self._start_iteration,
        )

    def _bind_student(self) -> None:
        """Look the student's tensors up by name again and check they still match the EMA model."""
        student = named_tensors(self.model)
        _check_same_tensors(
            self._shapes,
            {n: t.shape for n, t in student.items()},
            "the student",
            hint="was the model changed after the EMAHandler was built? Build the handler from the final model",
        )
        self._check_ema_model_in_place()
        self._averager.bind([student[n] for n in self._averaged_names])
        self._copier.bind([student[n] for n in self._copied_names])

    def _check_ema_model_in_place(self) -> None:
        """The averages are written into the EMA model's tensors as they were at construction; moving or
        converting the EMA model afterwards (``.to()``, ``.double()``) gives it new storage the handler
        would silently stop updating."""
        ema = named_tensors(self.ema_model)
        names = self._averaged_names + self._copied_names
        targets = self._averager.targets + self._copier.targets
        for name, target in zip(names, targets, strict=True):
            current = ema[name]
            if current.data_ptr() != target.data_ptr() or current.dtype != target.dtype:
                raise ValueError(
                    f"the EMA model's tensor '{name}' was replaced after the EMAHandler was built (moved or "
                    f"converted: now {current.dtype} on {current.device}, was {target.dtype} on {target.device}), "
                    "so the handler can no longer update it. Build the handler with device= (and move the student "
                    "before building it) instead of moving ema_model"
                )

    # ------------------------------------------------------------ per update

    def _assert_mode(self) -> None:
        want_train = self.handle_buffers == "ema_train"
        if self.ema_model.training != want_train:
            self.ema_model.train(want_train)

    def _on_ema_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.last_event_name == Events.ITERATION_STARTED:
            self._ran_in_iteration = True

    def _update(self, engine: Engine, name: str) -> None:
        iteration = engine.state.iteration
        if self._skip_nonfinite and (nonfinite := self._nonfinite_student()) is not None:
            self._num_skipped += 1
            setattr(engine.state, f"{name}_skipped", self._num_skipped)
            self._warn_once(
                "nonfinite",
                f"iteration {iteration}: {nonfinite} has NaN or Inf values, so this EMA update was "
                "skipped and the EMA model left as it was (skip_nonfinite=True). Skipped updates are counted in "
                f"engine.state.{name}_skipped; this warning is not repeated. Look for the cause in the student "
                "(learning rate, loss scaling, data).",
            )
            self._check_teacher()
            return
        momentum = self._schedule(iteration, self._last_update_iteration, self._num_averaged)
        if iteration <= self._start_iteration:
            self._averager.copy()
        else:
            self._averager.update(momentum)
            self._num_averaged += 1
        if self._copied_names:
            self._copier.copy()
        self._num_updates += 1
        self._last_update_iteration = iteration
        setattr(engine.state, name, momentum)
        if self._sync_buffers == "update" and self._world_size > 1:
            self._average_buffers(self._world_size)
        self._check_teacher()

    def _nonfinite_student(self) -> str | None:
        """``None`` when every floating student tensor the update reads is finite on every rank; else what to
        name in the warning. One host sync (and one all-reduce of one number across ranks); the exact scan,
        one tensor at a time, runs only when a norm is not finite."""
        flags = [f for f in (self._averager.students_finite(), self._copier.students_finite()) if f is not None]
        if not flags:
            return None
        both = flags[0] if len(flags) == 1 else flags[0] & flags[1].to(flags[0].device)
        name = None
        if not bool(both):  # the one host synchronisation
            name = self._first_nonfinite()  # None when a norm merely overflowed
        if self._world_size > 1:
            # Ranks whose students differ (BatchNorm statistics) must still skip together, or their EMAs part.
            nonfinite_ranks = idist.all_reduce(0.0 if name is None else 1.0, op="SUM")
            if name is None and float(nonfinite_ranks) > 0.0:
                return "a student tensor on another rank"
        return None if name is None else f"the student's tensor '{name}'"

    def _first_nonfinite(self) -> str | None:
        """The name of the first student tensor the update reads that has a NaN or an Inf."""
        for names, averager in ((self._averaged_names, self._averager), (self._copied_names, self._copier)):
            index = averager.first_nonfinite_student()
            if index is not None:
                return names[index]
        return None

    def average_buffers_across_ranks(self) -> None:
        """Set the EMA model's floating buffers to their mean over the ranks, now.

        What ``sync_buffers="update"`` does after every update, for those who
        would rather pay it only where the statistics are read, before an
        evaluation or a checkpoint: BatchNorm running statistics are linear in
        the batch statistics, so one average at the end equals an average at
        every update, up to rounding. It is a collective: call it on every
        rank at the same point, for instance from a handler on the trainer's
        ``EPOCH_COMPLETED`` added before the evaluator's and the checkpoint's.
        Integer buffers are left alone. A no-op without ``torch.distributed``
        or with one process.
        """
        world_size = idist.get_world_size()
        if world_size > 1:
            self._average_buffers(world_size)

    def _average_buffers(self, world_size: int) -> None:
        self._rank_average(world_size)
        self._averager.sync_targets()  # averaged buffers with a separate (float32) shadow

    def _check_teacher(self) -> None:
        ran, self._ran_in_iteration = self._ran_in_iteration, False
        if not self._has_statistics:
            return
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
            warnings.warn(message, UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything the next update depends on: the averages and the counters.

        Floating averages are returned in their shadow dtype (float32 for a
        bf16/fp16 student), so a resumed run continues bit for bit. Tensors are
        references, as in ``nn.Module.state_dict``.
        """
        tensors = {name: t.detach() for name, t in named_tensors(self.ema_model).items()}
        for name, shadow in zip(self._averaged_names, self._averager.shadows, strict=True):
            tensors[name] = shadow.detach()
        return {
            "handle_buffers": self.handle_buffers,
            "tensors": tensors,
            "num_updates": self._num_updates,
            "num_averaged": self._num_averaged,
            "last_update_iteration": self._last_update_iteration,
            "num_skipped": self._num_skipped,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises ``ValueError`` naming what differs, before changing anything."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"expected a mapping from EMAHandler.state_dict(); found {type(state_dict).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"EMAHandler state is missing {missing}; expected keys {list(_STATE_KEYS)}")
        if state_dict["handle_buffers"] != self.handle_buffers:
            raise ValueError(
                f"the state was saved with handle_buffers={state_dict['handle_buffers']!r}, "
                f"this handler uses {self.handle_buffers!r}"
            )
        saved = state_dict["tensors"]
        current = self.state_dict()["tensors"]
        if not isinstance(saved, Mapping) or not all(isinstance(t, Tensor) for t in saved.values()):
            raise ValueError("EMAHandler state 'tensors' must map names to tensors")
        _check_same_tensors(
            {n: t.shape for n, t in current.items()},
            {n: t.shape for n, t in saved.items()},
            "the saved state",
            hint="was it saved from another model? Load a state saved by a handler of the same model",
        )
        for name, tensor in saved.items():
            if tensor.dtype != current[name].dtype:
                raise ValueError(
                    f"saved tensor '{name}' is {tensor.dtype}, the handler keeps it as {current[name].dtype}"
                )
        counters = {k: state_dict[k] for k in _COUNTER_KEYS}
        for key, value in counters.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EMAHandler state '{key}' must be a non-negative int; found {value!r}")

        with torch.no_grad():
            for name, tensor in saved.items():
                current[name].copy_(tensor)
            self._averager.sync_targets()
        self._num_updates = counters["num_updates"]
        self._num_averaged = counters["num_averaged"]
        self._last_update_iteration = counters["last_update_iteration"]
        self._num_skipped = counters["num_skipped"]


def _check_same_tensors(
    expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size], what: str, *, hint: str
) -> None:
    """Raise ValueError naming the first tensor missing, extra or of another shape, with ``hint``: what to do."""
    for name, shape in expected.items():
        if name not in found:
            raise ValueError(f"{what} has no tensor '{name}' (shape {tuple(shape)}), which the EMA model has: {hint}")
        if found[name] != shape:
            raise ValueError(
                f"tensor '{name}' has shape {tuple(found[name])} in {what}, {tuple(shape)} in the EMA model: {hint}"
            )
    for name, shape in found.items():
        if name not in expected:
            raise ValueError(f"{what} has a tensor '{name}' (shape {tuple(shape)}) that the EMA model lacks: {hint}")


def _check_fraction(name: str, value: object, *, low_open: bool, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; found {type(value).__name__} {value!r}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok and math.isfinite(value)):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"Invalid {name}: expected a value in {interval}, found {value}")


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; found {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; found {value}")
