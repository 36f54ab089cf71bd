"""Failure behaviour: non-finite students, a training process killed mid-run, a checkpoint killed mid-write.

Expected values come from plain loops and closed forms written here. The
crash tests kill real processes with SIGKILL; this file is also the job they
start: ``python tests/test_failures.py PHASE DIR [N_SAVED]`` with PHASE one of

- ``full``: the uninterrupted run, which writes its final EMA state;
- ``crash``: the same run, checkpointing every ``SAVE_EVERY`` iterations
  (Ignite's Checkpoint + DiskSaver); after the checkpoint at iteration
  ``READY_AT`` it writes a marker file and goes on slowly until it is killed;
- ``resume``: loads the newest checkpoint left by ``crash`` and finishes;
- ``slow-save``: checkpoints at iterations 3 and 6; the second save blocks
  while torch.save is writing it, after writing a marker, until it is killed.

Batches are derived from the iteration number, so a resumed run sees the same
data as the uninterrupted one.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_ema import EMAHandler
from tests.helpers import BNNet, assert_same_state, clone_state, image_batches, linear, no_warnings

# ----------------------------------------------------------------------------- helpers

# The jobs these tests kill and restart are this module, run in a new interpreter from the repository root
# (so that ``tests.helpers`` imports there too).
_ROOT = Path(__file__).resolve().parents[1]
_THIS_MODULE = [sys.executable, "-m", "tests.test_failures"]


def _set_weight(model: nn.Linear, values: list[float]) -> Engine:
    """An engine whose iteration ``i`` sets every weight of ``model`` to ``values[i - 1]``."""

    def step(engine: Engine, batch: object) -> None:
        nn.init.constant_(model.weight, values[engine.state.iteration - 1])

    return Engine(step)


# ----------------------------------------------------------------------------- non-finite students


def test_skip_nonfinite_skips_the_update_leaves_the_ema_as_it_was_and_counts_it() -> None:
    nan, inf = float("nan"), float("inf")
    values = [2.0, 3.0, nan, 5.0, -inf, 7.0, inf, 8.0]
    model = linear(1.0)
    handler = EMAHandler(model, momentum=0.5, skip_nonfinite=True)
    trainer = _set_weight(model, values)
    handler.attach(trainer)
    after: list[torch.Tensor] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda: after.append(handler.ema_model.weight.clone()))
    with pytest.warns(UserWarning, match=r"iteration 3: the student's tensor 'weight' has NaN or Inf") as record:
        trainer.run(range(len(values)), max_epochs=1)

    ema, expected = 1.0, []
    for value in values:
        if math.isfinite(value):
            ema = 0.5 * ema + 0.5 * value
        expected.append(ema)
    assert [w[0, 0].item() for w in after] == expected
    for i in (2, 4, 6):  # a skipped update leaves the EMA exactly as it was
        assert torch.equal(after[i], after[i - 1])
    assert trainer.state.ema_momentum_skipped == 3
    state = handler.state_dict()
    assert (state["num_skipped"], state["num_averaged"], state["last_update_iteration"]) == (3, 5, 8)
    assert len([w for w in record if "NaN or Inf" in str(w.message)]) == 1  # warned once, counted always


def test_one_nonfinite_element_is_enough_to_skip() -> None:
    model = nn.Linear(3, 2)
    handler = EMAHandler(model, momentum=0.5, skip_nonfinite=True)
    before = clone_state(handler)

    def step(engine: Engine, batch: object) -> None:
        with torch.no_grad():
            model.weight.add_(1.0)
            model.bias[1] = float("nan")  # one element of six plus two

    trainer = Engine(step)
    handler.attach(trainer, name="teacher_momentum")
    with pytest.warns(UserWarning, match="'bias' has NaN or Inf"):
        trainer.run(range(2), max_epochs=1)
    assert trainer.state.teacher_momentum_skipped == 2
    for name, tensor in handler.state_dict()["tensors"].items():
        assert torch.equal(tensor, before["tensors"][name]), name


def test_with_half_life_the_next_update_spans_the_skipped_one() -> None:
    # The student is 1 from the first iteration on, except for a NaN at iteration 4. If the update after the skip
    # spans it, the EMA after t iterations is 1 - 0.5 ** (t / H) exactly as without the NaN.
    values = [1.0] * 20
    values[3] = float("nan")
    model = linear(0.0)
    handler = EMAHandler(model, half_life=10, skip_nonfinite=True)
    trainer = _set_weight(model, values)
    handler.attach(trainer)
    momenta: dict[int, float] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: momenta.__setitem__(e.state.iteration, e.state.ema_momentum)
    )
    with pytest.warns(UserWarning, match="NaN or Inf"):
        trainer.run(range(20), max_epochs=1)
    expected = 1 - 0.5 ** (20 / 10)
    torch.testing.assert_close(handler.ema_model.weight, torch.full((1, 2), expected), rtol=1e-6, atol=0)
    assert momenta[4] == momenta[3]  # the published momentum is the last applied one
    assert momenta[5] == pytest.approx(1 - 0.5 ** (2 / 10))  # delta = 2: from iteration 3 to 5
    assert momenta[6] == pytest.approx(1 - 0.5 ** (1 / 10))


def test_mean_teacher_ramp_does_not_advance_over_a_skipped_update() -> None:
    # Until the ramp reaches the momentum, the EMA is the plain average of the initial weight and the finite students.
    values = [3.0, -1.0, float("nan"), 4.0, 1.0, float("inf"), 5.0]
    model = linear(0.0)
    handler = EMAHandler(model, momentum=0.1, mean_teacher_warmup=True, skip_nonfinite=True)
    trainer = _set_weight(model, values)
    handler.attach(trainer)
    averages: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda: averages.append(handler.ema_model.weight[0, 0].item())
    )
    with pytest.warns(UserWarning, match="NaN or Inf"):
        trainer.run(range(len(values)), max_epochs=1)
    expected = []
    for n in range(1, len(values) + 1):
        seen = [0.0, *(v for v in values[:n] if math.isfinite(v))]
        expected.append(sum(seen) / len(seen))
    assert averages == pytest.approx(expected, rel=1e-6)


def test_a_nonfinite_copied_buffer_skips_the_update() -> None:
    model = BNNet()
    handler = EMAHandler(model, momentum=0.5, skip_nonfinite=True)  # "copy": BN statistics are copied
    states: list[dict[str, Any]] = []

    def step(engine: Engine, batch: torch.Tensor) -> None:
        model(batch)
        if engine.state.iteration == 2:
            model.bn.running_var[1] = float("inf")  # stays Inf in the student from here on

    trainer = Engine(step)
    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda: states.append(clone_state(handler)))
    with pytest.warns(UserWarning, match="'bn.running_var' has NaN or Inf"):
        trainer.run(image_batches(3), max_epochs=1)
    assert trainer.state.ema_momentum_skipped == 2
    for later in states[1:]:
        for name, tensor in states[0]["tensors"].items():
            assert torch.equal(later["tensors"][name], tensor), name


def test_large_finite_students_are_not_skipped() -> None:
    # The fast check is a 2-norm, which overflows here (float32: (1e20) ** 2 > 3.4e38; fp16: 300 * sqrt(1e5) > 65504);
    # the exact check behind it must let these updates through.
    model32 = linear(0.0)
    handler32 = EMAHandler(model32, momentum=0.5, skip_nonfinite=True)
    nn.init.constant_(model32.weight, 1e20)
    model16 = nn.Linear(100_000, 1, bias=False).half()
    nn.init.constant_(model16.weight, 0.0)
    handler16 = EMAHandler(model16, momentum=0.5, skip_nonfinite=True)
    nn.init.constant_(model16.weight, 300.0)
    trainer = Engine(lambda engine, batch: None)
    handler32.attach(trainer, name="m32")
    handler16.attach(trainer, name="m16")
    with no_warnings():
        trainer.run(range(2), max_epochs=1)
    assert (trainer.state.m32_skipped, trainer.state.m16_skipped) == (0, 0)
    torch.testing.assert_close(handler32.ema_model.weight, torch.full((1, 2), 0.75e20))
    assert torch.equal(handler16.ema_model.weight, torch.full((1, 100_000), 225.0, dtype=torch.float16))


def test_without_skip_nonfinite_a_nan_stays_in_the_average_forever() -> None:
    # Why the option exists: (1 - m) * NaN is NaN, so one bad student poisons every later update.
    values = [2.0, float("nan"), *([3.0] * 20)]
    model = linear(1.0)
    handler = EMAHandler(model, momentum=0.5)
    trainer = _set_weight(model, values)
    handler.attach(trainer)
    trainer.run(range(len(values)), max_epochs=1)
    assert torch.isnan(handler.ema_model.weight).all()
    assert not hasattr(trainer.state, "ema_momentum_skipped")


def test_the_skip_count_is_saved_restored_and_republished() -> None:
    model = linear(1.0)
    source = EMAHandler(model, momentum=0.5, skip_nonfinite=True)
    trainer = _set_weight(model, [2.0, float("nan"), 4.0])
    source.attach(trainer)
    with pytest.warns(UserWarning, match="NaN or Inf"):
        trainer.run(range(3), max_epochs=1)
    state = source.state_dict()
    assert state["num_skipped"] == 1

    target = EMAHandler(linear(1.0), momentum=0.5, skip_nonfinite=True)
    target.load_state_dict(state)
    assert target.state_dict()["num_skipped"] == 1
    resumed = Engine(lambda engine, batch: None)
    target.attach(resumed)
    resumed.run(range(2), max_epochs=1)
    assert resumed.state.ema_momentum_skipped == 1
    del state["num_skipped"]
    with pytest.raises(ValueError, match="Required state attribute 'num_skipped' is absent"):
        target.load_state_dict(state)


# ----------------------------------------------------------------------------- bad input (new options and gaps)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sync_buffers": "eval"}, ValueError, r"sync_buffers can only be None or 'update' .*found 'eval'"),
        ({"sync_buffers": True}, ValueError, "sync_buffers can only be None or 'update'"),
        ({"skip_nonfinite": "yes"}, TypeError, "skip_nonfinite must be True or False; found str 'yes'"),
        ({"skip_nonfinite": 1}, TypeError, "skip_nonfinite must be True or False; found int 1"),
        ({"half_life": [10]}, TypeError, "half_life must be a number of iterations or a string"),
        ({"half_life": "2dur"}, ValueError, "a half_life in 'dur' is a fraction of the run, at most 1"),
    ],
)
def test_bad_new_options_are_rejected_clearly(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        EMAHandler(linear(), **kwargs)  # type: ignore[arg-type]


def test_new_options_are_keyword_only() -> None:
    with pytest.raises(TypeError, match="positional argument"):
        EMAHandler(linear(), 0.1, None, None, "copy", "update")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_skipped": -1}, "EMAHandler state 'num_skipped' must be a non-negative int; found -1"),
        ({"num_skipped": True}, "'num_skipped' must be a non-negative int; found True"),
        ({"iteration_offset": 2.0}, "'iteration_offset' must be a non-negative int; found 2.0"),
        ({"tensors": [torch.zeros(1, 2)]}, "the EMA state's 'tensors' must map names to tensors"),
        ({"tensors": {"weight": torch.zeros(1, 2, dtype=torch.float64)}}, "saved tensor 'weight' is torch.float64"),
    ],
)
def test_bad_states_are_refused_and_nothing_is_loaded(change: dict[str, object], message: str) -> None:
    handler = EMAHandler(linear(5.0), momentum=0.5, skip_nonfinite=True)
    before = clone_state(handler)
    # Every good part of the state differs from the handler's own, so a partial load would show.
    state = {"handle_buffers": "copy", "tensors": {"weight": torch.full((1, 2), -1.0)}, "num_averaged": 7}
    state.update({"last_update_iteration": 9, "num_skipped": 2, "iteration_offset": 3})
    with pytest.raises(ValueError, match=re.escape(message)):
        handler.load_state_dict({**state, **change})
    assert_same_state(handler.state_dict(), before)


def test_a_saved_state_with_an_extra_tensor_is_refused() -> None:
    handler = EMAHandler(linear(5.0), momentum=0.5)
    state = handler.state_dict()
    state = {**state, "tensors": {**state["tensors"], "bias": torch.zeros(1)}}
    with pytest.raises(
        ValueError,
        match=r"the saved state has a tensor 'bias' \(shape \(1,\)\) that the EMA model lacks: was it saved",
    ):
        handler.load_state_dict(state)
    assert torch.equal(handler.ema_model.weight, torch.full((1, 2), 5.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("add", r"the student has a tensor 'extra.weight' \(shape \(2, 2\)\) that the EMA model lacks: was the model"),
        ("remove", r"the student has no tensor 'bias' \(shape \(1,\)\), which the EMA model has: was the model"),
    ],
)
def test_a_student_that_gained_or_lost_a_tensor_is_an_error_when_the_run_starts(change: str, message: str) -> None:
    model = nn.Linear(2, 1)
    handler = EMAHandler(model, momentum=0.5)
    if change == "add":
        model.extra = nn.Linear(2, 2)
    else:
        model.bias = None  # type: ignore[assignment]
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    with pytest.raises(ValueError, match=message):
        trainer.run(range(1))


def test_attaching_under_a_name_the_engine_state_already_has_warns() -> None:
    trainer = Engine(lambda engine, batch: None)
    EMAHandler(linear(), momentum=0.5).attach(trainer)
    with pytest.warns(UserWarning, match="Attribute 'ema_momentum' already exists in Engine.state"):
        EMAHandler(linear(), momentum=0.5).attach(trainer)


# ----------------------------------------------------------------------------- the jobs the crash tests start

EPOCH_LENGTH, MAX_EPOCHS = 5, 4
SAVE_EVERY, READY_AT, POISONED_AT = 3, 9, 4


def _build() -> tuple[Engine, dict[str, Any], EMAHandler]:
    """A mean-teacher run whose every EMA counter matters, with one non-finite student (skipped) before the crash."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handler = EMAHandler(model, handle_buffers="ema_train", half_life=6, mean_teacher_warmup=True, skip_nonfinite=True)
    teacher = handler.ema_model
    stash: dict[str, torch.Tensor] = {}

    def step(engine: Engine, batch: object) -> float:
        gen = torch.Generator().manual_seed(engine.state.iteration)
        x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randn(8, 2, generator=gen)
        out = model(x)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(out, y) + nn.functional.mse_loss(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if engine.state.iteration == POISONED_AT:  # a NaN the EMA must skip; restored after the update
            stash["bias"] = model[4].bias.detach().clone()
            with torch.no_grad():
                model[4].bias[0] = float("nan")
        return loss.item()

    def restore() -> None:
        with torch.no_grad():
            model[4].bias.copy_(stash.pop("bias"))

    trainer = Engine(step)
    handler.attach(trainer, name="teacher_momentum", event=Events.ITERATION_COMPLETED(every=2))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=POISONED_AT), restore)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "ema": handler}
    return trainer, to_save, handler


