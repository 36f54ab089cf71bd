"""Running one of the examples' runs on several local processes (torch.distributed over gloo, ignite.distributed)."""

from __future__ import annotations

import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ignite.distributed as idist
import torch
from ignite.distributed.launcher import Parallel

T = TypeVar("T")


def free_port() -> int:
    """A port nobody listens on now: ignite's default (2222) can still be held by the previous run's store."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_on_processes(nproc: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``nproc`` local CPU processes (``idist.Parallel``, gloo, a fresh port); rank 0's result.

    ``fn`` must be a module-level function (it is pickled to the processes) and its result picklable.
    """
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.pkl"
        with Parallel(backend="gloo", nproc_per_node=nproc, master_addr="127.0.0.1", master_port=free_port()) as p:
            p.run(_rank_main, fn, args, result_path)
        result: T = pickle.loads(result_path.read_bytes())
        return result


def _rank_main(local_rank: int, fn: Callable[..., Any], args: tuple[Any, ...], result_path: Path) -> None:
    torch.set_num_threads(1)  # one core per process
    result = fn(*args)
    if idist.get_rank() == 0:
        result_path.write_bytes(pickle.dumps(result))
    idist.barrier()  # no rank tears the process group down while another still uses it
