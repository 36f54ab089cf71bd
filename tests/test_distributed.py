"""EMAHandler under torch.distributed, through ignite.distributed: 2 real gloo processes on the CPU.

The workers (``_ddp_worker``, ``_sync_worker``, ...) run in processes started by
``ignite_ema._launch.run_on_processes`` (``idist.Parallel(backend="gloo")``);
each returns what it saw, and the test process checks the ranks' results
against each other and against references computed here.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_ema import EMAHandler, ModelEMA
from ignite_ema._launch import run_on_processes
from tests.helpers import BNNet, clone_state

ITERATIONS = 8


def _batch(rank: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own batch: what makes BatchNorm statistics differ between ranks."""
    gen = torch.Generator().manual_seed(1000 * rank + iteration)
    return torch.randn(8, 3, 6, 6, generator=gen), torch.randn(8, 2, generator=gen)


def _snapshot(handler: EMAHandler) -> dict[str, torch.Tensor]:
    """The EMA model's tensors and the handler's shadows, copied."""
    tensors = {f"model.{k}": v.clone() for k, v in handler.ema_model.state_dict().items()}
    tensors.update({f"state.{k}": v.clone() for k, v in handler.state_dict()["tensors"].items()})
    return tensors


def _record(engine: Engine, history: list[dict[str, torch.Tensor]], handler: EMAHandler) -> None:
    history.append(_snapshot(handler))


