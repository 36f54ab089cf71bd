"""Run every (run, seed) of the comparison on worker processes, with one Ignite progress bar over all of them."""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar

from examples.sed_f1.data import SEDData, load_npz_dir, synthesize
from examples.sed_f1.experiment import RunResult, TrainConfig, train_run
from ignite_ema import run_on_processes

_TICK = 50  # iterations per progress message


def load_data(data_dir: Path | None, quick: bool) -> SEDData:
    if data_dir is not None:
        return load_npz_dir(data_dir)
    if quick:
        return synthesize(n_labelled=200, n_unlabelled=600, n_test=200)
    return synthesize()


_worker_data: SEDData | None = None


def _init_worker(data_dir: Path | None, quick: bool) -> None:
    """Each worker: one thread (the runs share the cores), and its own copy of the data."""
    global _worker_data
    torch.set_num_threads(1)
    _worker_data = load_data(data_dir, quick)


def _work(name: str, seed: int, config: TrainConfig, log_dir: Path, progress: Any) -> RunResult:
    assert _worker_data is not None
    return train_run(name, seed, _worker_data, config, log_dir, on_iterations=progress.put, every=_TICK)


def _train_on_loaded_data(
    job: tuple[str, int],
    config: TrainConfig,
    log_dir: Path,
    data_args: tuple[Path | None, bool],
    show_progress: bool,
) -> RunResult:
    """One rank of a run trained on several processes: each process loads its own copy of the data."""
    return train_run(job[0], job[1], load_data(*data_args), config, log_dir, progress_bar=show_progress)


def run_distributed(
    jobs: Sequence[tuple[str, int]],
    config: TrainConfig,
    out: Path,
    nproc: int,
    data_args: tuple[Path | None, bool],
    show_progress: bool,
) -> list[RunResult]:
    """Each run on ``nproc`` processes (DDP over gloo, through ``idist.Parallel``), one run after the other."""
    results = []
    for name, seed in jobs:
        log_dir = out / "tensorboard" / f"{name}-seed{seed}"
        results.append(
            run_on_processes(nproc, _train_on_loaded_data, (name, seed), config, log_dir, data_args, show_progress)[0]
        )
    return results


def run_all(
    names: Sequence[str],
    seeds: Sequence[int],
    config: TrainConfig,
    out: Path,
    workers: int,
    data_dir: Path | None = None,
    quick: bool = False,
    show_progress: bool = True,
    nproc: int = 1,
) -> list[RunResult]:
    """Train all runs, ``workers`` at a time (or each on ``nproc`` processes), in (seed, run) order."""
    jobs = [(name, seed) for seed in seeds for name in names]
    if nproc > 1:
        return run_distributed(jobs, config, out, nproc, (data_dir, quick), show_progress)
    context = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    with (
        context.Manager() as manager,
        ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(data_dir, quick)
        ) as pool,
    ):
        ticks = manager.Queue()
        futures = {
            job: pool.submit(_work, job[0], job[1], config, out / "tensorboard" / f"{job[0]}-seed{job[1]}", ticks)
            for job in jobs
        }
        _follow(futures, ticks, total_ticks=len(jobs) * (config.iterations // _TICK), show=show_progress)
        return [futures[job].result() for job in jobs]


def _follow(futures: dict[tuple[str, int], Future[RunResult]], ticks: Any, total_ticks: int, show: bool) -> None:
    """Drive an Ignite engine whose iterations are the workers' progress messages, so ProgressBar shows it."""

    def messages() -> Iterator[int]:
        while True:
            try:
                yield ticks.get(timeout=1.0)
            except queue.Empty:
                # a failed run sends no more ticks: stop following, the caller re-raises its error
                if any(f.done() and f.exception() is not None for f in futures.values()):
                    return
                if all(f.done() for f in futures.values()):
                    return

    follower = Engine(lambda engine, batch: batch)
    if show:
        ProgressBar(desc="SED comparison, iterations of all runs", persist=True).attach(follower)
    if total_ticks:
        follower.run(messages(), max_epochs=1, epoch_length=total_ticks)
