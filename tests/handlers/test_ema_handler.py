"""EMAHandler on real Ignite engines, against plain-loop references and closed forms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events, create_supervised_evaluator
from torch import nn

from ignite_ema import EMAHandler
from tests.helpers import BNNet, adding_step, image_batches, linear, no_warnings

# ----------------------------------------------------------------------------- averaging and momentum


@pytest.mark.parametrize("every", [1, 3])
def test_weights_follow_a_plain_loop_with_a_filter(every: int) -> None:
    model = linear()
    handler = EMAHandler(model, momentum=0.3)
    trainer = Engine(adding_step(model))
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=every))
    trainer.run(range(5), max_epochs=2)

    ema, student = 1.0, 1.0
    for iteration in range(1, 11):
        student += 1.0
        if iteration % every == 0:
            ema = 0.7 * ema + 0.3 * student
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), ema))
    assert trainer.state.ema_momentum == 0.3


@pytest.mark.parametrize("every", [1, 2, 5])
def test_half_life_keeps_the_time_constant_under_every_k(every: int) -> None:
    # The student jumps from 0 to 1 right after the handler is built; after t
    # iterations the EMA must be 1 - 0.5 ** (t / H), whatever the update period.
    model = linear(0.0)
    handler = EMAHandler(model, half_life=20)
    nn.init.constant_(model.weight, 1.0)
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=every))
    trainer.run(range(60), max_epochs=1)
    expected = 1 - 0.5 ** (60 / 20)
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), expected), rtol=1e-6, atol=0)
    assert trainer.state.ema_momentum == pytest.approx(1 - 0.5 ** (every / 20))


@pytest.mark.parametrize(("spec", "iterations"), [("3ep", 30), ("0.25dur", 20), ("7it", 7), (7, 7)])
def test_half_life_units_are_resolved_when_the_run_starts(spec: str | int, iterations: int) -> None:
    model = linear()
    handler = EMAHandler(model, half_life=spec)
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer, name="teacher_momentum")
    seen: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.teacher_momentum))
    trainer.run(range(10), max_epochs=8)
    assert handler.momentum == pytest.approx(1 - 0.5 ** (1 / iterations))
    assert seen == pytest.approx([1 - 0.5 ** (1 / iterations)] * 80)


def test_linear_warmup_works_under_any_name_and_counts_iterations() -> None:
    model = linear()
    handler = EMAHandler(model, 0.5, 0.0, 5)
    trainer = Engine(adding_step(model))
    handler.attach(trainer, name="teacher_momentum", event=Events.ITERATION_COMPLETED(every=2))
    seen: dict[int, float] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(every=2), lambda e: seen.__setitem__(e.state.iteration, e.state.teacher_momentum)
    )
    trainer.run(range(8), max_epochs=1)
    # Ignite's rule at the iteration of each update: 0 + 0.5 * (i - 1) / 4, then 0.5.
    expected = {2: 0.125, 4: 0.375, 6: 0.5, 8: 0.5}
    assert seen == pytest.approx(expected)
    ema, student = 1.0, 1.0
    for iteration in range(1, 9):
        student += 1.0
        if iteration in expected:
            ema = (1 - expected[iteration]) * ema + expected[iteration] * student
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), ema))


def test_mean_teacher_warmup_is_the_plain_average_until_it_reaches_momentum() -> None:
    model = linear(0.0)
    handler = EMAHandler(model, momentum=0.1, mean_teacher_warmup=True)
    values = [3.0, -1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    trainer = Engine(lambda engine, batch: nn.init.constant_(model.weight, values[engine.state.iteration - 1]))
    handler.attach(trainer)
    averages: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda: averages.append(handler.ema_model.weight[0, 0].item())
    )
    trainer.run(range(len(values)), max_epochs=1)
    # 1/(n+1) >= 0.1 for n <= 9: every update here is the plain average of the initial 0 and the students so far.
    expected = [sum([0.0, *values[:n]]) / (n + 1) for n in range(1, len(values) + 1)]
    assert averages == pytest.approx(expected, rel=1e-6)


def test_start_iteration_copies_the_student_until_then() -> None:
    model = linear()
    handler = EMAHandler(model, momentum=0.5, start_iteration=3)
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    momenta: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: momenta.append(e.state.ema_momentum))
    trainer.run(range(5), max_epochs=1)
    assert momenta == [1.0, 1.0, 1.0, 0.5, 0.5]
    # copies up to the student of iteration 3 (value 4), then 4 -> 4.5 -> 5.25 with students 5 and 6
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), 5.25))


def test_two_handlers_with_their_own_names() -> None:
    model_a, model_b = linear(), linear()
    fast, slow = EMAHandler(model_a, momentum=0.5), EMAHandler(model_b, half_life=2)

    trainer = Engine(adding_step(nn.ModuleList([model_a, model_b])))
    fast.attach(trainer, "fast_momentum")
    slow.attach(trainer, "slow_momentum", event=Events.ITERATION_COMPLETED(every=2))
    trainer.run(range(4), max_epochs=1)
    assert trainer.state.fast_momentum == 0.5
    assert trainer.state.slow_momentum == pytest.approx(0.5)  # two iterations = one half-life
    torch.testing.assert_close(fast.ema_model.weight, torch.full((1, 2), 4.0625))
    torch.testing.assert_close(slow.ema_model.weight, torch.full((1, 2), 3.5))


# ----------------------------------------------------------------------------- buffer modes


def _train_bn(model: nn.Module, handler: EMAHandler, iterations: int = 4) -> list[dict[str, torch.Tensor]]:
    """Run the student on batches; return the student's buffers after each iteration."""
    data = image_batches(iterations)
    snapshots: list[dict[str, torch.Tensor]] = []

    def step(engine: Engine, batch: torch.Tensor) -> None:
        model(batch)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        snapshots.append({k: v.clone() for k, v in model.named_buffers()})

    trainer = Engine(step)
    handler.attach(trainer)
    trainer.run(data, max_epochs=1)
    return snapshots


