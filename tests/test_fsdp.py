"""The EMA of an FSDP2 student: 2 real gloo processes on the CPU, real ``fully_shard``.

Workers run in processes started by ``ignite_ema._launch.run_on_processes``; each
returns what it saw (whole tensors), and the test process checks it against
references: an EMA computed here by a plain loop from the gathered student
(``full_tensor()``) at every step, and unsharded copies of the model.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ignite_ema import EMAHandler, ModelEMA
from ignite_ema._launch import run_on_processes
from tests.helpers import assert_same_state

pytestmark = pytest.mark.slow
ITERATIONS = 6


class Net(nn.Module):
    """An uneven shard (``embed``: 5 rows over 2 ranks), BatchNorm statistics and tied weights.

    Under a bf16 ``MixedPrecisionPolicy`` FSDP2 casts parameters but not buffers, and BatchNorm refuses bf16
    inputs with float32 statistics: that model has no BatchNorm (``bn=False``).
    """

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.bn: nn.Module = nn.BatchNorm1d(5) if bn else nn.Identity()
        self.a = nn.Linear(5, 5, bias=False)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.embed(x)))
        return self.head(torch.relu(self.b(torch.relu(self.a(h)))))


def _shard(model: nn.Module, mixed: bool = False, **kwargs: Any) -> nn.Module:
    """``fully_shard`` on ``embed`` and the root (the tied pair must share a unit), on a 1-d CPU mesh of 2."""
    mesh = init_device_mesh("cpu", (idist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    options: dict[str, Any] = {"mesh": mesh, **kwargs}
    if policy is not None:
        options["mp_policy"] = policy
    fully_shard(model.embed, **options)
    fully_shard(model, **options)
    return model


def _build(mixed: bool = False) -> nn.Module:
    torch.manual_seed(0)  # every rank starts from the same weights
    return _shard(Net(bn=not mixed), mixed)


def _batch(iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * idist.get_rank() + iteration)
    return torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)


def _whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (gathered) and buffer of a sharded model, by name, copied."""
    tensors = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()
    }
    tensors.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return tensors


def _trainer(model: nn.Module, handler: EMAHandler, teacher: nn.Module | None = None) -> tuple[Engine, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)

    def step(engine: Engine, _: object) -> None:
        x, y = _batch(engine.state.iteration)
        model.train()
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = loss + nn.functional.mse_loss(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return Engine(step), optimizer


# ----------------------------------------------------------------------------- workers


def _averaging_worker(mixed: bool) -> dict[str, Any]:
    """Shadows only, half-life, every=2: the EMA after each update, the gathered student, the swap, the export."""
    model = _build(mixed)
    handler = EMAHandler(model, half_life=3, handle_buffers="update")
    trainer, _ = _trainer(model, handler)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=2))
    seen: list[dict[str, Any]] = []

    def record(engine: Engine) -> None:
        ema = {n: t.clone() for n, t in handler.state_dict()["tensors"].items()}  # unsharded ones are references
        seen.append({"momentum": engine.state.ema_momentum, "student": _whole(model), "ema": ema})

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    initial = _whole(model)
    trainer.run(range(ITERATIONS), max_epochs=1)

    x = _batch(99)[0]
    model.eval()
    own = _whole(model)
    with torch.no_grad(), handler.swapped():
        swapped_in = _whole(model)  # before a forward gathers them (in bf16 under mixed precision)
        inside = model(x)
    own_after = _whole(model)  # at once: no parameter may still show the EMA's values gathered inside the swap
    with torch.no_grad():
        after = model(x)
    model.reshard()  # FSDP2 keeps the root's parameters gathered after a forward without backward
    shard_elements = sum(p.to_local().numel() for p in model.parameters())
    ema_elements = sum(
        t.to_local().numel() for n, t in handler.sharded_state_dict()["tensors"].items() if isinstance(t, DTensor)
    )
    return {
        "initial": initial,
        "seen": seen,
        "x": x,
        "inside": inside,
        "after": after,
        "own": own,
        "own_after": own_after,
        "swapped_in": swapped_in,
        "export": handler.model_state_dict(),
        "has_ema_model": handler.has_ema_model,
        "elements": (shard_elements, ema_elements),
    }


