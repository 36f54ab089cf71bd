"""Starting the examples' runs on several local processes (torch.distributed over gloo, through ignite.distributed)."""

from __future__ import annotations

import socket

from ignite.distributed.launcher import Parallel


def free_port() -> int:
    """A port nobody listens on now: ignite's default (2222) can still be held by the previous run's store."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gloo_processes(nproc: int) -> Parallel:
    """``idist.Parallel`` on ``nproc`` local CPU processes, each run on a fresh port."""
    return Parallel(backend="gloo", nproc_per_node=nproc, master_addr="127.0.0.1", master_port=free_port())