def test_copy_mode_copies_buffers_by_value() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)
    snapshots = _train_bn(model, handler)
    ema_bn, student_bn = handler.ema_model.bn, model.bn
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ema_bn, name), snapshots[-1][f"bn.{name}"])
        assert getattr(ema_bn, name).data_ptr() != getattr(student_bn, name).data_ptr()
    model(image_batches(1, seed=9)[0])  # the student moves on; the EMA model must not
    assert torch.equal(ema_bn.running_mean, snapshots[-1]["bn.running_mean"])
    assert not handler.ema_model.training


def test_update_mode_averages_floating_buffers_and_copies_integer_ones() -> None:
    model = BNNet()
    initial = {k: v.clone() for k, v in model.named_buffers()}
    handler = EMAHandler(model, momentum=0.25, handle_buffers="update")
    snapshots = _train_bn(model, handler)
    expected = initial["bn.running_var"].clone()
    for snap in snapshots:
        expected = 0.75 * expected + 0.25 * snap["bn.running_var"]
    torch.testing.assert_close(handler.ema_model.bn.running_var, expected)
    assert torch.equal(handler.ema_model.bn.num_batches_tracked, snapshots[-1]["bn.num_batches_tracked"])
    assert handler.ema_model.bn.num_batches_tracked.data_ptr() != model.bn.num_batches_tracked.data_ptr()
    assert not handler.ema_model.training