def _train(
    rank: int,
    handle_buffers: str,
    sync_buffers: str | None,
    *,
    poison_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Engine, EMAHandler, nn.Module, torch.optim.Optimizer]:
    """A DDP student (and, in "ema_train", a teacher that runs on each rank's own batches)."""
    torch.manual_seed(0)
    student = BNNet().to(dtype)
    model = idist.auto_model(student)  # DistributedDataParallel over gloo
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handler = EMAHandler(
        model,
        momentum=0.3,
        handle_buffers=handle_buffers,
        sync_buffers=sync_buffers,
        skip_nonfinite=poison_rank is not None,
    )

    def step(engine: Engine, batch: object) -> None:
        x, y = (t.to(dtype) for t in _batch(rank, engine.state.iteration))
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
        if handle_buffers == "ema_train":
            with torch.no_grad():
                target = handler.ema_model(x)
            loss = loss + nn.functional.mse_loss(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == poison_rank and engine.state.iteration == 3:
            # Only this rank's student statistics: DDP broadcasts rank 0's buffers again at the next forward.
            student.bn.running_var[0] = float("nan")

    trainer = Engine(step)
    handler.attach(trainer)
    return trainer, handler, student, optimizer


# ----------------------------------------------------------------------------- workers (run in the gloo processes)


def _ddp_worker(workdir: Path) -> dict[str, Any]:
    rank = idist.get_rank()
    trainer, handler, student, optimizer = _train(rank, "copy", None)
    initial = {k: v.detach().clone() for k, v in student.named_parameters()}
    history: list[dict[str, Any]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda: history.append(
            {"student": {k: v.detach().clone() for k, v in student.named_parameters()}, "ema": _snapshot(handler)}
        ),
    )
    ckpt_dir = workdir / "ckpt"
    to_save = {"model": student, "optimizer": optimizer, "trainer": trainer, "ema": handler}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(every=4), Checkpoint(to_save, DiskSaver(ckpt_dir, require_empty=False), n_saved=2)
    )
    trainer.run(range(ITERATIONS // 2), max_epochs=2)
    idist.barrier()  # rank 0 has written the last checkpoint
    fresh = EMAHandler(BNNet(), momentum=0.3)  # a resumed job on this rank
    Checkpoint.load_objects({"ema": fresh}, torch.load(ckpt_dir / f"checkpoint_{ITERATIONS}.pt", weights_only=False))
    return {
        "world_size": idist.get_world_size(),
        "wrapper": type(handler.model).__name__,
        "initial": initial,
        "history": history,
        "loaded": clone_state(fresh),
    }


SYNC_CONFIGS = {
    "ema_train-nosync": ("ema_train", None, torch.float32),
    "ema_train-sync": ("ema_train", "update", torch.float32),
    "update-sync": ("update", "update", torch.float32),
    "copy-sync": ("copy", "update", torch.float32),
    # float32 shadows behind a bf16 EMA model: the ranks' average must reach the EMA model, not only the shadows
    "update-sync-bf16": ("update", "update", torch.bfloat16),
}


def _sync_worker() -> dict[str, Any]:
    rank = idist.get_rank()
    results: dict[str, Any] = {}
    for name, (mode, sync, dtype) in SYNC_CONFIGS.items():
        trainer, handler, _, _ = _train(rank, mode, sync, dtype=dtype)
        history: list[dict[str, torch.Tensor]] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, _record, history, handler)
        trainer.run(range(ITERATIONS), max_epochs=1)
        results[name] = {"history": history}
        if sync is None:  # the same average, paid once at the end instead of at every update
            handler.average_buffers_across_ranks()
            results[name]["synced_at_end"] = _snapshot(handler)
    return results


def _skip_worker() -> dict[str, Any]:
    rank = idist.get_rank()
    # Only rank 1's student has a NaN (in a copied BatchNorm buffer), at iteration 3.
    trainer, handler, _, _ = _train(rank, "copy", None, poison_rank=1)
    history: list[dict[str, torch.Tensor]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, _record, history, handler)
    trainer.run(range(ITERATIONS), max_epochs=1)
    return {"history": history, "skipped": trainer.state.ema_momentum_skipped}


def _host_reads(fn: Any) -> int:
    """How many times ``fn`` reads a tensor's value back to the host (``aten::_local_scalar_dense``: ``bool()``,
    ``.item()``): on a GPU, each is a host synchronisation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name == "aten::_local_scalar_dense")


def _nonfinite_check_worker() -> dict[str, Any]:
    from ignite_ema import ModelEMA

    model = BNNet()
    ema = ModelEMA(model)
    finite = (_host_reads(ema.nonfinite_student), ema.nonfinite_student())
    if idist.get_rank() == 1:
        with torch.no_grad():
            model.head.bias[0] = float("nan")
    return {"finite": finite, "nan": ema.nonfinite_student()}


def _threads_left_at_exit_worker(workdir: Path) -> None:
    # atexit runs after ignite has destroyed the process group and before the interpreter finalises.
    rank = idist.get_rank()
    atexit.register(lambda: (workdir / f"threads{rank}.txt").write_text("\n".join(_thread_names())))
    trainer, _, _, _ = _train(rank, "ema_train", "update")
    trainer.run(range(ITERATIONS), max_epochs=1)


def _thread_names() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_ddp_ema_is_identical_on_every_rank_and_rank_0_checkpoints_load_everywhere(tmp_path: Path) -> None:
    ranks = run_on_processes(2, _ddp_worker, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["wrapper"] == "BNNet"  # the DDP wrapper was unwrapped
    history0, history1 = ranks[0]["history"], ranks[1]["history"]
    assert len(history0) == len(history1) == ITERATIONS
    params = [f"model.{name}" for name in ranks[0]["initial"]]
    for iteration, (seen0, seen1) in enumerate(zip(history0, history1, strict=True), start=1):
        for name in params:
            assert torch.equal(seen0["ema"][name], seen1["ema"][name]), (iteration, name)

    # The EMA weights are the plain-loop average of the (DDP-synchronised) student's.
    expected = {name: tensor.double() for name, tensor in ranks[0]["initial"].items()}
    for seen in history0:
        expected = {name: 0.7 * e + 0.3 * seen["student"][name].double() for name, e in expected.items()}
    for name, tensor in expected.items():
        torch.testing.assert_close(history0[-1]["ema"][f"model.{name}"].double(), tensor, rtol=1e-5, atol=1e-6)

    # Without sync_buffers, the copied BatchNorm statistics are each rank's own.
    last0, last1 = history0[-1]["ema"], history1[-1]["ema"]
    assert not torch.equal(last0["model.bn.running_mean"], last1["model.bn.running_mean"])

    # Rank 0 alone wrote the checkpoints (n_saved=2, no temporary file left); the file holds rank 0's EMA...
    ckpt_dir = tmp_path / "ckpt"
    assert sorted(os.listdir(ckpt_dir)) == [f"checkpoint_{ITERATIONS // 2}.pt", f"checkpoint_{ITERATIONS}.pt"]
    saved = torch.load(ckpt_dir / f"checkpoint_{ITERATIONS}.pt", weights_only=False)["ema"]
    for name, tensor in saved["tensors"].items():
        assert torch.equal(tensor, last0[f"state.{name}"]), name
    assert not torch.equal(saved["tensors"]["bn.running_mean"], last1["state.bn.running_mean"])
    # ...and loads on every rank, bit for bit, counters included.
    for rank in ranks:
        loaded = rank["loaded"]
        assert (loaded["num_averaged"], loaded["last_update_iteration"]) == (ITERATIONS, ITERATIONS)
        for name, tensor in saved["tensors"].items():
            assert torch.equal(loaded["tensors"][name], tensor), name


@pytest.mark.slow
def test_sync_buffers_makes_the_ranks_statistics_identical() -> None:
    ranks = run_on_processes(2, _sync_worker)
    statistics = ("bn.running_mean", "bn.running_var")

    # Without it, each rank's teacher keeps statistics of its own batches; the weights agree anyway.
    nosync0, nosync1 = (r["ema_train-nosync"]["history"][-1] for r in ranks)
    for name in statistics:
        assert not torch.equal(nosync0[f"model.{name}"], nosync1[f"model.{name}"]), name
    assert torch.equal(nosync0["model.conv.weight"], nosync1["model.conv.weight"])

    # With it, every EMA tensor is bit-identical across ranks after every update, in every buffer mode.
    for config in ("ema_train-sync", "update-sync", "copy-sync", "update-sync-bf16"):
        for iteration, (seen0, seen1) in enumerate(
            zip(ranks[0][config]["history"], ranks[1][config]["history"], strict=True), start=1
        ):
            for name, tensor in seen0.items():
                assert torch.equal(tensor, seen1[name]), (config, iteration, name)

    synced = ranks[0]["ema_train-sync"]["history"][-1]
    # Integer buffers are left alone: each teacher ran ITERATIONS forward passes, and that is not averaged into 2x.
    assert synced["model.bn.num_batches_tracked"].item() == ITERATIONS
    # Running statistics are linear in the batch statistics: the ranks' average at every update equals the average
    # of the ranks' unsynchronised statistics at the end (up to rounding), which is also what one
    # average_buffers_across_ranks() call at the end gives, identically on both ranks.
    at_end0, at_end1 = (r["ema_train-nosync"]["synced_at_end"] for r in ranks)
    for name in statistics:
        mean_of_ranks = (nosync0[f"model.{name}"] + nosync1[f"model.{name}"]) / 2
        torch.testing.assert_close(synced[f"model.{name}"], mean_of_ranks, rtol=1e-5, atol=1e-6)
        assert torch.equal(at_end0[f"model.{name}"], at_end1[f"model.{name}"])
        torch.testing.assert_close(at_end0[f"model.{name}"], synced[f"model.{name}"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ranks_agree_on_skipping_a_nonfinite_update() -> None:
    # Rank 1 alone sees the NaN; if it skipped alone, its EMA weights would part from rank 0's for good.
    ranks = run_on_processes(2, _skip_worker)
    for rank in ranks:
        assert rank["skipped"] == 1
        history = rank["history"]
        for name, tensor in history[1].items():  # iteration 3 left the EMA as iteration 2 did
            assert torch.equal(history[2][name], tensor), name
        assert not torch.equal(history[3]["model.conv.weight"], history[2]["model.conv.weight"])
    for seen0, seen1 in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        for name, tensor in seen0.items():
            if "bn.running" not in name:  # each rank copies its own statistics (no sync_buffers here)
                assert torch.equal(tensor, seen1[name]), name


def test_the_nonfinite_check_reads_the_host_once_whatever_the_world_size() -> None:
    # The flag is and-ed over the ranks on the device, then read once: one host synchronisation per update on a GPU.
    ranks = run_on_processes(2, _nonfinite_check_worker)
    assert [rank["finite"] for rank in ranks] == [(1, None), (1, None)]
    assert [rank["nan"] for rank in ranks] == ["a student tensor on another rank", "the student's tensor 'head.bias'"]
    ema = ModelEMA(BNNet())
    assert _host_reads(ema.nonfinite_student) == 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_rank_processes_stop_their_gloo_threads_before_the_interpreter_exits(tmp_path: Path) -> None:
    # A finished DDP run keeps its process group alive through reference cycles; gloo threads still running when
    # the interpreter finalises abort the process at random (1 run in ~12 here). run_on_processes must free them.
    run_on_processes(2, _threads_left_at_exit_worker, tmp_path)
    for rank in (0, 1):
        names = (tmp_path / f"threads{rank}.txt").read_text().split()
        assert not [name for name in names if "gloo" in name], (rank, names)


# ----------------------------------------------------------------------------- without a process group


def _run(sync_buffers: str | None) -> EMAHandler:
    torch.manual_seed(0)
    model = BNNet()
    handler = EMAHandler(model, momentum=0.3, handle_buffers="update", sync_buffers=sync_buffers)
    trainer = Engine(lambda engine, batch: model(batch))
    handler.attach(trainer)
    gen = torch.Generator().manual_seed(0)
    trainer.run([torch.randn(8, 3, 6, 6, generator=gen) for _ in range(3)], max_epochs=1)
    handler.average_buffers_across_ranks()
    return handler


def _assert_same(a: EMAHandler, b: EMAHandler) -> None:
    for name, tensor in a.state_dict()["tensors"].items():
        assert torch.equal(tensor, b.state_dict()["tensors"][name]), name


@pytest.mark.filterwarnings("ignore:Local rank information for native distributed setting")
def test_sync_buffers_is_a_no_op_without_distributed_or_with_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _run(None)

    def no_collective(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("all_reduce called with one process")

    monkeypatch.setattr(idist, "all_reduce", no_collective)
    _assert_same(_run("update"), reference)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        _assert_same(_run("update"), reference)
    finally:
        dist.destroy_process_group()
        idist.sync()  # ignite.distributed would otherwise keep the destroyed group as its context
