"""The mean-teacher trainer: losses, ramp-up, the teacher's gradients and mode, and the digits demo."""

from __future__ import annotations

import collections
import copy
import math
import re
import subprocess
import sys
import warnings

import pytest
import torch
from ignite.engine import Engine, Events, create_supervised_evaluator
from torch import Tensor, nn

from examples.mean_teacher import create_mean_teacher_trainer, select_items, sigmoid_rampup
from examples.mean_teacher.digits import run_once
from ignite_ema import EMAHandler


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _batches(n: int, labelled_rows: int = 3) -> list[tuple[Tensor, Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 4, generator=gen), torch.randint(3, (8,), generator=gen), torch.arange(8) < labelled_rows)
        for _ in range(n)
    ]


def test_ramp_is_the_sigmoid_schedule() -> None:
    # exp(-5 (1 - t)^2): t = 0 gives e^-5, t = 0.3 gives e^-2.45; clipped at t = 1; a length of 0 means no ramp
    cases = {(0, 10): 0.006737946999085467, (3, 10): 0.0862935864993705, (10, 10): 1.0, (25, 10): 1.0, (7, 0): 1.0}
    for (step, length), expected in cases.items():
        assert sigmoid_rampup(step, length) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["copy", "update", "ema_train"])
def test_one_step_matches_a_hand_computed_mean_teacher_step(mode: str) -> None:
    student = _bn_model()
    handler = EMAHandler(student, momentum=0.1, handle_buffers=mode)
    reference_student = copy.deepcopy(student)
    reference_teacher = copy.deepcopy(handler.ema_model).train(mode == "ema_train")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    trainer = create_mean_teacher_trainer(
        student, handler, optimizer, nn.functional.cross_entropy, consistency_weight=4.0, rampup_iters=10
    )
    (batch,) = _batches(1)
    outputs: list[dict[str, float]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the EMA model ran forward passes")  # the teacher warning in eval modes
        trainer.run([batch], max_epochs=1)

    x, y, labelled = batch
    out = reference_student(x)
    with torch.no_grad():
        target = reference_teacher(x)
    sup = nn.functional.cross_entropy(out[labelled], y[labelled])  # the first 3 rows
    cons = ((out.softmax(1) - target.softmax(1)) ** 2).mean()
    weight = 4.0 * math.exp(-5.0)  # first iteration: t = 0
    (sup + weight * cons).backward()
    (result,) = outputs
    assert result["supervised_loss"] == pytest.approx(sup.item(), rel=1e-6)
    assert result["consistency_loss"] == pytest.approx(cons.item(), rel=1e-6)
    assert result["consistency_weight"] == pytest.approx(weight)
    assert result["loss"] == pytest.approx((sup + weight * cons).item(), rel=1e-6)
    with torch.no_grad():
        for p, ref in zip(student.parameters(), reference_student.parameters(), strict=True):
            torch.testing.assert_close(p, ref - 0.1 * ref.grad)


def test_consistency_weight_follows_the_ramp_over_iterations() -> None:
    student = _bn_model()
    handler = EMAHandler(student, momentum=0.1, handle_buffers="ema_train")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    trainer = create_mean_teacher_trainer(
        student, handler, optimizer, nn.functional.cross_entropy, consistency_weight=2.0, rampup_iters=4
    )
    weights: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: weights.append(e.state.output["consistency_weight"])
    )
    trainer.run(_batches(6), max_epochs=1)
    assert weights == pytest.approx([2.0 * math.exp(-5 * (1 - t / 4) ** 2) for t in (0, 1, 2, 3)] + [2.0, 2.0])


def test_a_batch_without_labels_has_zero_supervised_loss() -> None:
    student = _bn_model()
    handler = EMAHandler(student, momentum=0.1, handle_buffers="ema_train")
    trainer = create_mean_teacher_trainer(
        student,
        handler,
        torch.optim.SGD(student.parameters(), lr=0.01),
        nn.functional.cross_entropy,
        teacher_noise=lambda x: x + 1.0,  # else teacher and student agree exactly at the first step
    )
    trainer.run(_batches(1, labelled_rows=0), max_epochs=1)
    assert trainer.state.output["supervised_loss"] == 0.0
    assert trainer.state.output["consistency_loss"] > 0.0