def test_ema_train_mode_leaves_buffers_to_the_teachers_own_forward() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, handle_buffers="ema_train")
    teacher = handler.ema_model
    data = image_batches(3)
    expected_mean = teacher.bn.running_mean.clone()
    modes: list[bool] = []

    def step(engine: Engine, batch: torch.Tensor) -> None:
        nonlocal expected_mean
        model(batch)
        modes.append(teacher.training)
        with torch.no_grad():
            features = teacher.conv(batch)  # what the teacher's BN will see, with the teacher's weights
            expected_mean = 0.9 * expected_mean + 0.1 * features.mean(dim=(0, 2, 3))
            teacher(batch)

    trainer = Engine(step)
    handler.attach(trainer)
    with no_warnings():
        trainer.run(data, max_epochs=1)
    assert modes == [True, True, True]
    torch.testing.assert_close(teacher.bn.running_mean, expected_mean)
    assert teacher.bn.num_batches_tracked.item() == 3


def test_ema_train_teacher_is_back_in_train_mode_after_an_evaluator() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, handle_buffers="ema_train")
    teacher = handler.ema_model
    modes: list[bool] = []

    def step(engine: Engine, batch: torch.Tensor) -> None:
        with torch.no_grad():
            teacher(batch)
        modes.append(teacher.training)

    trainer = Engine(step)
    handler.attach(trainer)
    evaluator = create_supervised_evaluator(teacher)
    labelled = [(x, torch.zeros(8, dtype=torch.long)) for x in image_batches(2)]
    eval_modes: list[bool] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda: eval_modes.append(teacher.training))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run(labelled))
    trainer.run(image_batches(3), max_epochs=3)
    assert modes == [True] * 9
    assert eval_modes == [False] * 6


# ----------------------------------------------------------------------------- teacher warnings


def test_a_teacher_in_copy_mode_is_warned_about_once() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)

    def step(engine: Engine, batch: torch.Tensor) -> None:
        model(batch)
        with torch.no_grad():
            handler.ema_model(batch)

    trainer = Engine(step)
    handler.attach(trainer)
    with pytest.warns(UserWarning, match="handle_buffers='ema_train'") as record:
        trainer.run(image_batches(3), max_epochs=1)
    assert len([w for w in record if "ema_train" in str(w.message)]) == 1


def test_evaluating_the_ema_model_between_iterations_is_not_a_teacher() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)
    trainer = Engine(lambda engine, batch: model(batch))
    handler.attach(trainer)
    evaluator = create_supervised_evaluator(handler.ema_model)
    labelled = [(x, torch.zeros(8, dtype=torch.long)) for x in image_batches(2)]
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda: evaluator.run(labelled))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run(labelled))
    with no_warnings():
        trainer.run(image_batches(4), max_epochs=2)


def test_ema_train_without_teacher_forwards_is_warned_about() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, handle_buffers="ema_train")
    trainer = Engine(lambda engine, batch: model(batch))
    handler.attach(trainer)
    with pytest.warns(UserWarning, match="statistics do not move"):
        trainer.run(image_batches(2), max_epochs=1)


# ----------------------------------------------------------------------------- models, dtypes, wrappers


def test_bf16_student_gets_a_float32_shadow_and_a_bf16_ema_model() -> None:
    model = linear(0.0, torch.bfloat16)
    handler = EMAHandler(model, momentum=2e-4)
    nn.init.constant_(model.weight, 1.0)
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    trainer.run(range(3000), max_epochs=1)
    expected = 1 - (1 - 2e-4) ** 3000
    assert handler.ema_model.weight.dtype == torch.bfloat16
    torch.testing.assert_close(handler.ema_model.weight.float(), torch.full((1, 2), expected), rtol=2**-8, atol=0)
    assert handler.state_dict()["tensors"]["weight"].dtype == torch.float32
    out = handler.ema_model(torch.ones(1, 2, dtype=torch.bfloat16))  # the student's inputs work unchanged
    assert out.dtype == torch.bfloat16


def test_shadow_dtype_can_be_forced_and_then_bf16_stalls() -> None:
    # The reason for the default: averaged in bf16, the same run stays far below the closed form.
    model = linear(0.0, torch.bfloat16)
    handler = EMAHandler(model, momentum=2e-4, shadow_dtype=torch.bfloat16)
    nn.init.constant_(model.weight, 1.0)
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    trainer.run(range(3000), max_epochs=1)
    assert handler.ema_model.weight.float().max().item() < 0.5 * (1 - (1 - 2e-4) ** 3000)


