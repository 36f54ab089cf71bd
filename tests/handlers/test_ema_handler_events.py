"""EMAHandler's life on engines: attach, repeated runs and resumes, evaluating with EMA weights, warnings, options.

Expected momenta and averages are closed forms or plain loops written here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from enum import Enum

import numpy as np
import pytest
import torch
from ignite.engine import Engine, EventEnum, Events, create_supervised_evaluator
from ignite.handlers import Checkpoint
from ignite.metrics import Loss
from torch import nn

from ignite_ema import EMAHandler, ModelEMA
from tests.helpers import BNNet, adding_step, image_batches, linear, no_warnings


def _momenta(trainer: Engine, name: str = "ema_momentum") -> dict[int, float | None]:
    seen: dict[int, float | None] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.__setitem__(e.state.iteration, getattr(e.state, name))
    )
    return seen


# ----------------------------------------------------------------------------- attach


def test_a_handler_belongs_to_one_engine() -> None:
    handler = EMAHandler(linear(), half_life=10)
    first, second = Engine(lambda e, b: None), Engine(lambda e, b: None)
    handler.attach(first)
    for engine, where in ((second, "another engine"), (first, "this engine")):
        with pytest.raises(RuntimeError, match=f"this EMAHandler is attached to {where} already"):
            handler.attach(engine, name="other_momentum")
    assert not hasattr(second.state, "other_momentum") and not second._event_handlers


def test_a_failed_attach_changes_nothing_and_a_retry_registers_once() -> None:
    handler = EMAHandler(linear(), momentum=0.5)
    trainer = Engine(lambda e, b: None)
    with pytest.raises(ValueError, match="is not a valid event"):
        handler.attach(trainer, event="not an event")
    assert not trainer._event_handlers and not hasattr(trainer.state, "ema_momentum")
    handler.attach(trainer)
    assert [len(trainer._event_handlers[e]) for e in (Events.STARTED, Events.ITERATION_STARTED)] == [1, 1]
    trainer.run(range(2), max_epochs=1)
    assert handler.state_dict()["num_averaged"] == 2


def test_the_momentum_published_before_the_first_update_is_zero_not_one_never_applied() -> None:
    # With every=3 the first update comes at iteration 3, with delta = 3: nothing is applied at 1 and 2, which
    # publish 0.0 (a number for loggers), not the 1-iteration momentum that no update uses.
    handler = EMAHandler(linear(), half_life=6)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=3))
    seen = _momenta(trainer)
    trainer.run(range(6), max_epochs=1)
    assert seen[1] == 0.0 and seen[2] == 0.0
    assert seen[3] == pytest.approx(1 - 0.5 ** (3 / 6)) and seen[6] == pytest.approx(1 - 0.5 ** (3 / 6))
    constant = EMAHandler(linear(), momentum=0.25)
    other = Engine(lambda e, b: None)
    constant.attach(other)
    assert other.state.ema_momentum == 0.25  # as Ignite publishes it: known before any update


# ----------------------------------------------------------------------------- runs and resumes


def test_a_second_run_does_not_replay_the_start_phase_or_the_warmup() -> None:
    # Rule: warm-ups and the start phase happen once per handler. The second run's first update continues the
    # handler's clock from its last update (4): its iterations are 5, 6, 7, linear warm-up indices 3, 4, 5.
    model = linear(0.0)
    handler = EMAHandler(model, momentum=0.5, momentum_warmup=0.0, warmup_iters=5, start_iteration=2)
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    first = _momenta(trainer)
    trainer.run(range(4), max_epochs=1)
    assert first == pytest.approx({1: 1.0, 2: 1.0, 3: 0.0, 4: 0.125})
    applied = list(first.values())  # the recorder stays attached and overwrites keys 1-3 in the second run
    second = _momenta(trainer)
    trainer.run(range(3), max_epochs=1)  # Ignite restarts the engine's count: iterations 1, 2, 3 again
    assert second == pytest.approx({1: 0.25, 2: 0.375, 3: 0.5})
    ema, student = 0.0, 0.0
    for m in [*applied, *second.values()]:
        student += 1.0
        ema = (1 - m) * ema + m * student  # type: ignore[operator]
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), ema))


def test_a_second_run_with_a_half_life_counts_delta_on_the_handlers_clock() -> None:
    model = linear(0.0)
    handler = EMAHandler(model, half_life=4)
    nn.init.constant_(model.weight, 1.0)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=2))
    seen = _momenta(trainer)
    trainer.run(range(6), max_epochs=1)
    trainer.run(range(4), max_epochs=1)
    assert all(m is None or m == pytest.approx(1 - 0.5 ** (2 / 4)) for m in seen.values())
    # 5 updates of delta 2: the student has been 1 for 10 iterations of the handler's clock
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), 1 - 0.5 ** (10 / 4)), rtol=1e-6, atol=0)


def test_resuming_a_trainer_without_the_handlers_state_counts_delta_from_the_resume_and_warns() -> None:
    model = linear(0.0)
    trainer = Engine(lambda e, b: None)
    trainer.load_state_dict({"iteration": 500, "epoch_length": 1000, "max_epochs": 1})  # as Checkpoint would
    handler = EMAHandler(model, half_life=10)  # model and EMA model restored elsewhere; the handler's state not
    nn.init.constant_(model.weight, 1.0)
    handler.attach(trainer)
    seen = _momenta(trainer)
    with pytest.warns(UserWarning, match="resumes at iteration 500, but this EMAHandler has never updated") as rec:
        trainer.run(range(1000), max_epochs=1, epoch_length=1000)
    assert seen[501] == pytest.approx(1 - 0.5 ** (1 / 10))  # not 1 - 0.5 ** (501 / 10)
    assert rec[0].filename == __file__


def test_a_restored_handler_that_had_not_updated_yet_is_not_warned_about() -> None:
    source = EMAHandler(linear(), momentum=0.5)
    handler = EMAHandler(linear(), momentum=0.5)
    handler.load_state_dict(source.state_dict())
    trainer = Engine(lambda e, b: None)
    trainer.load_state_dict({"iteration": 3, "epoch_length": 5, "max_epochs": 1})
    handler.attach(trainer)
    with no_warnings():
        trainer.run(range(5), max_epochs=1)


def test_a_student_converted_after_the_handler_was_built_is_an_error_at_run_start() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)
    model.double()
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    with pytest.raises(ValueError, match=r"the student's tensor 'conv.weight' is torch.float64 now, torch.float32"):
        trainer.run(range(2), max_epochs=1)


def test_a_bf16_ema_model_restored_by_ignites_checkpoint_pattern_is_what_the_next_run_averages_from() -> None:
    model = linear(0.0, torch.bfloat16)
    handler = EMAHandler(model, momentum=0.5)
    restored = linear(3.0, torch.bfloat16).state_dict()  # as Checkpoint.load_objects({"ema_model": ...}) would
    handler.ema_model.load_state_dict(restored)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    with pytest.warns(UserWarning, match="'weight' .* written from outside the EMA"):
        trainer.run(range(1), max_epochs=1)
    assert torch.equal(handler.ema_model.weight, torch.full((1, 2), 1.5, dtype=torch.bfloat16))  # 0.5 * 3 + 0.5 * 0


def test_a_write_through_data_into_a_bf16_ema_model_between_runs_is_where_the_next_run_goes_on_from() -> None:
    # A write through .data leaves the version counter alone: only the comparison at the run's start sees it.
    model = linear(0.0, torch.bfloat16)
    handler = EMAHandler(model, momentum=0.5)
    nn.init.constant_(model.weight, 1.0)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    trainer.run(range(1), max_epochs=1)
    assert torch.equal(handler.ema_model.weight, torch.full((1, 2), 0.5, dtype=torch.bfloat16))
    handler.ema_model.weight.data[...] = 3.0
    with pytest.warns(UserWarning, match="'weight' .* written from outside the EMA"):
        trainer.run(range(2), max_epochs=1)
    # 3 -> 0.5 * 3 + 0.5 * 1 = 2 -> 1.5; from the float32 shadow's 0.5 instead it would be 0.75 -> 0.875
    assert torch.equal(handler.ema_model.weight, torch.full((1, 2), 1.5, dtype=torch.bfloat16))
    assert torch.equal(handler.state_dict()["tensors"]["weight"], torch.full((1, 2), 1.5))


def test_a_trainer_rolled_back_to_an_earlier_iteration_goes_on_one_iteration_after_the_last_update() -> None:
    model = linear(0.0)
    handler = EMAHandler(model, half_life=10)
    nn.init.constant_(model.weight, 1.0)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    seen = _momenta(trainer)
    trainer.run(range(10), max_epochs=1)
    trainer.load_state_dict({"iteration": 5, "epoch_length": 10, "max_epochs": 1})  # an older trainer checkpoint
    with no_warnings():
        trainer.run(range(10), max_epochs=1)  # iterations 6 to 10 again
    # The handler's clock goes on from its last update (10): iteration 6 is one iteration later, delta 1
    # (1 - 0.5 ** 0.1 = 0.067), not the delta 6 of an offset that forgets the engine's iteration (0.340).
    assert seen[6] == pytest.approx(1 - 0.5 ** (1 / 10), rel=1e-12)
    assert all(seen[i] == pytest.approx(1 - 0.5 ** (1 / 10), rel=1e-12) for i in range(6, 11))
    # 15 updates of delta 1 on a student that is 1 throughout
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), 1 - 0.5 ** (15 / 10)), rtol=1e-6, atol=0)
    state = handler.state_dict()
    assert (state["num_averaged"], state["last_update_iteration"], state["iteration_offset"]) == (15, 15, 5)


# ----------------------------------------------------------------------------- warm-ups and options


def test_power_warmup_on_an_engine_gives_timms_decays() -> None:
    # timm's ModelEmaV3(decay=0.99, use_warmup=True, warmup_gamma=2, warmup_power=0.5).get_decay(step) for
    # steps 1..5: 0 (a copy), then 1 - (1 + (s - 1) / 2) ** -0.5 = 1 - 1.5 ** -0.5, 1 - 2 ** -0.5, 1 - 2.5 ** -0.5, ...
    handler = EMAHandler(linear(), momentum=0.01, power_warmup=(2, 0.5), start_iteration=1)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    seen = _momenta(trainer)
    trainer.run(range(5), max_epochs=1)
    assert list(seen.values()) == pytest.approx([1.0, 1.5**-0.5, 2.0**-0.5, 2.5**-0.5, 3.0**-0.5], rel=1e-12)


def test_power_warmup_counts_averaging_updates_not_iterations() -> None:
    # Updates every 3 iterations, the first (iteration 3) a copy: the averaging updates at 6, 9, 12 are the 1st,
    # 2nd and 3rd, so the ramp gives 1/2, 1/3, 1/4 (counting iterations since the start would give 1/4, 1/7, 1/10).
    model = linear(0.0)
    handler = EMAHandler(model, momentum=0.01, mean_teacher_warmup=True, start_iteration=3)
    trainer = Engine(adding_step(model))  # the student is i at iteration i
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=3))
    seen = _momenta(trainer)
    trainer.run(range(12), max_epochs=1)
    assert [seen[i] for i in (3, 6, 9, 12)] == pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4], rel=1e-12)
    # the ramp's EMA is the plain average of the students it has seen: (3 + 6 + 9 + 12) / 4
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), 7.5))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"power_warmup": (0, 1)}, ValueError, r"power_warmup \(gamma, power\) must both be positive"),
        ({"power_warmup": (1, -2)}, ValueError, "power_warmup"),
        ({"power_warmup": ("1", 1)}, TypeError, "power_warmup's gamma must be a real number; found str"),
        ({"power_warmup": 2.0}, TypeError, r"power_warmup must be a pair \(gamma, power\)"),
        ({"power_warmup": (1, 1), "mean_teacher_warmup": True}, ValueError, "choose one warm-up: power_warmup"),
        ({"power_warmup": (1, 1), "momentum_warmup": 0.1, "warmup_iters": 3}, ValueError, "power_warmup"),
        ({"mean_teacher_warmup": "yes"}, TypeError, "mean_teacher_warmup must be True or False; found str"),
        ({"momentum": np.float32(1.5)}, ValueError, "Invalid momentum"),
        ({"name": 3}, TypeError, "unexpected keyword"),
    ],
)
def test_bad_warmups_and_flags_are_refused_naming_them(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        EMAHandler(linear(), **kwargs)  # type: ignore[arg-type]


def test_numpy_numbers_are_accepted_as_their_python_kinds() -> None:
    model = linear(0.0)
    handler = EMAHandler(
        model, np.float32(0.5), np.float64(0.0), np.int64(3), start_iteration=np.int32(1)
    )  # momentum, momentum_warmup, warmup_iters
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    seen = _momenta(trainer)
    trainer.run(range(4), max_epochs=1)
    assert seen == pytest.approx({1: 1.0, 2: 0.0, 3: 0.25, 4: 0.5})
    halving = EMAHandler(linear(), half_life=np.float32(8.0))  # type: ignore[arg-type]
    other = Engine(lambda e, b: None)
    halving.attach(other)
    other.run(range(1), max_epochs=1)
    assert other.state.ema_momentum == pytest.approx(1 - 0.5 ** (1 / 8), rel=1e-12)


def test_a_momentum_that_looks_like_a_decay_is_warned_about_at_the_callers_line() -> None:
    with pytest.warns(UserWarning, match=r"pass momentum=0.0001: decay = 1 - momentum") as record:
        EMAHandler(linear(), momentum=0.9999)
    assert record[0].filename == __file__
    with no_warnings():
        EMAHandler(linear(), momentum=0.5)


# ----------------------------------------------------------------------------- teacher detection


class _StepEvents(EventEnum):
    BEFORE_TEACHER = "before_teacher"


def _teacher_trainer(model: BNNet, handler: EMAHandler, fire_custom: bool) -> Engine:
    def step(engine: Engine, batch: torch.Tensor) -> None:
        model(batch)
        if fire_custom:
            engine.fire_event(_StepEvents.BEFORE_TEACHER)
        with torch.no_grad():
            handler.ema_model(batch)

    trainer = Engine(step)
    trainer.register_events(*_StepEvents)
    return trainer


def test_a_teacher_is_seen_even_when_the_step_fires_a_custom_event_first() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)
    trainer = _teacher_trainer(model, handler, fire_custom=True)
    handler.attach(trainer)
    with pytest.warns(UserWarning, match="handle_buffers='ema_train' so the teacher") as record:
        trainer.run(image_batches(2), max_epochs=1)
    assert record[0].filename == __file__  # the trainer.run line, not the package


def test_an_ema_train_teacher_behind_a_custom_event_gets_no_false_warning() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, handle_buffers="ema_train")
    trainer = _teacher_trainer(model, handler, fire_custom=True)
    handler.attach(trainer)
    with no_warnings():
        trainer.run(image_batches(3), max_epochs=1)


def test_an_ema_train_teacher_that_stops_running_after_the_first_iteration_is_warned_about() -> None:
    # A consistency term switched off after iteration 1: from then on the teacher's statistics do not move.
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, handle_buffers="ema_train")

    def step(engine: Engine, batch: torch.Tensor) -> None:
        model(batch)
        if engine.state.iteration == 1:
            with torch.no_grad():
                handler.ema_model(batch)

    trainer = Engine(step)
    handler.attach(trainer)
    with pytest.warns(UserWarning, match="it ran none during training iterations since the last update") as record:
        trainer.run(image_batches(3), max_epochs=1)
    assert len(record) == 1 and record[0].filename == __file__


def test_an_evaluator_on_iteration_completed_attached_before_the_handler_is_no_teacher() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)
    trainer = Engine(lambda engine, batch: model(batch))
    evaluator = create_supervised_evaluator(handler.ema_model)
    labelled = [(x, torch.zeros(8, dtype=torch.long)) for x in image_batches(1)]
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda: evaluator.run(labelled))  # before attach
    handler.attach(trainer)
    with no_warnings():
        trainer.run(image_batches(2), max_epochs=1)


def test_after_a_run_with_a_teacher_the_ema_model_is_a_plain_module() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, handle_buffers="ema_train")
    trainer = _teacher_trainer(model, handler, fire_custom=False)
    handler.attach(trainer)
    hooks_in_step: list[int] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda: hooks_in_step.append(len(handler.ema_model._forward_hooks))
    )
    trainer.run(image_batches(2), max_epochs=1)
    assert hooks_in_step == [0, 0]  # taken off after each step, before other handlers of ITERATION_COMPLETED
    torch.save(handler.ema_model, io.BytesIO())
    torch.jit.script(handler.ema_model)
    clone = copy.deepcopy(handler.ema_model)
    assert not clone._forward_hooks


# ----------------------------------------------------------------------------- evaluating the student with EMA weights


def _trained(mode: str = "copy") -> tuple[BNNet, EMAHandler, Engine]:
    torch.manual_seed(0)
    model = BNNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    handler = EMAHandler(model, momentum=0.3, handle_buffers=mode)

    def step(engine: Engine, x: torch.Tensor) -> None:
        model.train()
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    trainer = Engine(step)
    handler.attach(trainer)
    return model, handler, trainer


def _loss_evaluator(model: nn.Module) -> Engine:
    return create_supervised_evaluator(model, {"loss": Loss(lambda y_pred, y: y_pred.square().mean())})


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_an_evaluator_sees_ema_weights_and_a_checkpoint_never_saves_a_swapped_student(checkpoint_first: bool) -> None:
    model, handler, trainer = _trained()
    evaluator, reference = _loss_evaluator(model), _loss_evaluator(handler.ema_model)
    handler.swap_during(evaluator)
    data = [(x, x) for x in image_batches(2, seed=7)]
    saved: list[dict[str, torch.Tensor]] = []
    found: list[tuple[float, float]] = []

    class _Saver:  # a Checkpoint's save_handler that keeps what it was given
        def __call__(self, checkpoint: dict[str, dict[str, torch.Tensor]], filename: str, metadata: object) -> None:
            saved.append({k: v.clone() for k, v in checkpoint.items()})  # one object: its state_dict itself

    def checkpoint() -> None:
        Checkpoint({"model": model}, _Saver(), n_saved=None)(trainer)

    def evaluate() -> None:
        found.append((evaluator.run(data).metrics["loss"], reference.run(data).metrics["loss"]))

    for handler_fn in (checkpoint, evaluate) if checkpoint_first else (evaluate, checkpoint):
        trainer.add_event_handler(Events.EPOCH_COMPLETED, handler_fn)
    own: list[dict[str, torch.Tensor]] = []
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda: own.append({k: v.clone() for k, v in model.state_dict().items()})
    )
    trainer.run(image_batches(3), max_epochs=2)
    for student_on_ema, ema_model in found:
        assert student_on_ema == pytest.approx(ema_model, rel=1e-6)
    assert len(saved) == 2
    for checkpointed, student in zip(saved, own, strict=True):
        for name, tensor in student.items():
            assert torch.equal(checkpointed[name], tensor), name


def test_a_raising_evaluator_gives_the_student_back_and_its_exception_goes_on() -> None:
    model, handler, trainer = _trained()
    trainer.run(image_batches(2), max_epochs=1)
    own = {k: v.clone() for k, v in model.state_dict().items()}

    def failing(engine: Engine, batch: object) -> None:
        raise ArithmeticError("bad batch")

    evaluator = Engine(failing)
    handler.swap_during(evaluator)
    with pytest.raises(ArithmeticError, match="bad batch"):
        evaluator.run([0])
    for name, tensor in own.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    swallowed: list[BaseException] = []
    evaluator = Engine(failing)  # Ignite does not run a finished engine again
    handler.swap_during(evaluator)
    evaluator.add_event_handler(Events.EXCEPTION_RAISED, lambda e, error: swallowed.append(error))
    evaluator.run([0])  # the user's own EXCEPTION_RAISED handler decides: here it swallows
    assert len(swallowed) == 1
    for name, tensor in own.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    trainer.run(image_batches(2), max_epochs=2)  # updates work again: nothing is left swapped


def test_a_terminated_evaluator_gives_the_student_back() -> None:
    model, handler, trainer = _trained()
    trainer.run(image_batches(2), max_epochs=1)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v.clone() for k, v in handler.ema_model.state_dict().items()}  # taken before any swap
    assert not torch.equal(own["head.weight"], ema["head.weight"])  # so that a swap shows

    def holds(module: nn.Module, values: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(module.state_dict()[k], v) for k, v in values.items())

    inside: list[tuple[bool, bool]] = []
    evaluator = Engine(lambda e, b: inside.append((holds(model, ema), holds(handler.ema_model, own))))
    handler.swap_during(evaluator)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: e.terminate())
    evaluator.run(range(5))
    assert inside == [(True, True)] * 2  # inside, the student holds the EMA's values and the EMA model the student's
    for name, tensor in own.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_handler_swapped_and_a_caller_built_ema_model() -> None:
    torch.manual_seed(0)
    model = BNNet()
    mine = BNNet()
    handler = EMAHandler(model, momentum=0.5, ema_model=mine, handle_buffers="ema_train")
    assert handler.ema_model is mine
    initial = {k: v.clone() for k, v in model.state_dict().items()}  # mine holds copies of these now
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    with pytest.warns(UserWarning, match="ran none during training iterations"):  # no teacher forward here
        trainer.run(range(1), max_epochs=1)
    # One update at momentum 0.5 after the student's parameters grew by 1: the EMA's are the initial ones + 0.5.
    # Buffers are the EMA model's own in "ema_train" and nothing ran forward: both keep the initial ones.
    params = {n for n, _ in model.named_parameters()}
    ema = {k: v + 0.5 if k in params else v for k, v in initial.items()}
    student = {k: v + 1.0 if k in params else v for k, v in initial.items()}
    for inside in (True, False):
        with handler.swapped() if inside else contextlib.nullcontext():
            here, there = (ema, student) if inside else (student, ema)
            for name in initial:
                torch.testing.assert_close(model.state_dict()[name], here[name], rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(mine.state_dict()[name], there[name], rtol=1e-6, atol=1e-6)


def test_swap_during_needs_an_engine() -> None:
    with pytest.raises(TypeError, match="swap_during expects an ignite Engine; found Enum"):
        EMAHandler(linear()).swap_during(Enum("E", "A"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- devices


def test_an_ema_placed_with_device_follows_its_student_to_another_device_and_one_built_beside_it_refuses() -> None:
    # The meta device stands for a second device (the GPU that the student trains on); rebind() is what
    # EMAHandler calls when a run starts. No update runs here: nothing can be read from meta tensors.
    placed_student = linear(1.0)
    placed = ModelEMA(placed_student, device="cpu")  # the documented way to keep the EMA elsewhere
    placed_student.to("meta")
    placed.rebind()
    assert placed.ema_model is not None and placed.ema_model.weight.device == torch.device("cpu")
    beside_student = linear(1.0)
    beside = ModelEMA(beside_student)
    beside_student.to("meta")
    with pytest.raises(ValueError, match="the student's tensor 'weight' moved from cpu to meta after the EMA was"):
        beside.rebind()


def test_warnings_are_not_repeated_by_a_second_evaluator_run() -> None:
    model, handler, trainer = _trained()
    trainer.run(image_batches(2), max_epochs=1)
    evaluator = _loss_evaluator(model)
    handler.swap_during(evaluator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            evaluator.run([(x, x) for x in image_batches(1)])