def test_teacher_gets_no_gradients_and_follows_the_student() -> None:
    student = _bn_model()
    handler = EMAHandler(student, momentum=0.5, handle_buffers="ema_train")
    teacher_before = copy.deepcopy(handler.ema_model)
    grad_enabled_in_teacher: list[bool] = []
    handler.ema_model.register_forward_hook(lambda *_: grad_enabled_in_teacher.append(torch.is_grad_enabled()))
    trainer = create_mean_teacher_trainer(
        student, handler, torch.optim.SGD(student.parameters(), lr=0.1), nn.functional.cross_entropy
    )
    trainer.run(_batches(3), max_epochs=1)
    teacher = handler.ema_model
    assert grad_enabled_in_teacher == [False] * 3  # the targets build no autograd graph
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not torch.equal(teacher[0].weight, teacher_before[0].weight)  # it moved, by the EMA


@pytest.mark.parametrize(("mode", "expected"), [("copy", False), ("update", False), ("ema_train", True)])
@pytest.mark.filterwarnings("ignore:the EMA model ran forward passes")
def test_teacher_runs_in_the_mode_its_handler_intends_even_after_evaluation(mode: str, expected: bool) -> None:
    student = _bn_model()
    handler = EMAHandler(student, momentum=0.1, handle_buffers=mode)
    teacher = handler.ema_model
    trainer = create_mean_teacher_trainer(
        student, handler, torch.optim.SGD(student.parameters(), lr=0.01), nn.functional.cross_entropy
    )
    modes: list[bool] = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    evaluator = create_supervised_evaluator(teacher)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run([(x, y) for x, y, _ in _batches(1)]))
    trainer.run(_batches(2), max_epochs=2)
    # trainer forwards: 2 per epoch; evaluator forwards (always eval): 1 after each epoch
    assert modes == [expected, expected, False, expected, expected, False]


def test_supervised_baseline_runs_without_a_teacher() -> None:
    student = _bn_model()
    trainer = create_mean_teacher_trainer(
        student, None, torch.optim.SGD(student.parameters(), lr=0.1), nn.functional.cross_entropy
    )
    trainer.run(_batches(2), max_epochs=1)
    assert trainer.state.output["consistency_weight"] == 0.0
    assert trainer.state.output["consistency_loss"] == 0.0


def test_bad_batches_and_mismatched_handlers_are_rejected() -> None:
    student = _bn_model()
    other = EMAHandler(_bn_model())
    with pytest.raises(ValueError, match="built on this student"):
        create_mean_teacher_trainer(student, other, torch.optim.SGD(student.parameters(), lr=0.1), nn.MSELoss())

    def trainer() -> Engine:
        return create_mean_teacher_trainer(
            student, None, torch.optim.SGD(student.parameters(), lr=0.1), nn.functional.cross_entropy
        )

    with pytest.raises(TypeError, match=r"is \(x, y, labelled\)"):
        trainer().run([(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))], max_epochs=1)
    with pytest.raises(TypeError, match="labelled must be a 1-d bool tensor"):
        trainer().run([(torch.randn(8, 4), torch.zeros(8, dtype=torch.long), torch.ones(8))], max_epochs=1)


def test_select_items_handles_nested_outputs() -> None:
    frames, clips = torch.arange(12.0).reshape(3, 4), torch.arange(3.0)
    mask = torch.tensor([True, False, True])
    got = select_items({"pair": (frames, clips)}, mask)
    assert torch.equal(got["pair"][0], frames[[0, 2]]) and torch.equal(got["pair"][1], clips[[0, 2]])
    Output = collections.namedtuple("Output", "frames clips")  # e.g. a model returning a named tuple
    named = select_items(Output(frames, clips), mask)
    assert isinstance(named, Output) and torch.equal(named.frames, frames[[0, 2]])
    with pytest.raises(TypeError, match="found str"):
        select_items("frames", mask)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_short_digits_run_beats_chance() -> None:
    result = run_once("ema_train", seed=0, iterations=150, labels_per_class=10, progress=False)
    assert result.teacher is not None
    assert result.student > 0.5 and result.teacher > 0.5  # chance is 0.1


@pytest.mark.slow
def test_the_digits_demo_runs_on_two_processes() -> None:
    # The command a user types, in a fresh interpreter: it starts 2 gloo processes through idist.Parallel.
    command = ["--iters", "150", "--seeds", "1", "--runs", "ema_train", "--nproc", "2", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "examples.mean_teacher", *command], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = re.search(r"\| ema_train \| 1 \| ([0-9.]+) \| ([0-9.]+) \|", done.stdout)  # one seed: no spread
    assert row is not None, done.stdout
    assert float(row[1]) > 50 and float(row[2]) > 50  # student and teacher accuracy in %, chance is 10