@pytest.mark.parametrize(
    ("device", "error", "message"),
    [
        ("meta", ValueError, "device='meta' holds no values"),
        (torch.float16, TypeError, "device must be a torch.device, a string like 'cuda:0' or 'cpu', or None; found"),
        ("gpu0", ValueError, "device 'gpu0' is not a device torch knows"),
    ],
)
def test_a_device_that_cannot_hold_an_ema_is_refused(device: object, error: type[Exception], message: str) -> None:
    # The update across devices (an EMA on the CPU for a CUDA student) runs in benchmarks/gpu_check.py on a GPU.
    with pytest.raises(error, match=message):
        EMAHandler(linear(), momentum=0.5, device=device)  # type: ignore[arg-type]


@pytest.mark.parametrize("wrap", ["dataparallel", "compile"])
def test_wrappers_are_unwrapped(wrap: str) -> None:
    model = linear()
    wrapped: nn.Module = nn.DataParallel(model) if wrap == "dataparallel" else torch.compile(model)  # type: ignore[assignment]
    _assert_unwrapped_and_averaged(wrapped, model)


def _assert_unwrapped_and_averaged(wrapped: nn.Module, model: nn.Linear) -> None:
    """The handler sees through ``wrapped`` to ``model``, and averages it: 1 -> 1.5 -> 2.25 with students 2, 3."""
    handler = EMAHandler(wrapped, momentum=0.5)
    assert handler.model is model
    assert type(handler.ema_model) is nn.Linear
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    trainer.run(range(2), max_epochs=1)
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), 2.25))


def test_tied_parameters_are_averaged_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(3, 3, bias=False)
            self.decoder = nn.Linear(3, 3, bias=False)
            self.decoder.weight = self.encoder.weight

    model = Tied()
    nn.init.constant_(model.encoder.weight, 1.0)
    handler = EMAHandler(model, momentum=0.5)
    assert handler.ema_model.decoder.weight is handler.ema_model.encoder.weight
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    trainer.run(range(1), max_epochs=1)
    # averaged twice, it would be 1 -> 1.5 -> 1.75 instead of 1.5
    torch.testing.assert_close(handler.ema_model.encoder.weight, torch.full((3, 3), 1.5))


def test_buffers_replaced_by_to_are_followed() -> None:
    # model.to() gives buffers new tensor objects; the handler looks them up again when a run starts.
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)
    model.to(torch.float64)
    model.to(torch.float32)
    snapshots = _train_bn(model, handler, iterations=2)
    assert torch.equal(handler.ema_model.bn.running_mean, snapshots[-1]["bn.running_mean"])


def test_a_student_changed_after_construction_is_an_error_naming_the_tensor() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5)
    model.head = nn.Linear(4, 3)
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    with pytest.raises(ValueError, match=r"tensor 'head.weight' has shape \(3, 4\) in the student, \(2, 4\)"):
        trainer.run(range(1))


