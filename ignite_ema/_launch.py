"""Run a function on several local processes: torch.distributed over gloo, through ``ignite.distributed``."""

from __future__ import annotations

import gc
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ignite.distributed as idist
import torch
from ignite.distributed.launcher import Parallel

__all__ = ["run_on_processes"]

T = TypeVar("T")


def free_port() -> int:
    """A port nobody listens on now: ignite's default (2222) can still be held by the previous run's store."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_on_processes(nproc: int, fn: Callable[..., T], *args: Any) -> list[T]:
    """``fn(*args)`` on ``nproc`` local CPU processes (``idist.Parallel``, gloo, a fresh port).

    Returns every rank's result, in rank order. ``fn`` must be a module-level function (it is pickled to the
    processes) and its result picklable.
    """
    with tempfile.TemporaryDirectory() as scratch:
        with Parallel(backend="gloo", nproc_per_node=nproc, master_addr="127.0.0.1", master_port=free_port()) as p:
            p.run(_rank_main, fn, args, Path(scratch))
        return [pickle.loads((Path(scratch) / f"rank{rank}.pkl").read_bytes()) for rank in range(nproc)]


def _rank_main(local_rank: int, fn: Callable[..., Any], args: tuple[Any, ...], result_dir: Path) -> None:
    torch.set_num_threads(1)  # one core per process
    result = fn(*args)
    (result_dir / f"rank{idist.get_rank()}.pkl").write_bytes(pickle.dumps(result))
    del result
    # A finished run's DDP wrapper and engines sit in reference cycles that keep the process group alive, so the
    # destroy_process_group() that ignite calls next could not free it: its gloo threads would outlive the
    # interpreter, and one of them dropping a tensor during finalisation aborts the process ("terminate called
    # without an active exception", pytorch/pytorch#190489). Collecting the cycles now lets the group be freed,
    # and its threads joined, while the interpreter is still whole.
    gc.collect()
    idist.barrier()  # no rank tears the process group down while another still uses it