def _teacher_worker() -> dict[str, Any]:
    """A sharded "ema_train" teacher; shadows-only "copy" with sync_buffers; a NaN on rank 1; bad inputs."""
    results: dict[str, Any] = {"rank": idist.get_rank()}
    student = _build()
    torch.manual_seed(5)
    teacher = _shard(Net())  # other initial values: overwritten by the student's
    initial_student = _whole(student)
    handler = EMAHandler(student, momentum=0.3, handle_buffers="ema_train", ema_model=teacher)
    trainer, _ = _trainer(student, handler, teacher)
    handler.attach(trainer)
    weights: list[dict[str, torch.Tensor]] = []
    students: list[dict[str, torch.Tensor]] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda: weights.append(_whole(teacher)))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda: students.append(_whole(student)))
    trainer.run(range(ITERATIONS), max_epochs=1)
    results["teacher"] = {
        "initial_student": initial_student,
        "before_each_step": weights,
        "student_after_each_step": students,
        "final": _whole(teacher),  # after the last update: not the weights its last forward gathered
        "student": _whole(student),
    }

    synced = _build()
    handler = EMAHandler(synced, momentum=0.3, sync_buffers="update", skip_nonfinite=True)
    trainer, _ = _trainer(synced, handler)
    stash: dict[str, torch.Tensor] = {}

    def poison(engine: Engine) -> None:  # rank 1's shard only, put back after the update
        if idist.get_rank() == 1:
            local = synced.embed.weight.to_local()
            stash["w"] = local.detach().clone()
            with torch.no_grad():
                local[0, 0] = float("nan")

    def restore() -> None:
        if stash:
            with torch.no_grad():
                synced.embed.weight.to_local().copy_(stash.pop("w"))

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), poison)
    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), restore)
    history: list[dict[str, torch.Tensor]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda: history.append({n: t.clone() for n, t in handler.state_dict()["tensors"].items()}),
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped update is warned about; counted below
        trainer.run(range(ITERATIONS), max_epochs=1)
    results["synced"] = {"history": history, "skipped": trainer.state.ema_momentum_skipped}

    # A bf16 sharded student without an EMA model: float32 shards are the EMA, and the swap rounds them in.
    low = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    nn.init.zeros_(low.weight)
    fully_shard(low, mesh=init_device_mesh("cpu", (idist.get_world_size(),)))
    low_ema = ModelEMA(low)
    with torch.no_grad():
        low.weight.to_local().fill_(1.0)
    for _ in range(5):
        low_ema.update(0.001)  # 1 - 0.999 ** 5, below bf16's resolution near 0.005
    with low_ema.swapped():
        inside = low.weight.full_tensor().clone()
    results["bf16"] = {
        "ema": low_ema.state_dict()["tensors"].get("weight"),  # rank 0 only
        "shard": low_ema.sharded_state_dict()["tensors"]["weight"].full_tensor(),
        "inside": inside,
        "after": low.weight.full_tensor(),
    }

    errors = {}

    def square(**kwargs: Any) -> nn.Module:  # dim 1 of its weight splits evenly over 2 ranks
        torch.manual_seed(0)
        layer = nn.Linear(4, 4)
        fully_shard(layer, **kwargs)
        return layer

    mesh = init_device_mesh("cpu", (idist.get_world_size(),))
    mesh_2d = init_device_mesh("cpu", (1, idist.get_world_size()), mesh_dim_names=("replicate", "shard"))
    for label, build in {
        "unsharded": lambda: nn.Linear(4, 4),
        "other placement": lambda: square(mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None),
        "other mesh": lambda: square(mesh=mesh_2d),
    }.items():
        try:
            EMAHandler(square(mesh=mesh), ema_model=build())
        except ValueError as error:
            errors[label] = str(error)
    for label, kwargs in {"ema_train": {"handle_buffers": "ema_train"}, "device": {"device": "cpu"}}.items():
        try:
            EMAHandler(square(mesh=mesh), **kwargs)  # type: ignore[arg-type]
        except ValueError as error:
            errors[label] = str(error)
    results["errors"] = errors
    return results


class _FullState:
    """The model and optimizer of an FSDP2 run as whole tensors: what Ignite's Checkpoint (rank 0 writes) needs."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model, options=self.options),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=self.options),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)


def _resume_worker(phase: str, workdir: Path) -> dict[str, Any]:
    """``first``: checkpoint at iteration 3 both ways, run to the end; ``ignite`` / ``dcp``: resume from one."""
    model = _build(mixed=True)
    handler = EMAHandler(model, half_life=4, handle_buffers="update", skip_nonfinite=True)
    trainer, optimizer = _trainer(model, handler)
    handler.attach(trainer, event=Events.ITERATION_COMPLETED(every=2))
    full = _FullState(model, optimizer)

    def sharded() -> dict[str, Any]:  # each rank's shards, for torch.distributed.checkpoint
        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "ema": handler.sharded_state_dict(),
            "trainer": trainer.state_dict(),
        }

    if phase == "first":
        saver = Checkpoint(
            {"run": full, "trainer": trainer, "ema": handler}, DiskSaver(workdir / "ignite", require_empty=False)
        )
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), saver)

        def sharded_save(engine: Engine) -> None:
            dcp.save(sharded(), checkpoint_id=str(workdir / "dcp"))

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), sharded_save)
    elif phase == "ignite":
        path = next((workdir / "ignite").glob("checkpoint_*.pt"))
        Checkpoint.load_objects({"run": full, "trainer": trainer, "ema": handler}, torch.load(path, weights_only=False))
    else:
        state = sharded()
        dcp.load(state, checkpoint_id=str(workdir / "dcp"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        handler.load_state_dict(state["ema"])
        trainer.load_state_dict(state["trainer"])
    start = trainer.state.iteration
    trainer.run(range(ITERATIONS), max_epochs=1)
    return {"start": start, "ema": handler.state_dict(), "momentum": trainer.state.ema_momentum}


def _local_load_and_rebind_worker() -> dict[str, Any]:
    """Whole tensors loaded by one rank alone (no collective); rebind() after the student was (un)sharded."""
    # The model's mesh gets a group of its own with a short timeout: a load that communicated would wait for the
    # rank that does not load, and fail here within the timeout instead of hanging the test.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=20))
    mesh = DeviceMesh.from_group(group, "cpu")
    torch.manual_seed(0)
    model = _shard(Net(), mesh=mesh)
    ema = ModelEMA(model, "update")
    state = [ema.state_dict()]  # whole tensors: a collective, on every rank, kept by rank 0 (it writes)
    dist.broadcast_object_list(state)  # what every rank reads back from rank 0's checkpoint
    wanted = {n: t + 1 for n, t in state[0]["tensors"].items()}  # the EMA of another run, say
    errors: dict[str, str] = {}
    for loader in range(idist.get_world_size()):  # each rank loads alone while the others wait outside
        if idist.get_rank() == loader:
            try:
                ema.load_state_dict({**state[0], "tensors": wanted})
            except RuntimeError as error:  # a timed-out collective
                errors["load"] = str(error)
        idist.barrier()  # on the default group
    failed = torch.tensor([float(bool(errors))])
    dist.all_reduce(failed)  # on the default group: after a timeout, the mesh's group is not used again
    sharded = ema.sharded_state_dict()["tensors"]
    loaded = (
        None if failed.item() else {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in sharded.items()}
    )

    # rebind() on the default group's mesh. The reverse of sharding: a parameter replaced by a whole one.
    model = _build()
    ema = ModelEMA(model)
    model.head.weight = nn.Parameter(torch.zeros(2, 5))
    try:
        ema.rebind()
    except ValueError as error:
        errors["unsharded later"] = str(error)
    later = nn.Linear(4, 4)
    later_ema = ModelEMA(later)
    fully_shard(later, mesh=init_device_mesh("cpu", (idist.get_world_size(),)))
    try:
        later_ema.rebind()
    except ValueError as error:
        errors["sharded later"] = str(error)
    return {"wanted": wanted, "loaded": loaded, "errors": errors}


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "bf16-mixed-precision"])
def averaging(request: pytest.FixtureRequest) -> tuple[bool, list[dict[str, Any]]]:
    """One 2-process run of ``_averaging_worker`` per configuration, shared by the tests that read it."""
    return request.param, run_on_processes(2, _averaging_worker, request.param)


def test_the_sharded_ema_is_the_plain_loop_ema_of_the_gathered_student_bit_for_bit(
    averaging: tuple[bool, list[dict[str, Any]]],
) -> None:
    mixed, ranks = averaging
    for rank in ranks:
        assert not rank["has_ema_model"]  # a sharded module cannot be deep-copied: shards only
        reference = {n: t.clone() for n, t in rank["initial"].items()}
        for iteration, seen in enumerate(rank["seen"], start=1):
            if iteration % 2 == 0:  # updates every 2 iterations: delta 2, half-life 3
                assert seen["momentum"] == pytest.approx(1 - 0.5 ** (2 / 3), rel=1e-12)
                for name, tensor in seen["student"].items():
                    if tensor.is_floating_point():  # parameters and BatchNorm statistics, averaged
                        reference[name] = torch.lerp(reference[name], tensor, seen["momentum"])
                    else:
                        reference[name] = tensor.clone()
            for name, tensor in reference.items():
                if name != "b.weight" and name in seen["ema"]:  # b.weight is tied to a.weight: averaged once
                    assert torch.equal(seen["ema"][name], tensor), (iteration, name)
        assert "b.weight" not in rank["seen"][-1]["ema"]
        # Each rank keeps the EMA of its own shards only: the same number of elements as its shards.
        assert rank["elements"][0] == rank["elements"][1]
        # The export loads into an unsharded model and holds the EMA, tied weights under both names.
        plain = Net(bn=not mixed)
        plain.load_state_dict(rank["export"])
        for name, tensor in reference.items():
            assert torch.equal(plain.state_dict()[name], tensor), name
    # state_dict(): sharded tensors whole, on the CPU, on rank 0 alone (it writes checkpoints); rank 1's state has
    # the unsharded ones (BatchNorm statistics) only. Uneven shards: 5 rows of embed.weight split 3 + 2.
    whole, others = ranks[0]["seen"][-1]["ema"], ranks[1]["seen"][-1]["ema"]
    assert set(whole) == {n for n in ranks[0]["initial"] if n != "b.weight"}
    assert all(t.device.type == "cpu" for t in whole.values())
    assert set(others) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} & set(whole)


def test_inside_a_swap_the_sharded_student_runs_with_the_ema_and_after_it_is_itself(
    averaging: tuple[bool, list[dict[str, Any]]],
) -> None:
    mixed, ranks = averaging
    for rank in ranks:
        ema = {**ranks[0]["seen"][-1]["ema"], **rank["seen"][-1]["ema"]}  # whole tensors from rank 0; own statistics
        for name, tensor in rank["swapped_in"].items():
            assert torch.equal(tensor, ema["a.weight" if name == "b.weight" else name]), name
        plain = Net(bn=not mixed)
        plain.load_state_dict(rank["export"])
        plain.eval()
        if mixed:  # FSDP computes in bf16 under this policy: compare with the same in a bf16 copy
            plain.to(torch.bfloat16)
        with torch.no_grad():
            expected = plain(rank["x"].to(next(plain.parameters()).dtype))
        tolerance = {"rtol": 2e-2, "atol": 2e-2} if mixed else {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(rank["inside"].to(expected.dtype), expected, **tolerance)
        for name, tensor in rank["own"].items():
            assert torch.equal(rank["own_after"][name], tensor), name
        assert not torch.equal(rank["after"], rank["inside"])


def test_a_sharded_teacher_keeps_statistics_of_its_own_and_ranks_agree_on_skips_and_buffers() -> None:
    ranks = run_on_processes(2, _teacher_worker)
    for rank in ranks:
        # The "ema_train" teacher: its statistics are what an unsharded teacher with the same weights gathers
        # on the same batches, and not the student's.
        teacher, student = rank["teacher"]["final"], rank["teacher"]["student"]
        replay = Net().train()
        for iteration, weights in enumerate(rank["teacher"]["before_each_step"], start=1):
            with torch.no_grad():
                for name, param in replay.named_parameters():
                    param.copy_(weights[name])
                gen = torch.Generator().manual_seed(1000 * rank["rank"] + iteration)
                replay(torch.randn(8, 3, generator=gen))
        for name in ("bn.running_mean", "bn.running_var"):
            torch.testing.assert_close(teacher[name], getattr(replay.bn, name.split(".")[1]), rtol=1e-5, atol=1e-6)
            assert not torch.equal(teacher[name], student[name])
        assert teacher["bn.num_batches_tracked"].item() == ITERATIONS
        # Its weights: the student's at construction (not its own initial values), then a plain-loop EMA of the
        # gathered student at momentum 0.3, bit for bit.
        before = rank["teacher"]["before_each_step"]
        reference = {n: rank["teacher"]["initial_student"][n].clone() for n, _ in Net().named_parameters()}
        for name, tensor in reference.items():
            assert torch.equal(before[0][name], tensor), name
        after_updates = [*before[1:], teacher]
        for iteration, (seen, gathered) in enumerate(
            zip(after_updates, rank["teacher"]["student_after_each_step"], strict=True), start=1
        ):
            for name in reference:
                reference[name] = torch.lerp(reference[name], gathered[name], 0.3)
                assert torch.equal(seen[name], reference[name]), (iteration, name)
        # A NaN in rank 1's shard at iteration 3: both ranks skip that update.
        history = rank["synced"]["history"]
        assert rank["synced"]["skipped"] == 1
        for name, tensor in history[1].items():
            assert torch.equal(history[2][name], tensor), name
    for a, b in zip(ranks[0]["synced"]["history"], ranks[1]["synced"]["history"], strict=True):
        assert b  # rank 1's state: its unsharded tensors (the statistics), which sync_buffers makes rank 0's too
        for name, tensor in b.items():
            assert torch.equal(tensor, a[name]), name
    assert ranks[1]["bf16"]["ema"] is None
    for rank in ranks:
        low = rank["bf16"]
        if low["ema"] is None:
            low["ema"] = low["shard"]
        assert low["ema"].dtype == torch.float32
        torch.testing.assert_close(low["ema"], torch.full((4, 4), 1 - 0.999**5), rtol=1e-6, atol=0)
        assert torch.equal(low["inside"], low["ema"].to(torch.bfloat16))
        assert torch.equal(low["after"], torch.ones(4, 4, dtype=torch.bfloat16))
    errors = ranks[0]["errors"]
    assert (
        "ema_model's tensor 'weight' is not sharded like the student's: it is sharded in the student"
        in errors["unsharded"]
    )
    assert "placements are [Shard(dim=0)], ema_model's [Shard(dim=1)]" in errors["other placement"]
    assert "the student's mesh is" in errors["other mesh"]
    assert "pass ema_model=fully_shard(" in errors["ema_train"]
    assert "device= is not supported for a sharded student" in errors["device"]


def test_whole_tensors_load_on_one_rank_alone_and_rebind_refuses_a_student_sharded_otherwise() -> None:
    for rank in run_on_processes(2, _local_load_and_rebind_worker):
        errors = rank["errors"]
        assert "load" not in errors, errors["load"]
        for name, tensor in rank["wanted"].items():  # each rank's shards cut from the whole tensors, gathered back
            assert torch.equal(rank["loaded"][name], tensor), name
        assert "the student's tensor 'head.weight' was sharded when the EMA was built" in errors["unsharded later"]
        assert "the student's tensor 'weight' was not sharded when the EMA was built" in errors["sharded later"]
        assert "build the EMA after fully_shard()" in errors["sharded later"]


def test_resume_through_ignites_checkpoint_and_through_dcp_in_fresh_processes_is_bit_identical(tmp_path: Path) -> None:
    first = run_on_processes(2, _resume_worker, "first", tmp_path)
    assert sorted(p.name for p in (tmp_path / "ignite").iterdir()) == ["checkpoint_3.pt"]  # rank 0 alone wrote
    for phase in ("ignite", "dcp"):
        resumed = run_on_processes(2, _resume_worker, phase, tmp_path)
        for rank, (done, again) in enumerate(zip(first, resumed, strict=True)):
            assert again["start"] == 3, phase
            assert again["momentum"] == done["momentum"]
            assert done["ema"]["num_averaged"] == ITERATIONS // 2  # every=2: the runs compared did average
            assert_same_state(again["ema"], done["ema"], (phase, rank))
    shutil.rmtree(tmp_path / "dcp")