def test_ema_model_is_frozen_and_a_deep_copy() -> None:
    model = BNNet()
    handler = EMAHandler(model)
    assert all(not p.requires_grad for p in handler.ema_model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(
        a.data_ptr() == b.data_ptr()
        for a, b in zip(handler.ema_model.state_dict().values(), model.state_dict().values(), strict=True)
    )


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"momentum": 0.0}, ValueError, r"Invalid momentum: expected a value in \(0, 1\), found 0.0"),
        ({"momentum": 1.0}, ValueError, "Invalid momentum"),
        ({"momentum": float("nan")}, ValueError, "Invalid momentum"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a number; found str"),
        ({"handle_buffers": "average"}, ValueError, "handle_buffers can only be one of"),
        ({"momentum_warmup": 0.1}, ValueError, "needs both momentum_warmup and warmup_iters"),
        ({"warmup_iters": 10}, ValueError, "needs both momentum_warmup and warmup_iters"),
        (
            {"momentum_warmup": 1.5, "warmup_iters": 10},
            ValueError,
            r"Invalid momentum_warmup: expected a value in \[0, 1\]",
        ),
        ({"momentum_warmup": 0.1, "warmup_iters": 0}, ValueError, "warmup_iters must be at least 1"),
        ({"momentum_warmup": 0.1, "warmup_iters": 2.5}, TypeError, "warmup_iters must be an int"),
        ({"momentum_warmup": 0.1, "warmup_iters": 5, "mean_teacher_warmup": True}, ValueError, "choose one warm-up"),
        ({"momentum": 0.01, "half_life": 100}, ValueError, r"not momentum \(0.01\) and half_life \(100\)"),
        ({"half_life": "100 steps"}, ValueError, "half_life must look like"),
        ({"half_life": -5}, ValueError, "positive"),
        ({"start_iteration": -1}, ValueError, "start_iteration must be at least 0"),
        ({"shadow_dtype": torch.int32}, TypeError, "shadow_dtype must be a floating torch.dtype"),
    ],
)
def test_bad_arguments_are_rejected_clearly(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        EMAHandler(linear(), **kwargs)  # type: ignore[arg-type]


def test_a_non_module_model_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"model should be an instance of nn.Module .* but got str"):
        EMAHandler("resnet50")  # type: ignore[arg-type]


def test_attach_needs_an_engine() -> None:
    with pytest.raises(TypeError, match="attach expects an ignite Engine; found list"):
        EMAHandler(linear()).attach([])  # type: ignore[arg-type]


def test_an_epoch_half_life_without_a_known_epoch_length_is_an_error() -> None:
    handler = EMAHandler(linear(), half_life="1ep")
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    with pytest.raises(ValueError, match="needs the engine's epoch_length"):
        trainer.run(iter(range(5)), max_epochs=1)


# ----------------------------------------------------------------------------- state


def _trained_handler(mode: str = "copy") -> EMAHandler:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, handle_buffers=mode)
    _train_bn(model, handler, iterations=3)
    return handler


def test_state_dict_round_trip_restores_averages_and_counters() -> None:
    source = _trained_handler("update")
    state = source.state_dict()
    assert (state["num_averaged"], state["last_update_iteration"]) == (3, 3)
    target = EMAHandler(BNNet(), momentum=0.5, handle_buffers="update")  # untrained: every counter at 0
    target.load_state_dict(state)
    for name, tensor in source.ema_model.state_dict().items():
        assert torch.equal(target.ema_model.state_dict()[name], tensor), name
    loaded = target.state_dict()
    assert (loaded["num_averaged"], loaded["last_update_iteration"]) == (3, 3)


def _unchanged(handler: EMAHandler) -> Callable[[], bool]:
    before = {k: v.clone() for k, v in handler.ema_model.state_dict().items()}
    counters = {k: v for k, v in handler.state_dict().items() if k != "tensors"}

    def check() -> bool:
        after = handler.state_dict()
        return all(torch.equal(handler.ema_model.state_dict()[k], v) for k, v in before.items()) and all(
            after[k] == v for k, v in counters.items()
        )

    return check


def test_state_of_another_architecture_is_refused_and_nothing_is_loaded() -> None:
    handler = _trained_handler()
    other = EMAHandler(nn.Sequential(nn.Linear(2, 2)), momentum=0.5)
    state = other.state_dict()
    unchanged = _unchanged(handler)
    with pytest.raises(ValueError, match=r"the saved state has no tensor 'conv.weight'"):
        handler.load_state_dict(state)
    assert unchanged()


