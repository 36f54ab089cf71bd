"""ModelEMA: the exponential moving average of one model's tensors, without Ignite.

It owns what makes an EMA of a module: unwrapping wrappers, pairing tensors
by name, the buffer policy of the three modes, float32 shadows for
low-precision tensors, how fast it forgets (its schedule and the counters
the schedule reads), swapping the EMA into the student, and the state.

>>> import torch
>>> from ignite_ema import ModelEMA
>>> student = torch.nn.Linear(2, 1, bias=False)
>>> _ = torch.nn.init.zeros_(student.weight)
>>> ema = ModelEMA(student, momentum=0.25)  # or decay=0.75, or half_life=2.41 (iterations)
>>> with torch.no_grad():
...     _ = student.weight.fill_(1.0)     # stands for an optimiser step
>>> ema.update()                          # step 1: ema = 0.75 * ema + 0.25 * student
0.25
>>> ema.ema_model.weight
Parameter containing:
tensor([[0.2500, 0.2500]])
>>> with ema.swapped():                   # the student itself holds the EMA weights in here
...     student.weight
Parameter containing:
tensor([[0.2500, 0.2500]], requires_grad=True)
>>> student.weight                        # and its own ones again after
Parameter containing:
tensor([[1., 1.]], requires_grad=True)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ignite_ema._checks import (
    check_bool,
    check_device,
    check_keys,
    check_same_shapes,
    warn_at_caller,
    warn_if_decay,
)
from ignite_ema._watch import TensorWatch
from ignite_ema.averaging import (
    FiniteCheck,
    ShadowAverager,
    TensorCopier,
    ValueSwap,
    check_momentum,
    shadow_dtype_for,
)
from ignite_ema.background import Background, WaitBeforeForward, release_students
from ignite_ema.distributed import (
    RankAverage,
    ShardSpec,
    all_ranks,
    any_rank,
    fsdp_modules,
    is_sharded,
    local,
    rank,
    reshard,
    world_size,
)
from ignite_ema.modules import (
    check_caller_ema_model,
    check_initialised,
    copy_module,
    excluded_names,
    named_tensors,
    unwrap_model,
    wait_for_host_reads,
    with_index,
)
from ignite_ema.schedules import MomentumSchedule, momentum_from_half_life, next_step

__all__ = ["BUFFER_MODES", "STATE_KEYS", "ModelEMA"]

BUFFER_MODES = ("copy", "update", "ema_train")
# What an update does with a tensor: average it, copy it from the student, or leave it to the EMA model's own
# forward passes (buffers in "ema_train").
AVERAGED, COPIED, OWN = "averaged", "copied", "own"
#: The keys of :meth:`ModelEMA.state_dict`.
STATE_KEYS = ("handle_buffers", "tensors", "num_averaged", "last_update_iteration")


class ModelEMA:
    r"""The exponential moving average of a model's parameters and buffers.

    After :meth:`update` with momentum ``m``,
    :math:`\theta_{EMA} \leftarrow (1 - m)\,\theta_{EMA} + m\,\theta`
    for every averaged tensor; buffers follow ``handle_buffers``. The
    momentum of each update comes from the schedule (``momentum``, ``decay``
    or ``half_life``, warm-ups, a start phase) at the update's step, or from
    the caller (``update(0.01)``).

    Args:
        model: the student. ``DataParallel``, ``DistributedDataParallel`` and
            ``torch.compile`` wrappers are unwrapped; its lazy modules must be
            initialised.
        handle_buffers: ``"copy"`` (buffers copied by value at each update,
            the EMA model in eval mode), ``"update"`` (floating buffers
            averaged like the weights, integer ones copied; eval mode) or
            ``"ema_train"`` (buffers left to the EMA model's own forward
            passes; train mode: a mean-teacher teacher).

    Keyword Args:
        momentum: the weight of the student per update, in (0, 1) (Ignite's
            spelling).
        decay: ``1 - momentum``, the weight of the average (timm's and
            torch's spelling).
        half_life: instead, the steps after which the student's contribution
            has halved (a number or ``"500it"``); an update ``k`` steps after
            the previous one uses ``1 - 0.5 ** (k / half_life)``. Give at most
            one of the three; without any, :meth:`update` needs a momentum.
        momentum_warmup, warmup_iters: Ignite's linear warm-up, from
            ``momentum_warmup`` to the momentum over ``warmup_iters`` steps.
        mean_teacher_warmup: ``max(m, 1 / (n + 1))`` at the ``n``-th averaging
            update (Tarvainen & Valpola), ``power_warmup=(1, 1)``.
        power_warmup: ``(gamma, power)``: ``max(m, (1 + n / gamma) ** -power)``
            at the ``n``-th averaging update (timm's and diffusers' warm-up).
        start_iteration: updates at steps up to and including this one copy
            the student; averaging (and any warm-up) starts after it.
        exclude: tensor names or ``fnmatch`` patterns (``"head.*"``) whose EMA
            is not taken: copied from the student by value at every update (a
            head re-initialised during fine-tuning, say). A pattern that
            matches no tensor is an error.
        ema_model: an EMA module built by the caller, with the student's
            tensor names and shapes and the student's dtypes or wider floating
            ones, sharded like the student; the student's values are copied
            into it. A float32 EMA model of a bf16 student is its own (float32)
            average. By default, a deep copy of the student; for a sharded
            (FSDP2) student, which cannot be deep-copied, no module: the EMA
            holds its tensors only, read through :meth:`swapped` or
            :meth:`model_state_dict`.
        device: keep the deep copy on this device (the student's by default).
        shadow_dtype: dtype the floating averages are kept in; by default
            float32 for bf16/fp16 tensors and the tensor's own dtype otherwise.
            Complex tensors use the complex dtype that holds both.
        tensors_only: keep the EMA's tensors only, no module (as for a sharded
            student): for an EMA that no one runs, like PostHocEMA's. Averages
            are then held in their shadow dtype alone (4 bytes a parameter of a
            bf16 student instead of 4 + 2), on ``device`` if given; read them
            through :meth:`swapped`, :meth:`state_dict` or :meth:`model_state_dict`.
        asynchronous: let :meth:`update` return at once and average beside the
            next forward and backward passes (a worker thread on the CPU, a
            side stream on a GPU; see :mod:`ignite_ema.background`). Results
            are bit-identical: the next ``optimizer.step()`` and every method
            here wait for it, and so does a forward pass of ``ema_model``; user
            code that reads the EMA's tensors otherwise calls :meth:`wait` first.
            Buffers, which forward passes write, are read in the call (in
            stream order on a GPU).

    Attributes:
        schedule: the :class:`~ignite_ema.MomentumSchedule` that :meth:`update`
            asks, or ``None``.
        num_averaged: averaging updates of the schedule so far (the power
            warm-ups count these).
        last_step: the step of the last scheduled update (0: none yet).
        model: the student, unwrapped.
        ema_model: the averaged module (``requires_grad`` off); an EMA built
            with ``tensors_only=True``, or of a sharded student without
            ``ema_model=``, has none (:attr:`has_ema_model`).
        handle_buffers: the buffer mode.

    For a sharded student (DTensor parameters, as ``fully_shard`` makes them)
    every rank averages its own shards: an update is as local as the
    unsharded one, with no collective.
    """

    def __init__(
        self,
        model: nn.Module,
        handle_buffers: str = "copy",
        *,
        momentum: float | None = None,
        decay: float | None = None,
        half_life: float | str | None = None,
        momentum_warmup: float | None = None,
        warmup_iters: int | None = None,
        mean_teacher_warmup: bool = False,
        power_warmup: tuple[float, float] | None = None,
        start_iteration: int = 0,
        exclude: str | Sequence[str] = (),
        ema_model: nn.Module | None = None,
        device: torch.device | str | None = None,
        shadow_dtype: torch.dtype | None = None,
        tensors_only: bool = False,
        asynchronous: bool = False,
    ) -> None:
        self.schedule = MomentumSchedule.of(
            momentum=momentum,
            decay=decay,
            half_life=half_life,
            momentum_warmup=momentum_warmup,
            warmup_iters=warmup_iters,
            mean_teacher_warmup=mean_teacher_warmup,
            power_warmup=power_warmup,
            start_iteration=start_iteration,
        )
        self.num_averaged = 0
        self.last_step = 0
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model should be an instance of nn.Module or its subclasses, but got {type(model).__name__}"
            )
        if handle_buffers not in BUFFER_MODES:
            raise ValueError(
                f"handle_buffers can only be one of 'copy', 'update', 'ema_train', but got {handle_buffers!r}"
            )
        placed = check_device(device)
        if shadow_dtype is not None and not (isinstance(shadow_dtype, torch.dtype) and shadow_dtype.is_floating_point):
            raise TypeError(f"shadow_dtype must be a floating torch.dtype or None; found {shadow_dtype!r}")
        if ema_model is not None and not isinstance(ema_model, nn.Module):
            raise TypeError(f"ema_model must be an nn.Module or None; found {type(ema_model).__name__}")
        if ema_model is not None and placed is not None:
            raise ValueError("give device= or ema_model=, not both: an ema_model stays where it is")
        if check_bool("tensors_only", tensors_only) and ema_model is not None:
            raise ValueError("give ema_model= or tensors_only=True, not both: tensors_only keeps no module")
        self._background = Background() if check_bool("asynchronous", asynchronous) else None
        if tensors_only and handle_buffers == "ema_train":
            raise ValueError(
                "handle_buffers='ema_train' needs an EMA model that runs forward passes, and tensors_only=True keeps "
                "no module: use 'copy' or 'update', or leave tensors_only=False"
            )
        self.model = unwrap_model(model)
        self.handle_buffers = handle_buffers
        check_initialised(self.model, "model")
        self._sharded_student = fsdp_modules(self.model)
        reshard(self._sharded_student)  # its parameters are its shards again, not gathered copies
        student = named_tensors(self.model)
        if not student:
            raise ValueError(
                f"model ({type(self.model).__name__}) has no parameters or buffers, so it has nothing to average: "
                "build the EMA from the model that holds the weights (after its lazy modules are initialised)"
            )
        specs = {n: ShardSpec.of(t) for n, t in student.items() if is_sharded(t)}
        if specs and placed is not None:
            raise ValueError("device= is not supported for a sharded student: its EMA lives beside each shard")
        if placed is not None:
            placed = with_index(placed, next(iter(student.values())).device)
        if specs and ema_model is None and handle_buffers == "ema_train":
            raise ValueError(
                "handle_buffers='ema_train' needs an EMA model that runs forward passes, and a sharded student cannot "
                "be deep-copied: pass ema_model=fully_shard(<a second instance of the model>), sharded like the student"
            )
        params = {n for n, _ in self.model.named_parameters()}
        excluded = excluded_names(exclude, student)
        own_buffers = handle_buffers == "ema_train"  # left to the EMA model's own forward passes
        roles = {}
        for name, tensor in student.items():
            if _is_averaged(name in params, tensor, handle_buffers) and name not in excluded:
                roles[name] = AVERAGED
            elif name in params or not own_buffers or name in excluded:
                roles[name] = COPIED
            else:
                roles[name] = OWN
        averaged = [n for n, role in roles.items() if role == AVERAGED]

        self._tensors_only = tensors_only
        self._ema_model = self._ema_module(ema_model, student, placed, tensors_only=tensors_only, sharded=bool(specs))
        self._sharded_ema = fsdp_modules(self._ema_model)
        targets = self._ema_tensors(
            student, averaged, copy_student=ema_model is not None, shadow_dtype=shadow_dtype, placed=placed
        )
        self._records = {
            name: _Record(
                role=roles[name],
                target=targets[name],
                state=self._shadow_for(name, targets[name], shadow_dtype) if roles[name] == AVERAGED else targets[name],
                dtype=tensor.dtype,
                device=tensor.device,
                shape=tensor.shape,
                spec=specs.get(name),
                is_buffer=name not in params,
            )
            for name, tensor in student.items()
        }

        # An EMA built beside the student must stay there; one placed on purpose (device=) may be elsewhere.
        self._follows_device = placed is None and all(targets[n].device == local(t).device for n, t in student.items())
        self._has_statistics = any(r.is_buffer and r.dtype.is_floating_point for r in self._records.values())

        self._swapped = False
        self._warned: set[str] = set()
        self._link(student)
        if self._background is not None and self._ema_model is not None:
            # First, before FSDP2's own pre-forward hook starts gathering the EMA's shards.
            self._ema_model.register_forward_pre_hook(WaitBeforeForward(self._background), prepend=True)

    def _link(self, student: Mapping[str, Tensor]) -> None:
        """Build what updates act on from the records (the averagers, the mirror copier, the buffers' rank average)
        and pair it with ``student``'s tensors."""
        averaged = self._names(AVERAGED)
        # Asynchronous updates average in the background what only the optimiser writes (parameters), and in the
        # call what forward passes write too (buffers).
        self._in_call = [n for n in averaged if self._background is not None and self._records[n].is_buffer]
        self._in_background = [n for n in averaged if n not in self._in_call]
        # Averages kept wider than their EMA-model tensor (float32 shadows of bf16): the tensor is their mirror,
        # written by the averager with them.
        self._mirrored = [n for n in averaged if self._records[n].state is not self._records[n].target]
        self._averager, self._averager_in_call = (
            ShadowAverager(
                [self._records[n].state for n in names],
                [local(student[n]) for n in names],
                [self._records[n].target if n in self._mirrored else None for n in names],
            )
            for names in (self._in_background, self._in_call)
        )
        self._mirror = TensorCopier(
            [self._records[n].target for n in self._mirrored], [self._records[n].state for n in self._mirrored]
        )
        # What a rank average acts on: a floating buffer's average (its shadow, which the next update reads).
        self._buffer_average = RankAverage(
            [r.state for r in self._records.values() if r.is_buffer and r.dtype.is_floating_point]
        )
        self._bind(student)
        self._mirror_versions = self._versions()

    def __getstate__(self) -> dict[str, Any]:
        """What pickling, ``torch.save`` and ``copy.deepcopy`` keep: everything, once the update in flight is over."""
        if self._swapped:
            raise RuntimeError("a ModelEMA cannot be pickled or copied while it is swapped into the student")
        self.wait()
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Pair a copy with its own modules' tensors: a copied parameter does not share its storage with the copied
        tensors that viewed the original (``nn.Parameter.__deepcopy__`` clones; plain pickle shares nothing)."""
        self.__dict__.update(state)
        if self._ema_model is not None:
            now = {n: local(t) for n, t in named_tensors(self._ema_model).items()}
            self._records = {
                n: replace(r, target=now[n], state=now[n] if r.state is r.target else r.state)
                for n, r in self._records.items()
            }
        self._link(named_tensors(self.model))

    def __del__(self) -> None:
        # On a GPU, an asynchronous update may still be writing the EMA's tensors on its side stream: the stream that
        # frees them waits for it first, so that the caching allocator does not hand their memory out too early.
        background = getattr(self, "_background", None)
        if background is not None and not sys.is_finalizing():
            background.wait()

    def _ema_module(
        self,
        ema_model: nn.Module | None,
        student: Mapping[str, Tensor],
        placed: torch.device | None,
        *,
        tensors_only: bool,
        sharded: bool,
    ) -> nn.Module | None:
        """The caller's EMA model, checked; else a frozen deep copy of the student; ``None`` for a sharded one
        or with ``tensors_only``."""
        if ema_model is not None:
            ema_model = unwrap_model(ema_model)
            check_initialised(ema_model, "ema_model")
            reshard(fsdp_modules(ema_model))
            check_caller_ema_model(self.model, ema_model, student)
        elif not sharded and not tensors_only:
            ema_model = copy_module(self.model, placed)
        if ema_model is not None:
            for param in ema_model.parameters():
                param.detach_()
                param.requires_grad_(False)
            ema_model.train(self.handle_buffers == "ema_train")
        return ema_model

    def _ema_tensors(
        self,
        student: Mapping[str, Tensor],
        averaged: Sequence[str],
        *,
        copy_student: bool,
        shadow_dtype: torch.dtype | None,
        placed: torch.device | None,
    ) -> dict[str, Tensor]:
        """Where the EMA's values live, by name (local shards): the EMA model's tensors, or tensors of its own."""
        if self._ema_model is None:  # tensors only: averaged ones straight in their shadow dtype, where placed
            for name in averaged:
                self._shadow_dtype(name, student[name], shadow_dtype)  # all checked before anything is built
            return {
                n: local(t).to(
                    device=placed,
                    dtype=self._shadow_dtype(n, t, shadow_dtype) if n in averaged else t.dtype,
                    copy=True,
                )
                for n, t in student.items()
            }
        targets = {n: local(t) for n, t in named_tensors(self._ema_model).items()}
        for name in averaged:
            self._shadow_dtype(name, targets[name], shadow_dtype)  # all checked before the caller's module is written
        if copy_student:  # a caller's module; a deep copy holds the student's values already
            with torch.no_grad():
                for name, target in targets.items():
                    target.copy_(local(student[name]))
        return targets

    @staticmethod
    def _shadow_dtype(name: str, target: Tensor, shadow_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype of ``target``'s running average; a ``shadow_dtype`` narrower than ``target`` is refused."""
        if shadow_dtype is None:
            return shadow_dtype_for(target.dtype)
        if target.is_complex():
            return torch.promote_types(target.dtype, shadow_dtype)  # a complex dtype wide enough for both
        if torch.promote_types(target.dtype, shadow_dtype) != shadow_dtype:
            raise ValueError(
                f"shadow_dtype={shadow_dtype} is narrower than the {target.dtype} tensor '{name}' it would average: "
                "updates smaller than its resolution would be lost (bf16 shadows of a float32 model drift by "
                "percents over a thousand updates). Leave shadow_dtype=None (float32 for bf16/fp16 tensors, the "
                "tensor's own dtype otherwise) or pass a dtype at least as wide"
            )
        return shadow_dtype

    @classmethod
    def _shadow_for(cls, name: str, target: Tensor, shadow_dtype: torch.dtype | None) -> Tensor:
        dtype = cls._shadow_dtype(name, target, shadow_dtype)
        return target if dtype == target.dtype else target.to(dtype=dtype, copy=True)

    @property
    def ema_model(self) -> nn.Module:
        """The averaged module (``requires_grad`` off): evaluate it, or run it as a teacher.

        Raises ``RuntimeError`` for a sharded (FSDP2) student built without
        ``ema_model=``, whose EMA holds its shards only (see
        :attr:`has_ema_model`).
        """
        if self._tensors_only:
            raise RuntimeError(
                "this EMA was built with tensors_only=True and holds its tensors only, not a module. Read it through "
                "swapped(), state_dict() or model_state_dict(), or build it without tensors_only to have a module"
            )
        if self._ema_model is None:
            raise RuntimeError(
                "this EMA of a sharded (FSDP2) student holds its shards only, not a module: a sharded module cannot "
                "be deep-copied. Read it through swapped() or model_state_dict(), or pass "
                "ema_model=fully_shard(<a second instance of the model>) to have a module"
            )
        self.wait()  # a reader of the module sees no update in flight
        return self._ema_model

    @property
    def has_ema_model(self) -> bool:
        """Whether :attr:`ema_model` is a module: ``False`` for ``tensors_only=True``, and for a sharded student
        built without ``ema_model=``."""
        return self._ema_model is not None

    @property
    def averaged_names(self) -> tuple[str, ...]:
        """The tensors that updates average (the others are copied, or left to the EMA model in "ema_train")."""
        return self._names(AVERAGED)

    @property
    def has_statistics(self) -> bool:
        """Whether the EMA model has floating buffers (BatchNorm statistics, say)."""
        return self._has_statistics

    # ------------------------------------------------------------------ student

    def _names(self, role: str) -> tuple[str, ...]:
        return tuple(n for n, r in self._records.items() if r.role == role)

    def _bind(self, student: Mapping[str, Tensor]) -> None:
        shards = {n: local(t) for n, t in student.items()}
        if self._background is not None:  # refused before anything is rebound
            self._background.place(
                [shards[n] for n in self._in_background], [self._records[n].state for n in self._in_background]
            )
        self._watch = TensorWatch(self.model, list(student))  # the objects looked up now, not those of the last bind
        averaged, copied = self._names(AVERAGED), self._names(COPIED)
        self._warn_about_layouts(averaged, shards)
        self._averager.bind([shards[n] for n in self._in_background])
        self._averager_in_call.bind([shards[n] for n in self._in_call])
        self._copier = TensorCopier([self._records[n].target for n in copied], [shards[n] for n in copied])
        self._finite = FiniteCheck([shards[n] for n in (*averaged, *copied)])
        self._finite_names = [n for n in (*averaged, *copied) if _can_be_nonfinite(shards[n])]

    def _warn_about_layouts(self, averaged: Sequence[str], shards: Mapping[str, Tensor]) -> None:
        """Warn once when an average is laid out otherwise than its student (a channels_last student beside a
        contiguous caller-built ema_model, or one made channels_last after the EMA was built): correct, but on a
        GPU those pairs run per-tensor kernels instead of one multi-tensor call."""
        differ = [n for n in averaged if shards[n].stride() != self._records[n].state.stride()]
        if differ and "layout" not in self._warned:
            self._warned.add("layout")
            name = differ[0]
            warn_at_caller(
                f"the EMA's tensor '{name}' ({len(differ)} in all) is laid out with strides "
                f"{self._records[name].state.stride()}, the student's with {shards[name].stride()} (a memory format "
                "such as channels_last on one side only): such pairs are averaged one tensor at a time on a GPU. "
                "Give ema_model the student's memory format, or convert the student before building the EMA"
            )

    def rebind(self) -> None:
        """Look the student's tensors up by name again, after they were replaced (``model.to(...)``, say).

        Raises ``ValueError`` naming the first tensor that the EMA cannot
        follow: one added, removed, reshaped, converted to another dtype,
        sharded or unsharded, or moved off the device its EMA was built on
        beside it (``device=`` places an EMA elsewhere on purpose); or an EMA
        model whose tensors were replaced.
        Ignite's :class:`~ignite_ema.EMAHandler` calls this when a run starts.
        """
        self.wait()
        reshard(self._sharded_student)
        student = named_tensors(self.model)
        check_same_shapes(
            {n: r.shape for n, r in self._records.items()},
            {n: t.shape for n, t in student.items()},
            "the student",
            hint="was the model changed after the EMA was built? Build the EMA from the final model",
        )
        for name, tensor in student.items():
            record = self._records[name]
            dtype, device, sharded = record.dtype, record.device, record.spec is not None
            if tensor.dtype != dtype:
                raise ValueError(
                    f"the student's tensor '{name}' is {tensor.dtype} now, {dtype} when the EMA was built: the EMA "
                    "cannot follow a conversion. Convert the model before building the EMA"
                )
            if is_sharded(tensor) != sharded:
                raise ValueError(
                    f"the student's tensor '{name}' was {'sharded' if sharded else 'not sharded'} when "
                    f"the EMA was built and is {'not ' if sharded else ''}now: build the EMA after fully_shard()"
                )
            if tensor.device != device and self._follows_device:
                raise ValueError(
                    f"the student's tensor '{name}' moved from {device} to {tensor.device} after the EMA was built, "
                    "and its EMA stays behind. Move the model before building the EMA, or pass device= to keep "
                    "the EMA elsewhere on purpose"
                )
        self._check_targets_in_place()
        self._bind(student)

    def _check_targets_in_place(self) -> None:
        """The averages are written into the EMA model's tensors as they were built; moving or converting the EMA
        model afterwards (``.to()``, ``.double()``) gives it new storage that would silently stop being updated."""
        if self._ema_model is None:
            return
        current = {n: local(t) for n, t in named_tensors(self._ema_model).items()}
        for name, record in self._records.items():
            target, now = record.target, current.get(name)
            if now is None or now.data_ptr() != target.data_ptr() or now.dtype != target.dtype:
                found = "gone" if now is None else f"now {now.dtype} on {now.device}"
                raise ValueError(
                    f"the EMA model's tensor '{name}' was replaced after the EMA was built ({found}, was "
                    f"{target.dtype} on {target.device}), so it can no longer be updated. Pass device= (and move "
                    "the student before building the EMA) instead of moving ema_model"
                )

    # ------------------------------------------------------------------ updates

    def update(self, momentum: float | None = None, *, step: int | None = None) -> float:
        """One update of the EMA: ``ema = (1 - m) * ema + m * student`` for every averaged tensor, buffers per the
        mode. Returns the momentum ``m`` applied.

        - ``update()``: ``m`` from the schedule at the next step of the EMA's
          own count (1, 2, 3, ...); call it after each ``optimizer.step()``.
        - ``update(step=n)``: ``m`` from the schedule at the caller's step
          ``n``, which must come after the last one; an update ``k`` steps
          after the previous one forgets as ``k`` one-step updates would.
        - ``update(m)``: this momentum, now, outside the schedule (its
          counters do not move); a value above 0.5 that looks like a decay is
          warned about once.

        Steps up to ``start_iteration`` copy the student (``m`` = 1). If the
        student's tensors were replaced since the last update (a new head,
        ``load_state_dict(..., assign=True)``, ``param.data = ...``), the EMA
        follows the new ones, or raises ``ValueError`` naming the first it
        cannot follow (see :meth:`rebind`).
        """
        if momentum is not None:
            if step is not None:
                raise ValueError(
                    f"give a momentum (update({momentum})) or a step of the schedule (update(step={step})), not both"
                )
            momentum = check_momentum(momentum)
            if 0.5 < momentum < 1.0 and "decay" not in self._warned:
                self._warned.add("decay")
                warn_if_decay(momentum)
            self._average(momentum)
            return momentum
        if self.schedule is None:
            raise ValueError(
                "update() without a momentum needs a schedule: build the EMA with momentum=, decay= or half_life= "
                "(ModelEMA(model, decay=0.9998), say), or pass each update's momentum: update(0.01)"
            )
        step = next_step(step, self.last_step)
        momentum = self.schedule(step, self.last_step, self.num_averaged)
        if step <= self.schedule.start_iteration:
            self.copy_student()
        else:
            self._warn_if_half_life_short(step - self.last_step)
            self._average(momentum)
            self.num_averaged += 1
        self.last_step = step
        return momentum

    def _warn_if_half_life_short(self, delta: int) -> None:
        """Warn once when the half-life is shorter than the steps between updates: each update then forgets more
        than half of the average, which is seldom meant (a ``"dur"`` half-life on a short run, say)."""
        schedule = self.schedule
        if schedule is None or schedule.half_life is None or "short_half_life" in self._warned:
            return
        if (momentum := momentum_from_half_life(schedule.half_life, delta)) > 0.5:
            self._warned.add("short_half_life")
            spec = schedule.half_life_spec or f"{schedule.half_life:g}"
            warn_at_caller(
                f"half_life={spec} is {schedule.half_life:.3g} iterations in this run, shorter than the {delta} "
                f"step(s) between updates: each update forgets more than half of the average (momentum "
                f"{momentum:.3g}). Give a longer half_life"
            )

    def _average(self, momentum: float) -> None:
        """:meth:`update` without its argument's checks: for a caller (the handler) whose schedule checked it."""
        self._before_access("update")
        self._follow_student()
        self._adopt_outside_writes()
        if self._background is None:
            self._averager.update(momentum)
            self._after_update()
            return
        reshard(self._sharded_ema)
        self._background.start(
            self._averager, momentum, self._note_mirrors, buffers=self._averager_in_call, copies=self._copier
        )

    def copy_student(self) -> None:
        """Set the EMA to the student's current values (buffers per the mode): the average restarts there."""
        self._before_access("copy_student")
        self._follow_student()
        self._averager.copy_students()
        self._averager_in_call.copy_students()
        self._after_update()

    def wait(self) -> None:
        """Return when the update in flight (``asynchronous=True``) is over: call it before reading or writing the
        EMA's tensors other than through this object or a forward pass of ``ema_model`` (``ema_model.state_dict()``,
        ``param.cpu()``). A no-op for synchronous updates, and when none is in flight."""
        if self._background is not None:
            self._background.wait()

    def _follow_student(self) -> None:
        """Pair the EMA with the student's tensors again if any were replaced since they were paired (cheap when
        none was: see :class:`~ignite_ema._watch.TensorWatch`)."""
        if self._watch.changed() and not self._watch.holds(named_tensors(self.model)):
            self.rebind()

    def _after_update(self) -> None:
        """After the averagers (which write the mirrors): copies, versions, FSDP2's gathered copies."""
        self._copier.copy()
        self._note_mirrors()
        reshard(self._sharded_ema)

    def _after_write(self) -> None:
        """Bring the EMA model's tensors in line with the averages written otherwise: mirrors, versions, FSDP2's
        gathered copies."""
        self._mirror.copy()
        self._note_mirrors()
        reshard(self._sharded_ema)

    def _note_mirrors(self) -> None:
        """The mirrors' versions now, against which :meth:`_adopt_outside_writes` finds writes from outside."""
        self._mirror_versions = self._versions()

    def _versions(self) -> list[int]:
        return [t._version for t in self._mirror.targets]

    def _adopt_outside_writes(self, *, compare_all: bool = False) -> None:
        """Take the EMA model's values where something else wrote them since the last update.

        Only tensors with a separate (float32) shadow can disagree with it; a
        write bumps a tensor's version counter, and only those that also differ
        in value re-seed their shadow, losing its extra precision (said once).
        """
        if not self._mirrored:
            return
        versions = self._versions()
        if versions == self._mirror_versions and not compare_all:
            return
        targets, shadows = self._mirror.targets, self._mirror.sources
        with torch.no_grad():
            differ = [
                i
                for i, (now, then) in enumerate(zip(versions, self._mirror_versions, strict=True))
                if (compare_all or now != then) and not torch.equal(targets[i], shadows[i].to(targets[i].dtype))
            ]
            for i in differ:
                shadows[i].copy_(targets[i])
        self._mirror_versions = versions
        if differ and "outside_write" not in self._warned:
            self._warned.add("outside_write")
            name = self._mirrored[differ[0]]
            warn_at_caller(
                f"the EMA model's tensor '{name}' ({len(differ)} in all) was written from outside the EMA (a load "
                f"into ema_model, recalibrate_bn, ...) and no longer matches its {shadows[differ[0]].dtype} shadow: "
                f"the EMA goes on from the EMA model's {targets[differ[0]].dtype} values, and the shadow's extra "
                "precision is lost. To keep it, save and load the EMA itself (its state_dict(), e.g. "
                "Checkpoint(to_save={'ema': ema_handler})) rather than ema_model's"
            )

    def check_outside_writes(self) -> None:
        """Compare every low-precision EMA tensor with its shadow now, and adopt the ones that differ.

        :meth:`update` catches writes by their version counters; this also
        catches writes through ``.data``. Ignite's handler calls it when a run
        starts.
        """
        self.wait()
        self._adopt_outside_writes(compare_all=True)

    # ------------------------------------------------------------------ non-finite students and ranks

    def nonfinite_student(self) -> str | None:
        """What to name if a student tensor an update reads has NaN or Inf, on this rank or another; else ``None``.

        One multi-tensor norm per group and, whatever the world size, one host
        synchronisation: with more than one rank the flag is and-ed over the
        ranks on the device first (one all-reduce of one number), so every
        rank gets the same answer (call it on every rank). Only when a norm is
        not finite somewhere do the exact scan and a second collective run.
        """
        local_flag = self._finite.all_finite()
        if local_flag is None:
            return None
        if bool(all_ranks(local_flag)):  # the one host synchronisation
            return None
        # Rare: a norm was not finite on some rank; every rank is here, so the collective below is safe.
        index = self._finite.first_nonfinite()  # None when a norm merely overflowed, or the NaN is elsewhere
        bad = None if index is None else f"the student's tensor '{self._finite_names[index]}'"
        if world_size() > 1 and any_rank(bad is not None, local_flag.device) and bad is None:
            return "a student tensor on another rank"
        return bad

    def average_buffers_across_ranks(self) -> None:
        """Set the EMA's floating buffers to their mean over the ranks, now (a collective; no-op on one process).

        Integer buffers are left alone. Averaging ``running_var`` over ranks
        leaves out the spread of the means between them: the usual
        SyncBatchNorm-free approximation.
        """
        self._before_access("average_buffers_across_ranks")
        self._buffer_average()
        self._after_write()

    # ------------------------------------------------------------------ swap

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Put every tensor of the EMA into the student module, in place, for the block; restore it after.

        Inside the block the student's parameters and buffers hold the EMA's
        values (its tensor objects stay the same ones, so optimisers, compiled
        graphs, wrappers and hooks keep working) and ``ema_model`` holds the
        student's, except where the EMA is kept in a wider dtype than the
        student (a float32 ``ema_model`` of a bf16 student, ``tensors_only``
        averages): those keep their own values. On exit, also by exception, both are back bit for bit. The
        extra memory is the largest tensor's, except for tensors whose EMA is
        in a wider dtype than the student (a float32 ``ema_model`` of a bf16
        student): those are kept aside whole. All of it is allocated on entry
        and kept to the end, so giving the student back allocates nothing.
        Swaps do not nest, and :meth:`update` and the state calls refuse to run
        inside one.
        """
        self._before_access("swapped")
        self.rebind()
        student = {n: local(t) for n, t in named_tensors(self.model).items()}
        targets = {n: r.target for n, r in self._records.items()}
        same = [n for n in targets if student[n].dtype == targets[n].dtype]
        wider = [n for n in targets if student[n].dtype != targets[n].dtype]
        parked = [student[n].clone() for n in wider]
        swap = ValueSwap([student[n] for n in same], [targets[n] for n in same])
        reshard(self._sharded_ema)
        wait_for_host_reads(student.values())
        release_students()  # another EMA's update may still read the student
        swap.exchange()
        with torch.no_grad():
            for name in wider:
                student[name].copy_(targets[name])
        self._swapped = True
        try:
            yield
        finally:
            # Forwards inside gathered the EMA's values; the student's next forward must gather its own.
            reshard([*self._sharded_student, *self._sharded_ema])
            wait_for_host_reads(student.values())
            release_students()
            swap.exchange()
            with torch.no_grad():
                for name, kept in zip(wider, parked, strict=True):
                    student[name].copy_(kept)
            self._swapped = False
            self._mirror_versions = self._versions()

    @property
    def is_swapped(self) -> bool:
        """Whether the student holds the EMA's values now (inside :meth:`swapped`)."""
        return self._swapped

    def _before_access(self, what: str) -> None:
        """Every read or write of the EMA starts here: refused inside a swap, and after the update in flight."""
        self.wait()
        if self._swapped:
            raise RuntimeError(
                f"{what}() was called while the EMA is swapped into the student (inside `with ema.swapped():`), "
                "where the student holds the EMA's values and the EMA model the student's. Call it after the block"
            )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The mode and every tensor of the EMA, by name: averaged ones in their shadow dtype (float32 for bf16).

        Tensors are references, as in ``nn.Module.state_dict``, except sharded
        ones, which are assembled whole so that any process can load them: a
        collective (call it on every rank, as Ignite's ``Checkpoint`` does),
        one tensor at a time, each moved to the CPU at once and kept on rank 0
        only, which writes the checkpoint; the other ranks' states leave them
        out (torch's ``full_state_dict`` with ``cpu_offload`` does the same).
        Device memory peaks at one whole tensor.
        """
        self._before_access("state_dict")
        tensors = {}
        writes = rank() == 0
        for name, record in self._records.items():
            if record.spec is None:
                tensors[name] = record.state
            elif (whole := record.spec.full_on_cpu(record.state, keep=writes)) is not None:
                tensors[name] = whole
        return {"handle_buffers": self.handle_buffers, "tensors": tensors, **self._counters()}

    def _counters(self) -> dict[str, int]:
        return {"num_averaged": self.num_averaged, "last_update_iteration": self.last_step}

    def sharded_state_dict(self, *, copy: bool = False) -> dict[str, Any]:
        """:meth:`state_dict` with sharded tensors as DTensors over this rank's shards: for
        ``torch.distributed.checkpoint``, where each rank writes and reads its own shards.

        Args:
            copy: give copies rather than views of the EMA's tensors: a state
                for ``dcp.load`` to fill before :meth:`load_state_dict` checks it
                (all or nothing). Saving only reads, so views serve it.
        """
        self._before_access("sharded_state_dict")
        tensors = {}
        for name, record in self._records.items():
            held = record.state.clone() if copy else record.state
            tensors[name] = held if record.spec is None else record.spec.dtensor(held)
        return {"handle_buffers": self.handle_buffers, "tensors": tensors, **self._counters()}

    def model_state_dict(self) -> dict[str, Any]:
        """The EMA's weights and buffers as the model's own ``state_dict()``: whole tensors in the student's dtypes.

        ``unsharded_model.load_state_dict(ema.model_state_dict())`` gives a
        plain module with the EMA weights. Tensors kept in the student's dtype
        are references, as in ``nn.Module.state_dict``; the others are
        converted copies. From a sharded student, whole tensors are assembled
        one at a time (a collective: call it on every rank) and moved to the
        CPU, on every rank. Entries that are not tensors of the EMA (a
        module's ``get_extra_state()``, what state-dict hooks add) are the
        student's own.
        """
        self._before_access("model_state_dict")
        canonical = {id(t): n for n, t in named_tensors(self.model).items()}
        exported: dict[str, Any] = {}
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            name = canonical.get(id(tensor))  # tied weights appear under each of their names
            if name is None:
                exported[key] = tensor
                continue
            record = self._records[name]
            value = record.state if record.spec is None else record.spec.full_on_cpu(record.state, keep=True)
            assert value is not None  # kept
            exported[key] = value.to(dtype=record.dtype)  # no copy when the dtype is the student's
        return exported

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming what does not fit :meth:`load_state_dict`; change nothing."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"expected a mapping from state_dict(); found {type(state_dict).__name__}")
        check_keys(state_dict, STATE_KEYS, "the EMA state")
        for key in ("num_averaged", "last_update_iteration"):
            value = state_dict[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the EMA state's '{key}' must be a non-negative int; found {value!r}")
        if state_dict["handle_buffers"] != self.handle_buffers:
            raise ValueError(
                f"the state was saved with handle_buffers={state_dict['handle_buffers']!r}, "
                f"this EMA uses {self.handle_buffers!r}"
            )
        saved = state_dict["tensors"]
        if not isinstance(saved, Mapping) or not all(isinstance(t, Tensor) for t in saved.values()):
            raise ValueError("the EMA state's 'tensors' must map names to tensors")
        check_same_shapes(
            {n: r.shape for n, r in self._records.items()},
            {n: t.shape for n, t in saved.items()},
            "the saved state",
            hint="was it saved from another model? Load a state saved by an EMA of the same model",
        )
        for name, tensor in saved.items():
            if tensor.is_meta:
                raise ValueError(f"saved tensor '{name}' is on the meta device: it has no values to load")
            record = self._records[name]
            if tensor.dtype != record.state.dtype:
                raise ValueError(f"saved tensor '{name}' is {tensor.dtype}, the EMA keeps it as {record.state.dtype}")
            if is_sharded(tensor) and ShardSpec.of(tensor) != record.spec:
                raise ValueError(
                    f"saved tensor '{name}' is sharded otherwise than this EMA keeps it; load whole tensors "
                    "(state_dict()) or a sharded state of the same layout"
                )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` or :meth:`sharded_state_dict`, all or nothing: a state that does not fit raises
        before anything changes. Whole tensors of a sharded EMA are cut to each rank's shard, with no collective."""
        self._before_access("load_state_dict")
        self.check_state_dict(state_dict)
        with torch.no_grad():
            for name, tensor in state_dict["tensors"].items():
                record = self._records[name]
                target = record.state
                if is_sharded(tensor):
                    target.copy_(local(tensor))
                elif record.spec is not None:
                    target.copy_(record.spec.shard_of(tensor, target.device))
                else:
                    target.copy_(tensor)
        self.num_averaged = state_dict["num_averaged"]
        self.last_step = state_dict["last_update_iteration"]
        self._after_write()


@dataclass(frozen=True)
class _Record:
    """One tensor of the EMA: its role, where its EMA lives, and what the student's tensor was built as.

    Attributes:
        role: ``AVERAGED``, ``COPIED`` or ``OWN``.
        target: the EMA's value: the EMA model's tensor (this rank's shard), or a tensor of its own.
        state: what ``state_dict`` saves and the update writes: the float32 shadow of a low-precision target
            (``target`` is then its rounded mirror), else ``target`` itself.
        dtype, device, shape: the student's tensor when the EMA was built (the global shape for a shard).
        spec: the shard layout of a sharded (DTensor) student tensor, else ``None``.
        is_buffer: a buffer rather than a parameter.
    """

    role: str
    target: Tensor
    state: Tensor
    dtype: torch.dtype
    device: torch.device
    shape: torch.Size
    spec: ShardSpec | None
    is_buffer: bool


def _is_averaged(is_param: bool, tensor: Tensor, mode: str) -> bool:
    return _can_be_nonfinite(tensor) and (is_param or mode == "update")


def _can_be_nonfinite(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()
