"""A mean-teacher trainer (Tarvainen & Valpola, 2017) as an Ignite ``Engine``.

Each batch mixes labelled and unlabelled items. The student minimises the
supervised loss on the labelled items plus a weighted consistency loss between
its predictions and the teacher's on every item; the teacher is the EMA of the
student (``ema_handler.ema_model``), runs under ``no_grad`` on its own noisy
view of the input, and is updated by the handler after each iteration. The
handler's ``handle_buffers`` decides how the teacher's BatchNorm statistics
behave (and puts the teacher in the matching train/eval mode before every
iteration), so the trainer never needs to know the mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from ignite.engine import CallableEventWithFilter, Engine, Events
from ignite.utils import convert_tensor
from torch import Tensor, nn

from ignite_ema import unwrap_model

__all__ = [
    "MeanTeacherBatch",
    "TeacherHandler",
    "create_mean_teacher_trainer",
    "select_items",
    "sigmoid_mse",
    "sigmoid_rampup",
    "softmax_mse",
]

Output = Any  # a tensor, or a tuple/list/dict of tensors with the batch on dim 0
Noise = Callable[[Tensor], Tensor]


class TeacherHandler(Protocol):
    """An EMA handler with Ignite's interface: ``ignite_ema.EMAHandler`` or ``ignite.handlers.EMAHandler``."""

    model: nn.Module

    @property
    def ema_model(self) -> nn.Module | None: ...  # None only for a sharded student's EMA without a module

    def attach(self, engine: Engine, name: str = ..., warn_if_exists: bool = ..., event: Any = ...) -> None: ...


class MeanTeacherBatch(NamedTuple):
    """What the trainer needs from a batch: inputs, targets (any value on unlabelled rows), which rows are labelled."""

    x: Tensor
    y: Output
    labelled: Tensor  # bool, shape [batch]


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = step / length`` clipped to [0, 1]; 1 when ``length`` is 0.

    >>> round(sigmoid_rampup(0, 100), 6), round(sigmoid_rampup(50, 100), 6), sigmoid_rampup(100, 100)
    (0.006738, 0.286505, 1.0)
    """
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def softmax_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference of class probabilities (the paper's consistency cost)."""
    return nn.functional.mse_loss(student.softmax(dim=1), teacher.softmax(dim=1))


def sigmoid_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference of per-class probabilities, for multi-label outputs (sound events)."""
    return nn.functional.mse_loss(student.sigmoid(), teacher.sigmoid())


def select_items(value: Output, index: Tensor) -> Output:
    """Rows ``index`` (a bool mask or indices) of a tensor or of each tensor in a tuple/list/dict."""
    if isinstance(value, Tensor):
        return value[index]
    if isinstance(value, Mapping):
        return {k: select_items(v, index) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = [select_items(v, index) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # type: ignore[call-arg]
    raise TypeError(f"expected a tensor or a tuple/list/dict of tensors; found {type(value).__name__}")


def _default_prepare_batch(batch: Any, device: torch.device | str | None, non_blocking: bool) -> MeanTeacherBatch:
    if not (isinstance(batch, Sequence) and len(batch) == 3):
        raise TypeError(
            "a mean-teacher batch is (x, y, labelled) with labelled a bool tensor marking the labelled rows; "
            f"found {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
        )
    x, y, labelled = (convert_tensor(v, device=device, non_blocking=non_blocking) for v in batch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor; found {type(x).__name__}")
    if not (isinstance(labelled, Tensor) and labelled.dtype == torch.bool and labelled.dim() == 1):
        raise TypeError(f"labelled must be a 1-d bool tensor; found {getattr(labelled, 'dtype', type(labelled))}")
    return MeanTeacherBatch(x, y, labelled)


def create_mean_teacher_trainer(
    student: nn.Module,
    ema_handler: TeacherHandler | None,
    optimizer: torch.optim.Optimizer,
    supervised_loss: Callable[[Output, Output], Tensor],
    consistency_loss: Callable[[Output, Output], Tensor] = softmax_mse,
    consistency_weight: float = 1.0,
    rampup_iters: int = 0,
    *,
    device: torch.device | str | None = None,
    non_blocking: bool = False,
    prepare_batch: Callable[[Any, torch.device | str | None, bool], MeanTeacherBatch] = _default_prepare_batch,
    student_noise: Noise | None = None,
    teacher_noise: Noise | None = None,
    ema_event: Events | CallableEventWithFilter = Events.ITERATION_COMPLETED,
    ema_name: str = "ema_momentum",
) -> Engine:
    """Build the trainer and attach ``ema_handler`` to it (on ``ema_event``, publishing ``engine.state.<ema_name>``).

    Args:
        student: the model being trained (already on ``device``).
        ema_handler: the teacher's EMA handler, built on ``student``; ``None``
            trains the student on the labelled items only (the supervised baseline).
        optimizer: the student's optimiser.
        supervised_loss: ``loss(student_output, y)`` on the labelled rows only.
        consistency_loss: ``loss(student_output, teacher_output)`` on all rows.
        consistency_weight: the weight reached at the end of the ramp-up.
        rampup_iters: iterations of the sigmoid ramp-up ``exp(-5 (1 - t)^2)``
            of the consistency weight (0: full weight from the start).
        prepare_batch: turns a batch into a :class:`MeanTeacherBatch` on ``device``;
            the default takes ``(x, y, labelled)``.
        student_noise, teacher_noise: independent input noise / augmentation
            for each model (the teacher sees its own view of the same items).

    The engine's output is a dict of floats: ``loss``, ``supervised_loss``,
    ``consistency_loss`` and ``consistency_weight``.
    """
    if ema_handler is not None and ema_handler.model is not unwrap_model(student):
        raise ValueError("ema_handler must be built on this student (EMAHandler(student, ...))")
    if consistency_weight < 0 or rampup_iters < 0:
        raise ValueError(
            f"consistency_weight and rampup_iters must be >= 0; found {consistency_weight} and {rampup_iters}"
        )
    teacher = ema_handler.ema_model if ema_handler is not None else None
    if ema_handler is not None and teacher is None:
        raise ValueError("the teacher must be a module: for a sharded student, build the handler with ema_model=")

    def step(engine: Engine, batch: Any) -> dict[str, float]:
        x, y, labelled = prepare_batch(batch, device, non_blocking)
        student.train()
        out = student(student_noise(x) if student_noise else x)
        zero = x.new_zeros(())
        # A batch may hold no labelled item; the supervised term is then 0, not NaN.
        sup = supervised_loss(select_items(out, labelled), select_items(y, labelled)) if labelled.any() else zero
        weight, cons = 0.0, zero
        if teacher is not None:
            with torch.no_grad():
                teacher_out = teacher(teacher_noise(x) if teacher_noise else x)
            weight = consistency_weight * sigmoid_rampup(engine.state.iteration - 1, rampup_iters)
            cons = consistency_loss(out, teacher_out)
        loss = sup + weight * cons
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        return {
            "loss": loss.item(),
            "supervised_loss": sup.item(),
            "consistency_loss": cons.item(),
            "consistency_weight": weight,
        }

    trainer = Engine(step)
    if ema_handler is not None:
        ema_handler.attach(trainer, name=ema_name, event=ema_event)
    return trainer