def test_state_with_one_wrong_shape_is_refused_before_anything_is_copied() -> None:
    handler = _trained_handler()
    state = handler.state_dict()
    state = {**state, "tensors": {k: v.clone() + 1 for k, v in state["tensors"].items()}}
    state["tensors"]["head.bias"] = torch.zeros(5)  # the last tensor: all others would have been copied first
    unchanged = _unchanged(handler)
    with pytest.raises(ValueError, match=r"tensor 'head.bias' has shape \(5,\) in the saved state, \(2,\)"):
        handler.load_state_dict(state)
    assert unchanged()


@pytest.mark.filterwarnings("ignore:handle_buffers='ema_train' leaves")
def test_state_of_another_mode_or_with_missing_keys_is_refused() -> None:
    handler = _trained_handler("copy")
    other = _trained_handler("ema_train")
    with pytest.raises(ValueError, match="saved with handle_buffers='ema_train', this EMA uses 'copy'"):
        handler.load_state_dict(other.state_dict())
    state = handler.state_dict()
    del state["last_update_iteration"]
    with pytest.raises(ValueError, match="Required state attribute 'last_update_iteration' is absent"):
        handler.load_state_dict(state)
    with pytest.raises(ValueError, match="'num_averaged' must be a non-negative int"):
        handler.load_state_dict({**handler.state_dict(), "num_averaged": -1})
    with pytest.raises(TypeError, match="state_dict should be a dictionary"):
        handler.load_state_dict([])  # type: ignore[arg-type]


def test_distributed_data_parallel_is_unwrapped(tmp_path: object) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path) + "/store", 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = linear()
        _assert_unwrapped_and_averaged(nn.parallel.DistributedDataParallel(model), model)
    finally:
        dist.destroy_process_group()


def test_moving_the_ema_model_after_construction_is_an_error_not_a_silent_stop() -> None:
    model = linear()
    handler = EMAHandler(model, momentum=0.5)
    handler.ema_model.double()  # new storage: the handler could not write the averages into it any more
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    with pytest.raises(
        ValueError, match=r"EMA model's tensor 'weight' was replaced after the EMA was built \(now .*64"
    ):
        trainer.run(range(2), max_epochs=1)


# ---------------------------------------------------------------------- what a new user hit


def test_a_head_replaced_mid_run_is_followed_by_the_next_update() -> None:
    model = linear(0.0)
    handler = EMAHandler(model, momentum=0.5)
    trainer = Engine(adding_step(model))

    def new_weights() -> None:  # a callback that re-initialises the model between two steps
        model.weight = nn.Parameter(torch.full((1, 2), 10.0))

    trainer.add_event_handler(Events.ITERATION_STARTED(once=3), new_weights)
    handler.attach(trainer)
    trainer.run(range(4), max_epochs=1)
    # student 1, 2, then 11, 12 (the new tensor, stepped); the EMA halves towards each: 0.5, 1.25, 6.125, 9.0625
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), 9.0625))


def test_the_handler_pickles_after_a_run_and_goes_on_after_unpickling(tmp_path: Path) -> None:
    model = linear(0.0)
    handler = EMAHandler(model, momentum=0.5, handle_buffers="update")
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    trainer.run(range(2), max_epochs=1)  # student 1, 2; EMA 0.5, 1.25
    torch.save({"ema": handler}, tmp_path / "ema.pt")  # as with Ignite's handler
    restored = torch.load(tmp_path / "ema.pt", weights_only=False)["ema"]
    torch.testing.assert_close(restored.ema_model.weight, torch.full((1, 2), 1.25))
    again = Engine(adding_step(restored.model))
    restored.attach(again)  # a fresh engine: the pickled handler left its engine behind
    again.run(range(1), max_epochs=1)  # the unpickled student steps to 3; its own EMA: 0.5 * 1.25 + 0.5 * 3
    torch.testing.assert_close(restored.ema_model.weight, torch.full((1, 2), 2.125))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": 0.1, "momentum_warmup": 0.5, "warmup_iters": 4},
        {"half_life": "0.5dur"},
        {"momentum": 0.1, "mean_teacher_warmup": True},
    ],
)
def test_the_momentum_is_a_number_from_the_first_iteration_for_tensorboard(
    kwargs: dict[str, object], tmp_path: Path
) -> None:
    from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = linear()
    handler = EMAHandler(model, **kwargs)  # type: ignore[arg-type]
    trainer = Engine(adding_step(model))
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=4))
    logger = TensorboardLogger(log_dir=tmp_path)
    logger.attach(
        trainer,
        OutputHandler(tag="train", state_attributes=["ema_momentum"]),
        event_name=Events.ITERATION_COMPLETED,
    )
    with no_warnings():
        trainer.run(range(8), max_epochs=1)
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/ema_momentum")]
    assert steps == list(range(1, 9))  # logged at every iteration, before the first update (4) too