def _final(trainer: Engine, handler: EMAHandler) -> dict[str, Any]:
    return {
        "handler": handler.state_dict(),
        "ema_model": handler.ema_model.state_dict(),
        "momentum": trainer.state.teacher_momentum,
        "skipped": trainer.state.teacher_momentum_skipped,
    }


def _newest_checkpoint(directory: Path) -> Path:
    return max(directory.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


class _Blocker:
    """Stands for state that is slow to serialise: pickling it writes a marker, then blocks until killed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        self.marker.write_text("saving")
        time.sleep(600)
        raise AssertionError("should have been killed while saving")


class _Probe:
    """A ``to_save`` entry whose second ``state_dict()`` holds a :class:`_Blocker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self.saves = 0

    def state_dict(self) -> dict[str, Any]:
        self.saves += 1
        return {"payload": _Blocker(self.marker) if self.saves >= 2 else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _job(phase: str, workdir: Path, n_saved: int = 2) -> None:
    warnings.simplefilter("ignore")  # the skipped update is warned about; not the point here
    torch.set_num_threads(1)
    trainer, to_save, handler = _build()
    ckpt_dir = workdir / "ckpt"
    if phase == "crash":
        saver = Checkpoint(to_save, DiskSaver(ckpt_dir, require_empty=False), n_saved=2)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=SAVE_EVERY), saver)
        # After the checkpoint handler on the same event: the checkpoint at READY_AT is complete on disk.
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(once=READY_AT), lambda: (workdir / "ready").write_text("checkpointed")
        )
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: time.sleep(0.5) if e.state.iteration >= READY_AT else None
        )
    elif phase == "resume":
        path = _newest_checkpoint(ckpt_dir)
        Checkpoint.load_objects(to_save, torch.load(path, weights_only=False))
        (workdir / "resumed_from").write_text(str(trainer.state.iteration))
    elif phase == "slow-save":
        saver = Checkpoint(
            {**to_save, "probe": _Probe(workdir / "saving")}, DiskSaver(ckpt_dir, require_empty=False), n_saved=n_saved
        )
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=3), saver)
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(once=3), lambda: torch.save(handler.state_dict(), workdir / "reference.pt")
        )
    trainer.run(range(EPOCH_LENGTH), max_epochs=MAX_EPOCHS)
    torch.save(_final(trainer, handler), workdir / f"{phase}.pt")


def _run_until_marker(args: list[str], marker: Path, timeout: float = 60.0) -> None:
    """Start the job, wait for ``marker``, SIGKILL it; the job must not have finished by itself."""
    proc = subprocess.Popen([*_THIS_MODULE, *args], cwd=_ROOT)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the job {args} ended (code {proc.returncode}) before writing {marker.name}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the job {args} wrote no {marker.name} within {timeout} s")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


# ----------------------------------------------------------------------------- crash and resume


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_bit_identical_ema(tmp_path: Path) -> None:
    full_dir, crash_dir = tmp_path / "full", tmp_path / "crash"
    full_dir.mkdir()
    crash_dir.mkdir()
    full_job = subprocess.Popen([*_THIS_MODULE, "full", str(full_dir)], cwd=_ROOT)
    _run_until_marker(["crash", str(crash_dir)], crash_dir / "ready")
    assert not (crash_dir / "crash.pt").exists()
    subprocess.run([*_THIS_MODULE, "resume", str(crash_dir)], check=True, cwd=_ROOT)
    assert full_job.wait(timeout=120) == 0

    start = int((crash_dir / "resumed_from").read_text())
    assert READY_AT <= start < EPOCH_LENGTH * MAX_EPOCHS and start % SAVE_EVERY == 0
    full = torch.load(full_dir / "full.pt", weights_only=False)
    resumed = torch.load(crash_dir / "resume.pt", weights_only=False)
    assert resumed["momentum"] == full["momentum"]
    assert resumed["skipped"] == full["skipped"] == 1  # the NaN at iteration 4 came before the crash
    assert_same_state(resumed["handler"], full["handler"])
    assert full["handler"]["num_averaged"] == EPOCH_LENGTH * MAX_EPOCHS // 2 - 1  # one update skipped
    for name, tensor in full["ema_model"].items():
        assert torch.equal(resumed["ema_model"][name], tensor), name


# ----------------------------------------------------------------------------- a checkpoint killed mid-write


@pytest.mark.slow
@pytest.mark.parametrize("n_saved", [2, 1])
def test_a_checkpoint_killed_mid_write_leaves_a_temp_file_and_the_previous_one(tmp_path: Path, n_saved: int) -> None:
    """DiskSaver writes to a temporary file in the directory and renames it when complete (``atomic=True``).

    Killed while writing the second checkpoint, the directory holds the temporary
    file (``tmp`` + 8 random characters, no ``.pt`` suffix, empty here, not a
    loadable checkpoint, never deleted: clean such files up by hand) and, with
    ``n_saved=2``, the first checkpoint, which loads.
    With ``n_saved=1`` Ignite's Checkpoint deletes the previous file *before*
    writing the next one, so the crash leaves no checkpoint at all: keep
    ``n_saved >= 2`` where a save can be interrupted.
    """
    _run_until_marker(["slow-save", str(tmp_path), str(n_saved)], tmp_path / "saving")
    listing = sorted(os.listdir(tmp_path / "ckpt"))
    complete = [name for name in listing if name.endswith(".pt")]
    partial = [name for name in listing if not name.endswith(".pt")]
    assert len(partial) == 1 and re.fullmatch(r"tmp\w{8}", partial[0]), listing
    # torch.save pickles into memory before it writes anything, so a kill while pickling leaves it empty.
    assert (tmp_path / "ckpt" / partial[0]).stat().st_size == 0
    with pytest.raises(EOFError):
        torch.load(tmp_path / "ckpt" / partial[0], weights_only=False)
    if n_saved == 1:
        assert complete == []
        return
    assert complete == ["checkpoint_3.pt"]
    trainer, to_load, handler = _build()
    Checkpoint.load_objects(to_load, torch.load(tmp_path / "ckpt" / complete[0], weights_only=False))
    assert trainer.state.iteration == 3
    assert_same_state(handler.state_dict(), torch.load(tmp_path / "reference.pt", weights_only=False))


if __name__ == "__main__":
    _job(sys.argv[1], Path(sys.argv[2]), *(int(a) for a in sys.argv[3:]))
