"""Asynchronous updates (``asynchronous=True``, CPU) read bit-identical to synchronous ones at every wait point.

Each test trains the same seeded student twice, with ``asynchronous=False`` and ``True``, and compares bit for bit
what a user reads at each wait point. The worker is slowed down (``slow_worker``) or held at a :class:`Gate`, so that
a wait point that did not wait would read the EMA before the update landed, or let the optimiser write the student
before the update had read it, and the comparison would catch it.
"""

from __future__ import annotations

import copy
import pickle
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import Tensor, nn

from ignite_ema import EMAHandler, ModelEMA, background
from tests.helpers import BNNet, clone_state, image_batches, saved_and_loaded

Seen = list[tuple[str, Any]]
HELD_FOR = 0.1  # seconds a held update waits at the gate: a wait point must take about as long
LATE_BY = 0.02  # seconds every update of a slowed worker starts late


class Gate:
    """Holds background updates before they average until :meth:`open_in` opens it.

    Args:
        armed: hold from the start; otherwise from :meth:`arm` on.
        only: hold this EMA's updates only (others run at once).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, armed: bool = True, only: ModelEMA | None = None) -> None:
        self.armed = armed
        self.entered = threading.Event()
        self.opened = threading.Event()
        original = background._run  # the slowed one, with slow_worker

        def held(averager: Any, momentum: float, finish: Callable[[], None]) -> None:
            if self.armed and (only is None or averager is only._averager):
                self.entered.set()
                if not self.opened.wait(10):
                    raise RuntimeError("the test never opened the gate")
            original(averager, momentum, finish)

        monkeypatch.setattr(background, "_run", held)
        _GATES.append(self)

    def arm(self) -> None:
        self.armed = True

    def open_in(self, seconds: float) -> None:
        threading.Timer(seconds, self.opened.set).start()


_GATES: list[Gate] = []


@pytest.fixture(autouse=True)
def _open_gates_after() -> Iterator[None]:
    """A test that fails with an update held must not leave it held for the next test's optimiser step."""
    yield
    while _GATES:
        _GATES.pop().opened.set()


