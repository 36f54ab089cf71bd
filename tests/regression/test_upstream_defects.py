"""Regression suite: the known defects of ``ignite.handlers.EMAHandler`` 0.5.5, and that ours has none of them.

Every test states a behaviour a user of an EMA handler relies on and runs it
against both handlers on real Ignite engines:

- ``ignite_ema``: :class:`ignite_ema.EMAHandler` must pass;
- ``ignite``: :class:`ignite.handlers.EMAHandler` is a strict ``xfail`` whose
  reason is the defect, so the suite proves it detects each defect (a test
  that stopped failing upstream would be reported as XPASS(strict), i.e. an
  error). Each upstream failure is an assertion about the behaviour, never an
  unrelated error: check with ``pytest --runxfail -k 'ignite]'``.

Expected values come from closed forms or plain loops written here, never from
running the code under test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import pytest
import torch
from _pytest.mark import ParameterSet
from ignite.engine import Engine, Events, create_supervised_evaluator
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers import EMAHandler as UpstreamEMAHandler
from ignite.metrics import MeanSquaredError
from torch import Tensor, nn

from ignite_ema import EMAHandler

Handler: TypeAlias = EMAHandler | UpstreamEMAHandler
HandlerClass: TypeAlias = Callable[..., Handler]


def both_handlers(defect: str) -> list[ParameterSet]:
    """Ours must pass; upstream must fail, for ``defect``."""
    return [
        pytest.param(UpstreamEMAHandler, marks=pytest.mark.xfail(strict=True, reason=defect), id="ignite"),
        pytest.param(EMAHandler, id="ignite_ema"),
    ]


def linear_warmup(iteration: int, momentum_warmup: float, momentum: float, warmup_iters: int) -> float:
    """Ignite's documented linear warm-up, written out here as the reference.

    ``momentum_warmup`` at iteration 1, moving linearly, never past
    ``momentum``, and ``momentum`` from ``warmup_iters`` on.
    """
    if iteration >= warmup_iters:
        return momentum
    value = momentum_warmup + (momentum - momentum_warmup) * (iteration - 1) / max(1, warmup_iters - 1)
    return min(value, momentum) if momentum >= momentum_warmup else max(value, momentum)


def bn_student() -> nn.Sequential:
    """A small student with BatchNorm, whose buffers a train-mode forward changes in place."""
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def random_batches(count: int, size: int = 8, features: int = 4) -> list[Tensor]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randn(size, features, generator=generator) for _ in range(count)]


def train_forward_step(student: nn.Module) -> Callable[[Engine, Tensor], None]:
    """A step that runs the student in train mode, so its BatchNorm statistics move."""

    def step(engine: Engine, batch: Tensor) -> None:
        student.train()
        with torch.no_grad():
            student(batch)

    return step


def snapshot_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def trained_bn_pair(handler_cls: HandlerClass, mode: str, updates: int) -> tuple[nn.Module, Handler]:
    """A BatchNorm student and its EMA handler after ``updates`` train-mode iterations, one update each."""
    torch.manual_seed(0)
    student = bn_student()
    handler = handler_cls(student, momentum=0.5, handle_buffers=mode)
    trainer = Engine(train_forward_step(student))
    handler.attach(trainer)
    trainer.run(random_batches(updates), max_epochs=1)
    return student, handler


# --------------------------------------------------------------------------- 1


@pytest.mark.parametrize(
    "handler_cls",
    both_handlers(
        "'copy' rebinds the EMA model's buffers to the student's storage (ema_b.data = model_b.data), "
        "so the student's next train-mode forward changes the EMA model's BatchNorm statistics"
    ),
)
def test_copy_mode_keeps_buffers_of_the_last_update(handler_cls: HandlerClass) -> None:
    student, handler = trained_bn_pair(handler_cls, "copy", updates=3)
    at_last_update = snapshot_buffers(student)

    # The user keeps training the student (or runs it once more in train mode)
    # after the last EMA update: that must not touch the EMA model.
    with torch.no_grad():
        student(torch.randn(8, 4) * 3.0 + 5.0)
    # The premise: the student's statistics did move.
    assert not torch.equal(dict(student.named_buffers())["1.running_mean"], at_last_update["1.running_mean"])

    ema_buffers = dict(handler.ema_model.named_buffers())
    for name, expected in at_last_update.items():
        torch.testing.assert_close(ema_buffers[name], expected, rtol=0, atol=0, msg=f"EMA buffer {name} moved")
    for name, student_buffer in student.named_buffers():
        assert ema_buffers[name].data_ptr() != student_buffer.data_ptr(), f"{name} shares the student's storage"


# --------------------------------------------------------------------------- 2


@pytest.mark.parametrize(
    "handler_cls",
    both_handlers(
        "'update' cannot average int64 num_batches_tracked, falls back to ema_b.data = model_b.data, "
        "and the EMA model's counter then follows the student's later forwards"
    ),
)
def test_update_mode_keeps_integer_buffers_of_the_last_update(handler_cls: HandlerClass) -> None:
    updates = 3
    student, handler = trained_bn_pair(handler_cls, "update", updates)

    with torch.no_grad():
        student(torch.randn(8, 4))
    student_count = dict(student.named_buffers())["1.num_batches_tracked"]
    # The premise: one train-mode forward per batch, then one more.
    assert int(student_count) == updates + 1

    ema_count = dict(handler.ema_model.named_buffers())["1.num_batches_tracked"]
    # Integer buffers are copied at each update: the value of the last update.
    assert ema_count.dtype == torch.int64
    assert int(ema_count) == updates
    assert ema_count.data_ptr() != student_count.data_ptr()


# --------------------------------------------------------------------------- 3


@pytest.mark.parametrize(
    "handler_cls",
    both_handlers(
        "the warm-up scheduler always writes engine.state.ema_momentum, so under another name "
        "(attach(name='teacher_momentum')) the updates use the final momentum from the first iteration"
    ),
)
# Upstream's scheduler warns that it creates engine.state.ema_momentum: the defect itself, not news here.
@pytest.mark.filterwarnings("ignore:Attribute 'ema_momentum' is not defined:UserWarning")
def test_linear_warmup_applies_under_a_custom_name(handler_cls: HandlerClass) -> None:
    momentum, momentum_warmup, warmup_iters, iterations = 0.1, 0.9, 5, 8
    student = nn.Linear(3, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(student.weight)
    handler = handler_cls(student, momentum=momentum, momentum_warmup=momentum_warmup, warmup_iters=warmup_iters)

    def step(engine: Engine, batch: Any) -> None:
        # A student that is easy to follow by hand: weight = iteration number.
        with torch.no_grad():
            student.weight.fill_(float(engine.state.iteration))

    trainer = Engine(step)
    handler.attach(trainer, name="teacher_momentum")
    published: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: published.append(e.state.teacher_momentum))
    trainer.run(range(iterations), max_epochs=1)

    expected = [linear_warmup(i, momentum_warmup, momentum, warmup_iters) for i in range(1, iterations + 1)]
    assert published == pytest.approx(expected, rel=1e-12)

    ema = 0.0
    for iteration, m in enumerate(expected, start=1):
        ema = (1.0 - m) * ema + m * iteration
    torch.testing.assert_close(handler.ema_model.weight, torch.full_like(student.weight, ema))


# --------------------------------------------------------------------------- 4


@pytest.mark.parametrize(
    "handler_cls",
    both_handlers(
        "'ema_train' sets train mode once, at construction: after an evaluator calls ema_model.eval(), "
        "the teacher stays in eval mode for the rest of training"
    ),
)
def test_ema_train_teacher_is_in_train_mode_after_evaluation(handler_cls: HandlerClass) -> None:
    torch.manual_seed(0)
    student = bn_student()
    handler = handler_cls(student, momentum=0.1, handle_buffers="ema_train")
    teacher = handler.ema_model
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    teacher_training: list[bool] = []

    def mean_teacher_step(engine: Engine, batch: tuple[Tensor, Tensor]) -> float:
        x, _ = batch
        student.train()
        with torch.no_grad():
            target = teacher(x)
        teacher_training.append(teacher.training)
        loss = nn.functional.mse_loss(student(x), target)
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        return loss.item()

    trainer = Engine(mean_teacher_step)
    handler.attach(trainer)
    evaluator = create_supervised_evaluator(teacher, metrics={"mse": MeanSquaredError()})
    train_data = [(x, torch.zeros_like(x)) for x in random_batches(4)]
    val_data = [(x, torch.zeros_like(x)) for x in random_batches(2)]
    teacher_training_after_eval: list[bool] = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        evaluator.run(val_data)
        teacher_training_after_eval.append(teacher.training)

    epochs = 3
    trainer.run(train_data, max_epochs=epochs)

    # The premise: the evaluator ran after every epoch and left the teacher in eval mode.
    assert teacher_training_after_eval == [False] * epochs
    assert teacher_training == [True] * (epochs * len(train_data))


# --------------------------------------------------------------------------- 5


@pytest.mark.parametrize(
    "handler_cls",
    both_handlers(
        "a bf16 EMA is averaged in bf16: with momentum 2e-4, (1 - m) * ema rounds back to ema and "
        "m * student falls below half an ulp, so the average stalls far below its value"
    ),
)
def test_bf16_ema_with_small_momentum_keeps_moving(handler_cls: HandlerClass) -> None:
    momentum, iterations = 2e-4, 4000
    student = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    # The EMA starts at 0 and then follows a student that stays at 1.
    nn.init.zeros_(student.weight)
    handler = handler_cls(student, momentum=momentum)
    nn.init.ones_(student.weight)
    x = torch.ones(2, 4, dtype=torch.bfloat16)

    def step(engine: Engine, batch: Any) -> None:
        with torch.no_grad():
            student(x)

    trainer = Engine(step)
    handler.attach(trainer)
    trainer.run(range(iterations), max_epochs=1)

    # From 0 towards a constant 1: ema_N = 1 - (1 - m)^N (about 0.55 here).
    expected = 1.0 - (1.0 - momentum) ** iterations
    ema_weight = handler.ema_model.weight
    torch.testing.assert_close(ema_weight.float(), torch.full((4, 4), expected), rtol=1e-2, atol=0.0)

    # The EMA model stays in the student's dtype and takes the student's inputs unchanged.
    assert ema_weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = handler.ema_model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.full((2, 4), 4 * expected), rtol=2e-2, atol=0.0)


# --------------------------------------------------------------------------- 6


@pytest.mark.parametrize(
    "handler_cls",
    both_handlers(
        "tensors are paired by position (zip): a student changed after the handler was built is averaged "
        "silently into the wrong tensors instead of raising"
    ),
)
def test_student_that_no_longer_matches_the_ema_model_is_an_error(handler_cls: HandlerClass) -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    handler = handler_cls(student, momentum=0.5)
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    # Same shapes everywhere, so a positional pairing cannot notice: the EMA
    # model's "0.*" would be averaged with the new layer, its "1.*" with the
    # old first layer, and the student's last layer ("2.*") with nothing.
    student.insert(0, nn.Linear(4, 4))

    with pytest.raises(ValueError, match=re.escape("'2.weight'")):
        trainer.run(range(2), max_epochs=1)


# --------------------------------------------------------------------------- 7

_RESUME_MOMENTUM, _RESUME_MOMENTUM_WARMUP, _RESUME_WARMUP_ITERS = 0.05, 0.5, 10
_EPOCH_LENGTH = 5  # the interrupted run stops at an epoch boundary, after iteration 5


def _training_run(handler_cls: HandlerClass) -> tuple[nn.Module, torch.optim.Optimizer, Handler, Engine]:
    """A fresh student, optimizer, EMA handler (linear warm-up over 10 iterations) and trainer."""
    torch.manual_seed(0)
    student = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    handler = handler_cls(
        student,
        momentum=_RESUME_MOMENTUM,
        momentum_warmup=_RESUME_MOMENTUM_WARMUP,
        warmup_iters=_RESUME_WARMUP_ITERS,
    )

    def step(engine: Engine, batch: tuple[Tensor, Tensor]) -> float:
        x, y = batch
        loss = nn.functional.mse_loss(student(x), y)
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    handler.attach(trainer)
    return student, optimizer, handler, trainer


def _resume_data() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(5)]


def _checkpointed(
    student: nn.Module, optimizer: torch.optim.Optimizer, handler: Handler, trainer: Engine
) -> dict[str, Any]:
    objects: dict[str, Any] = {"trainer": trainer, "model": student, "optimizer": optimizer}
    if hasattr(handler, "state_dict"):
        objects["ema"] = handler
    else:
        # Upstream has no state to save: its docs checkpoint the EMA model.
        objects["ema_model"] = handler.ema_model
    return objects


def _published_momenta(trainer: Engine) -> dict[int, float]:
    momenta: dict[int, float] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: momenta.__setitem__(e.state.iteration, e.state.ema_momentum)
    )
    return momenta


def _ema_tensors(handler: Handler) -> dict[str, Tensor]:
    return dict(handler.ema_model.state_dict())


@pytest.mark.parametrize(
    "handler_cls",
    both_handlers(
        "the warm-up lives in a scheduler whose event counter is not saved: after a resume it restarts "
        "from momentum_warmup instead of continuing"
    ),
)
def test_warmup_continues_after_resume(handler_cls: HandlerClass, tmp_path: Path) -> None:
    data = _resume_data()
    total_epochs = 2

    _, _, uninterrupted, uninterrupted_trainer = _training_run(handler_cls)
    uninterrupted_trainer.run(data, max_epochs=total_epochs, epoch_length=_EPOCH_LENGTH)

    objects = _checkpointed(*_training_run(handler_cls))
    first_trainer = objects["trainer"]
    checkpoint = Checkpoint(objects, DiskSaver(str(tmp_path), require_empty=False), n_saved=1)
    first_trainer.add_event_handler(Events.COMPLETED, checkpoint)
    first_trainer.run(data, max_epochs=1, epoch_length=_EPOCH_LENGTH)
    assert checkpoint.last_checkpoint is not None

    student, optimizer, resumed, trainer = _training_run(handler_cls)
    Checkpoint.load_objects(_checkpointed(student, optimizer, resumed, trainer), checkpoint.last_checkpoint)
    momenta = _published_momenta(trainer)
    trainer.run(data, max_epochs=total_epochs, epoch_length=_EPOCH_LENGTH)

    # Iterations 6..10 must use the momenta of a run that never stopped.
    iterations = range(_EPOCH_LENGTH + 1, total_epochs * _EPOCH_LENGTH + 1)
    assert list(momenta) == list(iterations)
    expected = [linear_warmup(i, _RESUME_MOMENTUM_WARMUP, _RESUME_MOMENTUM, _RESUME_WARMUP_ITERS) for i in iterations]
    assert list(momenta.values()) == pytest.approx(expected, rel=1e-12)

    # Same data, same order, same momenta: nothing may differ, not even rounding.
    want = _ema_tensors(uninterrupted)
    got = _ema_tensors(resumed)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), f"EMA tensor {name} differs from the uninterrupted run"