def test_a_half_life_shorter_than_the_update_period_is_warned_about() -> None:
    model = linear()
    handler = EMAHandler(model, half_life="0.001dur")  # 0.01 iterations in a 10-iteration run
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    with pytest.warns(UserWarning, match=r"half_life=0.001dur is 0.01 iterations in this run, shorter than the 1"):
        trainer.run(range(10), max_epochs=1)
    calm = EMAHandler(linear(), half_life=4)
    trainer = Engine(adding_step(calm.model))
    calm.attach(trainer, event=Events.ITERATION_COMPLETED(every=2))
    with no_warnings():
        trainer.run(range(10), max_epochs=1)


@pytest.mark.parametrize("spec", ["500IT", "500 it", " 500It ", 500])
def test_span_units_follow_one_rule(spec: object) -> None:
    from ignite_ema import HalfLife

    assert HalfLife.parse(spec, name="snapshot_every") == HalfLife.parse(spec) == HalfLife(500.0, "it")  # type: ignore[arg-type]


def test_a_state_with_an_extra_key_is_refused_and_nothing_is_loaded() -> None:
    handler = _trained_handler()
    unchanged = _unchanged(handler)
    state = handler.state_dict()
    state = {**state, "tensors": {k: v + 1 for k, v in state["tensors"].items()}, "momentum": 0.1}
    with pytest.raises(ValueError, match=r"unexpected \['momentum'\]. Nothing was loaded"):
        handler.load_state_dict(state)
    assert unchanged()


@pytest.mark.parametrize("start", ["1ep", "0.5dur", "4it", 4])
def test_start_iteration_in_the_units_of_half_life(start: object) -> None:
    # 2 epochs of 4 iterations: 1 epoch = half the run = 4 iterations that copy the student
    model = linear(0.0)
    handler = EMAHandler(model, momentum=0.5, start_iteration=start)  # type: ignore[arg-type]
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    seen = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.__setitem__(e.state.iteration, e.state.ema_momentum)
    )
    trainer.run(range(4), max_epochs=2)
    assert [seen[i] for i in range(1, 9)] == [1.0] * 4 + [0.5] * 4
    # student 1..8; the EMA copies 4, then halves towards 5, 6, 7, 8: 4.5, 5.25, 6.125, 7.0625
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), 7.0625))


def test_a_start_in_epochs_needs_an_engine() -> None:
    from ignite_ema import ModelEMA

    with pytest.raises(ValueError, match="start_iteration='2ep' is in epochs, which only an engine knows"):
        ModelEMA(linear(), momentum=0.1, start_iteration="2ep")  # type: ignore[arg-type]


def test_a_decay_passed_as_the_momentum_is_warned_about_once_not_at_every_run() -> None:
    model = linear()
    with pytest.warns(UserWarning, match="If 0.999 is a decay"):
        handler = EMAHandler(model, momentum=0.999)
    trainer = Engine(adding_step(model))
    handler.attach(trainer)
    with no_warnings():
        trainer.run(range(2), max_epochs=1)
        trainer.run(range(2), max_epochs=1)