class Timed:
    """A block that opens ``gate`` ``HELD_FOR`` seconds after it starts, and measures how long it took."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.elapsed = 0.0

    def __enter__(self) -> None:
        self.gate.open_in(HELD_FOR)
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start


@pytest.fixture
def slow_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every background update starts ``LATE_BY`` seconds late (synchronous runs are untouched)."""
    original = background._run

    def late(averager: Any, momentum: float, finish: Callable[[], None]) -> None:
        time.sleep(LATE_BY)
        original(averager, momentum, finish)

    monkeypatch.setattr(background, "_run", late)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    """A snapshot of a module's parameters and buffers, read directly (no wait)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def _clones(tensors: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in tensors.items()}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _assert_same(got: Seen, want: Seen, context: object) -> None:
    assert [label for label, _ in got] == [label for label, _ in want], context
    for i, ((label, value), (_, expected)) in enumerate(zip(got, want, strict=True)):
        assert _equal(value, expected), f"{context}: asynchronous differs from synchronous at read #{i} ({label})"


# ----------------------------------------------------------------------------- a plain loop, every wait point


def _read_after_wait(ema: ModelEMA, teacher: nn.Module, model: nn.Module, x: Tensor) -> Seen:
    ema.wait()  # the documented call before reading the EMA model's tensors directly
    return [("wait", _tensors(teacher))]


def _teacher_forward(ema: ModelEMA, teacher: nn.Module, model: nn.Module, x: Tensor) -> Seen:
    with torch.no_grad():
        return [("forward", teacher(x))]


def _property(ema: ModelEMA, teacher: nn.Module, model: nn.Module, x: Tensor) -> Seen:
    return [("ema_model", _tensors(ema.ema_model))]


def _state(ema: ModelEMA, teacher: nn.Module, model: nn.Module, x: Tensor) -> Seen:
    state = ema.state_dict()
    return [("state_dict", {**state, "tensors": _clones(state["tensors"])})]


def _model_state(ema: ModelEMA, teacher: nn.Module, model: nn.Module, x: Tensor) -> Seen:
    return [("model_state_dict", _clones(ema.model_state_dict()))]


def _swapped(ema: ModelEMA, teacher: nn.Module, model: nn.Module, x: Tensor) -> Seen:
    with ema.swapped():
        return [("swapped", _tensors(model))]


def _nothing(ema: ModelEMA, teacher: nn.Module, model: nn.Module, x: Tensor) -> Seen:
    return []  # the optimiser's step is the first to touch the student after the update


WAIT_POINTS = (_nothing, _read_after_wait, _teacher_forward, _property, _state, _model_state, _swapped)


@dataclass(frozen=True)
class Config:
    mode: str
    dtype: torch.dtype
    kwargs: dict[str, Any]
    every: int = 1  # 1: update(); k > 1: update(step=n) every k steps
    teacher: bool = False  # the EMA model runs in the step, its output in the loss (a mean teacher)


CONFIGS = {
    "copy-decay-mean_teacher": Config("copy", torch.float32, {"decay": 0.8, "mean_teacher_warmup": True}),
    "update-power-start-exclude-every2": Config(
        "update",
        torch.float32,
        {"decay": 0.9, "power_warmup": (2.0, 0.75), "start_iteration": 2, "exclude": "head.bias"},
        every=2,
    ),
    "ema_train-linear-every3-teacher": Config(
        "ema_train", torch.float32, {"momentum": 0.2, "momentum_warmup": 0.6, "warmup_iters": 6}, every=3, teacher=True
    ),
    "update-bf16-mean_teacher": Config("update", torch.bfloat16, {"decay": 0.7, "mean_teacher_warmup": True}),
    "ema_train-bf16-half_life-every2-teacher": Config(
        "ema_train", torch.bfloat16, {"half_life": 3}, every=2, teacher=True
    ),
}


def _plain_loop(asynchronous: bool, config: Config) -> Seen:
    torch.manual_seed(0)
    model = BNNet().to(config.dtype)
    ema = ModelEMA(model, config.mode, asynchronous=asynchronous, **config.kwargs)
    teacher = ema.ema_model  # taken before any update: reading it later is a direct read
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen: Seen = []
    updates = 0
    # Each wait point gets a turn as the first touch of the EMA after an update (in flight, when asynchronous).
    steps = len(WAIT_POINTS) * config.every + 1
    for step, x in enumerate(image_batches(steps, seed=1), start=1):
        x = x.to(config.dtype)
        seen += WAIT_POINTS[updates % len(WAIT_POINTS)](ema, teacher, model, x)
        out = model(x)
        loss = out.float().square().mean()
        if config.teacher:
            with torch.no_grad():
                target = teacher(x)
            loss = loss + (out - target).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # writes the student: waits until the update in flight has read it
        ema.wait()
        seen.append(("after step", _tensors(teacher)))
        if step % config.every == 0:
            seen.append(("momentum", ema.update() if config.every == 1 else ema.update(step=step)))
            updates += 1
    ema.wait()
    seen += [
        ("final ema_model", _tensors(teacher)),
        ("final state", _clones(ema.state_dict()["tensors"])),
        ("final student", _tensors(model)),
        ("counters", (ema.num_averaged, ema.last_step)),
    ]
    return seen


@pytest.mark.usefixtures("slow_worker")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_plain_loop_reads_the_same_at_every_wait_point(name: str) -> None:
    config = CONFIGS[name]
    want = _plain_loop(False, config)
    _assert_same(_plain_loop(True, config), want, name)
    final = dict(want)
    assert not torch.equal(final["final ema_model"]["head.weight"], final["final student"]["head.weight"]), (
        "the EMA should lag the student: the comparison would be vacuous"
    )


# ----------------------------------------------------------------------------- an update held in the background


@dataclass
class Rig:
    """A student one SGD step away from its "update"-mode EMA, and the batch of the next step."""

    model: BNNet
    ema: ModelEMA
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    other: dict[str, Any] = field(default_factory=dict)


def _rig(asynchronous: bool) -> Rig:
    torch.manual_seed(0)
    model = BNNet()
    ema = ModelEMA(model, "update", decay=0.75, asynchronous=asynchronous)
    first, second = image_batches(2, seed=2)
    rig = Rig(model, ema, ema.ema_model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), second)
    rig.model(first).square().mean().backward()
    rig.optimizer.step()
    # A state of another EMA of the same model, for load_state_dict.
    torch.manual_seed(5)
    rig.other = ModelEMA(BNNet(), "update").state_dict()
    return rig


Timer = AbstractContextManager[Any]


def _after_step(rig: Rig, timed: Timer) -> dict[str, Any]:
    rig.model(rig.x).square().mean().backward()
    with timed:
        rig.optimizer.step()
    rig.ema.wait()
    return {"ema": _tensors(rig.teacher), "student": _tensors(rig.model)}


def _then_read(call: Callable[[Rig], object]) -> Callable[[Rig, Timer], dict[str, Tensor]]:
    """A wait point that returns nothing: the EMA model read after ``wait()``."""

    def act(rig: Rig, timed: Timer) -> dict[str, Tensor]:
        with timed:
            call(rig)
        rig.ema.wait()
        return _tensors(rig.teacher)

    return act


def _timed_read(read: Callable[[Rig], Any]) -> Callable[[Rig, Timer], Any]:
    def act(rig: Rig, timed: Timer) -> Any:
        with timed:
            return read(rig)

    return act


def _forward(rig: Rig) -> Tensor:
    with torch.no_grad():
        out: Tensor = rig.teacher(rig.x)
    return out


def _swapped_student(rig: Rig) -> dict[str, Tensor]:
    with rig.ema.swapped():
        return _tensors(rig.model)


def _state_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    return _clones(state["tensors"])


# Every way in which the EMA is read or written, and what it gives.
WAITS: dict[str, Callable[[Rig, Timer], Any]] = {
    "optimizer.step": _after_step,
    "forward": _timed_read(_forward),
    "wait": _then_read(lambda rig: rig.ema.wait()),
    "ema_model": _timed_read(lambda rig: _tensors(rig.ema.ema_model)),
    "state_dict": _timed_read(lambda rig: _state_tensors(rig.ema.state_dict())),
    "sharded_state_dict": _timed_read(lambda rig: _state_tensors(rig.ema.sharded_state_dict())),
    "model_state_dict": _timed_read(lambda rig: _clones(rig.ema.model_state_dict())),
    "swapped": _timed_read(_swapped_student),
    "update": _then_read(lambda rig: rig.ema.update(0.5)),
    "copy_student": _then_read(lambda rig: rig.ema.copy_student()),
    "load_state_dict": _then_read(lambda rig: rig.ema.load_state_dict(rig.other)),
    "average_buffers_across_ranks": _then_read(lambda rig: rig.ema.average_buffers_across_ranks()),
    "rebind": _then_read(lambda rig: rig.ema.rebind()),
    "check_outside_writes": _then_read(lambda rig: rig.ema.check_outside_writes()),
    "deepcopy": _timed_read(lambda rig: _tensors(copy.deepcopy(rig.ema).ema_model)),
    "pickle": _timed_read(lambda rig: _tensors(pickle.loads(pickle.dumps(rig.ema)).ema_model)),
}


@pytest.mark.parametrize("name", list(WAITS))
def test_update_returns_at_once_and_each_wait_point_waits_for_it(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    reference = _rig(False)
    reference.ema.update()
    averaged_buffers = _tensors(reference.teacher)
    want = WAITS[name](reference, nullcontext())

    gate = Gate(monkeypatch)
    rig = _rig(True)
    before = _tensors(rig.teacher)
    rig.ema.update()  # returns while the worker is held before it averages
    assert gate.entered.wait(5), "the update never reached the worker"
    now = _tensors(rig.teacher)  # read directly, without waiting
    assert torch.equal(now["head.weight"], before["head.weight"]), "update() averaged the weights in the call"
    for buffer in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):  # forwards write these: in the call
        assert torch.equal(now[buffer], averaged_buffers[buffer]), buffer
        assert not torch.equal(now[buffer], before[buffer]), buffer

    timed = Timed(gate)
    got = WAITS[name](rig, timed)
    assert timed.elapsed >= 0.75 * HELD_FOR, (
        f"{name} returned after {timed.elapsed:.3f} s, while the update in flight was held for {HELD_FOR} s"
    )
    assert _equal(got, want), f"{name} read something else than after a synchronous update"


@pytest.mark.parametrize("name", ["wait", "optimizer.step", "forward", "state_dict"])
def test_an_error_in_the_worker_is_raised_at_the_next_wait_point(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def failing(*args: object) -> None:
        raise RuntimeError("averaging failed in the worker")

    monkeypatch.setattr(background, "_run", failing)
    rig = _rig(True)
    rig.ema.update()  # returns: the error is the worker's
    with pytest.raises(RuntimeError, match="averaging failed in the worker"):
        WAITS[name](rig, nullcontext())


def test_a_step_waits_even_while_another_thread_waits_for_the_same_update(monkeypatch: pytest.MonkeyPatch) -> None:
    # An evaluator thread's forward pass waits for the update in flight; the training loop's optimizer step, which
    # comes while it waits, must wait too, and not take the other's wait for its own.
    reference = _rig(False)
    reference.ema.update()
    want = _after_step(reference, nullcontext())

    gate = Gate(monkeypatch)
    rig = _rig(True)
    rig.ema.update()
    assert gate.entered.wait(5)
    evaluator = threading.Thread(target=_forward, args=(rig,))
    evaluator.start()
    time.sleep(0.05)  # the evaluator is waiting now
    timed = Timed(gate)  # opens the gate HELD_FOR after the step starts
    got = _after_step(rig, timed)
    evaluator.join()
    assert timed.elapsed >= 0.75 * HELD_FOR, f"the step returned after {timed.elapsed:.3f} s, before the update"
    assert _equal(got, want), "the step wrote the student while the update in flight still read it"


@pytest.mark.parametrize("other_asynchronous", [False, True])
def test_swapping_another_ema_into_the_student_waits_for_an_update_reading_it(
    monkeypatch: pytest.MonkeyPatch, other_asynchronous: bool
) -> None:
    # Two EMAs of one student (two decays, say); the other's swap (an evaluator's swap_during) writes the student,
    # as an optimiser step does, while this one's update may still be reading it.
    def run(asynchronous: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = BNNet()
        ema = ModelEMA(model, "update", decay=0.75, asynchronous=asynchronous)
        other = ModelEMA(model, "update", decay=0.5, asynchronous=asynchronous and other_asynchronous)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for i, x in enumerate(image_batches(2, seed=6)):
            model(x).square().mean().backward()
            optimizer.step()
            if i == 0:
                other.update()  # so that the other EMA differs from the student
        if asynchronous:
            gate = Gate(monkeypatch, only=ema)
            ema.update()
            assert gate.entered.wait(5)
            gate.open_in(HELD_FOR)
        else:
            ema.update()
        with other.swapped():
            time.sleep(2 * HELD_FOR)  # stands for an evaluation of the student
        ema.wait()
        return _tensors(ema.ema_model)

    want = run(False)
    assert _equal(run(True), want), (
        "ModelEMA.swapped() of another EMA wrote the student (ignite_ema/model_ema.py, swapped(): swap.exchange()) "
        "while this EMA's asynchronous update was still reading it: only the Optimizer step pre-hook releases the "
        "students of updates in flight (background._release_students), the swap does not"
    )


# ----------------------------------------------------------------------------- under Ignite, with a resume

EPOCH_LENGTH, MAX_EPOCHS, EVERY = 6, 3, 3
NAN_AT = 3  # an update iteration: its update is skipped (skip_nonfinite), the student repaired after it
CHECKPOINT_AT = 9  # mid-epoch, right after an update was started
HANDLERS = {
    "ema_train-mean_teacher": {"momentum": 0.3, "handle_buffers": "ema_train", "mean_teacher_warmup": True},
    "update-linear_warmup": {"momentum": 0.2, "momentum_warmup": 0.7, "warmup_iters": 8, "handle_buffers": "update"},
}


def _ignite_run(kwargs: dict[str, Any], asynchronous: bool, workdir: Path, phase: str) -> dict[str, Any]:
    """A trainer with the handler, an evaluator of ``ema_model`` and one of the swapped student every epoch.

    ``phase``: ``full``, ``first`` (checkpoint at ``CHECKPOINT_AT``, stop) or ``resume`` (a new object graph loads the
    checkpoint and finishes). Returns what was read: per iteration, per epoch, at the end.
    """
    torch.manual_seed(0)
    model = BNNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handler = EMAHandler(model, skip_nonfinite=True, asynchronous=asynchronous, **kwargs)
    teacher = handler.ema_model  # taken before any update: its forwards are wait points
    mean_teacher = handler.handle_buffers == "ema_train"
    repaired: list[Tensor] = []

    def step(engine: Engine, batch: object) -> None:
        iteration = engine.state.iteration
        gen = torch.Generator().manual_seed(iteration)
        x = torch.randn(8, 3, 6, 6, generator=gen)
        if iteration == NAN_AT + 1:
            with torch.no_grad():
                model.head.weight[0, 0] = repaired.pop()
        model.train()
        out = model(x)
        loss = out.square().mean()
        if mean_teacher:
            with torch.no_grad():
                target = teacher(x)
            loss = loss + (out - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iteration == NAN_AT:
            with torch.no_grad():
                repaired.append(model.head.weight[0, 0].clone())
                model.head.weight[0, 0] = float("nan")

    trainer = Engine(step)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=EVERY))
    seen: dict[str, Any] = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine: Engine) -> None:
        state = engine.state
        seen[f"iteration {state.iteration}"] = (state.ema_momentum, state.ema_momentum_skipped)

    eval_batches = image_batches(2, seed=7)

    def outputs_of(run: Callable[[Tensor], Tensor], swap: bool) -> list[Tensor]:
        outputs: list[Tensor] = []

        def evaluate(engine: Engine, x: Tensor) -> None:
            with torch.no_grad():
                outputs.append(run(x))

        evaluator = Engine(evaluate)
        if swap:
            handler.swap_during(evaluator)
        evaluator.run(eval_batches)
        return outputs

    @trainer.on(Events.EPOCH_COMPLETED)
    def evaluate(engine: Engine) -> None:
        epoch = engine.state.epoch
        teacher.eval()  # an "ema_train" teacher is put back in train mode at the next iteration
        seen[f"epoch {epoch} ema_model"] = outputs_of(teacher, swap=False)
        model.eval()
        seen[f"epoch {epoch} swapped student"] = outputs_of(model, swap=True)

    to_save = {"ema": handler, "model": model, "optimizer": optimizer, "trainer": trainer}
    if phase == "first":
        saver = Checkpoint(to_save, DiskSaver(str(workdir), require_empty=False), n_saved=1)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=CHECKPOINT_AT), saver)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=CHECKPOINT_AT), lambda e: e.terminate())
    if phase == "resume":
        (path,) = workdir.glob("*.pt")
        Checkpoint.load_objects(to_save, torch.load(path, weights_only=False))
    trainer.run(range(EPOCH_LENGTH), max_epochs=MAX_EPOCHS)
    handler.wait()
    seen["final handler"] = clone_state(handler)
    seen["final ema_model"] = _tensors(teacher)
    seen["final student"] = _tensors(model)
    return seen


@pytest.mark.usefixtures("slow_worker")
@pytest.mark.filterwarnings(f"ignore:iteration {NAN_AT}:UserWarning")
@pytest.mark.parametrize("name", list(HANDLERS))
def test_ema_handler_runs_the_same_with_warmups_skips_evaluators_and_a_resume(name: str, tmp_path: Path) -> None:
    kwargs = HANDLERS[name]
    want = _ignite_run(kwargs, False, tmp_path / "sync", "full")
    assert want[f"iteration {EPOCH_LENGTH * MAX_EPOCHS}"][1] == 1, "the NaN should have skipped one update"
    assert len({momentum for momentum, _ in (want[f"iteration {i}"] for i in range(EVERY, 19, EVERY))}) > 2, (
        "the warm-up should move the momentum"
    )

    got = _ignite_run(kwargs, True, tmp_path / "async", "full")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert _equal(got[key], value), f"{name}: asynchronous differs from synchronous at {key}"

    _ignite_run(kwargs, True, tmp_path / "ckpt", "first")
    resumed = _ignite_run(kwargs, True, tmp_path / "ckpt", "resume")
    after = [f"iteration {i}" for i in range(CHECKPOINT_AT + 1, EPOCH_LENGTH * MAX_EPOCHS + 1)]
    epochs = [f"epoch {e} {what}" for e in (2, 3) for what in ("ema_model", "swapped student")]
    assert sorted(resumed) == sorted([*after, *epochs, "final handler", "final ema_model", "final student"])
    for key, value in resumed.items():
        if key.startswith("iteration") and int(key.split()[1]) < CHECKPOINT_AT + EVERY:
            # engine.state is not checkpointed: the momentum reads 0.0 until the run's first update, as in any resume.
            value, expected = value[1], want[key][1]
        else:
            expected = want[key]
        assert _equal(value, expected), f"{name}: the resumed asynchronous run differs from synchronous at {key}"


# ----------------------------------------------------------------------------- copies and pickles


def _mean_teacher_step(model: nn.Module, ema: ModelEMA, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    out = model(x)
    with torch.no_grad():
        target = ema.ema_model(x)
    loss = out.square().mean() + (out - target).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.usefixtures("slow_worker")
def test_an_ema_saved_during_an_update_holds_it_and_goes_on_bit_identically(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(asynchronous: bool) -> Seen:
        torch.manual_seed(0)
        model = BNNet()
        ema = ModelEMA(model, "ema_train", decay=0.7, mean_teacher_warmup=True, asynchronous=asynchronous)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batches = image_batches(7, seed=8)
        gate = Gate(monkeypatch, armed=False)
        for i, x in enumerate(batches[:3]):
            _mean_teacher_step(model, ema, optimizer, x)
            if i == 2:
                gate.arm()  # the last update is held
            ema.update()
        timed: Timer = nullcontext()
        if asynchronous:
            assert gate.entered.wait(5)
            timed = Timed(gate)
        with timed:  # waits for the update in flight; the loaded EMA gets a worker of its own
            model, optimizer, ema = saved_and_loaded((model, optimizer, ema))
        if isinstance(timed, Timed):
            assert timed.elapsed >= 0.75 * HELD_FOR, f"torch.save returned after {timed.elapsed:.3f} s"
        seen: Seen = []
        for x in batches[3:]:
            _mean_teacher_step(model, ema, optimizer, x)  # the loaded teacher's forward waits for the loaded EMA
            seen.append(("momentum", ema.update()))
            with torch.no_grad():
                seen.append(("forward", ema.ema_model(x)))
        seen += [("state", _clones(ema.state_dict()["tensors"])), ("student", _tensors(model))]
        return seen

    _assert_same(run(True), run(False), "saved and loaded ModelEMA")


@pytest.mark.usefixtures("slow_worker")
def test_a_handler_pickled_during_an_update_holds_it_and_goes_on_bit_identically(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def run(asynchronous: bool) -> Seen:
        torch.manual_seed(0)
        model = BNNet()
        handler = EMAHandler(model, 0.3, handle_buffers="update", asynchronous=asynchronous)
        gate = Gate(monkeypatch, armed=False)

        def trainer_of(student: nn.Module) -> Engine:
            optimizer = torch.optim.SGD(student.parameters(), lr=0.05)

            def step(engine: Engine, x: Tensor) -> None:
                student(x).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()

            return Engine(step)

        trainer = trainer_of(model)
        # The last update is held: armed after the step that released the one before, ahead of the handler.
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), gate.arm)
        handler.attach(trainer)
        trainer.run(image_batches(3, seed=9), max_epochs=1)
        timed: Timer = nullcontext()
        if asynchronous:
            assert gate.entered.wait(5)
            timed = Timed(gate)
        with timed:  # a thread pool cannot be pickled: the worker is dropped, after the update in flight
            data = pickle.dumps(handler)
        if isinstance(timed, Timed):
            assert timed.elapsed >= 0.75 * HELD_FOR, f"pickle.dumps returned after {timed.elapsed:.3f} s"
        seen: Seen = [("pickled", clone_state(pickle.loads(data)))]
        loaded: EMAHandler = saved_and_loaded(handler)
        teacher = loaded.ema_model
        trainer = trainer_of(loaded.model)
        loaded.attach(trainer)
        trainer.run(image_batches(3, seed=10), max_epochs=1)
        loaded.wait()  # the last update may still run: wait() before reading the EMA model directly
        return [*seen, ("ema_model", _tensors(teacher)), ("went on", clone_state(loaded))]

    _assert_same(run(True), run(False), "pickled handler")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", ["yes", 1, None])
@pytest.mark.parametrize("cls", [ModelEMA, EMAHandler])
def test_asynchronous_must_be_true_or_false(cls: type[Any], value: object) -> None:
    message = f"asynchronous must be True or False; found {type(value).__name__} {value!r}"
    with pytest.raises(TypeError, match=re.escape(message)):
        cls(nn.Linear(2, 1), momentum=0.1, asynchronous=value)


@pytest.mark.parametrize("cls", [ModelEMA, EMAHandler])
def test_a_device_without_background_updates_is_refused_naming_it(cls: type[Any]) -> None:
    # The meta device: the one unsupported device a CPU-only machine has (a synchronous EMA of it builds).
    student = nn.Linear(2, 1, device="meta")
    cls(student, momentum=0.1)
    with pytest.raises(ValueError, match=r"found student on meta with its EMA on meta\. Leave asynchronous=False here"):
        cls(student, momentum=0.1, asynchronous=True)
