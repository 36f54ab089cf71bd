"""Run every (run, seed, configuration) of a comparison on worker processes, with one Ignite progress bar.

The synthetic data is made once, on the same workers, and written in the
``--data`` layout to ``<out>/features``; every training process reads it from
there (and a later job with the same data settings reuses it). Each job logs to
a TensorBoard folder of its own, ``<out>/tensorboard/<start time>``, so that a
rerun never adds events to an earlier job's runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import queue
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar

from examples.sed_f1 import audio, data, features
from examples.sed_f1.data import SEDData, load_npz_dir, save_npz_dir, synthesize
from examples.sed_f1.experiment import RunResult, TrainConfig, train_run
from ignite_ema._launch import run_on_processes  # a helper of the examples and tests, not public API

_TICK = 50  # iterations per progress message (and the rest of a run at its end)
SIZES = {False: (300, 2000, 400), True: (100, 300, 100)}  # (labelled, unlabelled, test) clips; True: --quick


@dataclass(frozen=True)
class Job:
    """One training run: which teacher, which seed, which configuration, and its TensorBoard folder's name."""

    name: str
    seed: int
    config: TrainConfig
    log_name: str


def _fingerprint(quick: bool) -> dict[str, Any]:
    """What the synthetic features depend on: their sizes and the code that makes them."""
    sources = b"".join(Path(module.__file__ or "").read_bytes() for module in (audio, features, data))
    return {"clips": SIZES[quick], "seed": 0, "code": hashlib.sha256(sources).hexdigest()[:16]}


def fresh_log_dir(out: Path) -> Path:
    """A new folder for one job's TensorBoard runs: ``out/tensorboard/<YYYYmmdd-HHMMSS>`` (``-2``... if taken)."""
    parent = out / "tensorboard"
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()  # not exist_ok: two jobs started in the same second get two folders
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")  # itertools.count never ends


def prepare_data(data_dir: Path | None, out: Path, quick: bool, pool: Executor | None) -> Path:
    """The folder of features the runs read: ``data_dir``, or the synthetic data, made (once) into ``out/features``."""
    if data_dir is not None:
        load_npz_dir(data_dir)  # refuse bad input here, before any worker starts
        return data_dir
    directory = out / "features"
    stamp = directory / "synthesis.json"
    fingerprint = _fingerprint(quick)
    if stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return directory
    labelled, unlabelled, test = SIZES[quick]
    made = synthesize(labelled, unlabelled, test, map_fn=pool.map if pool is not None else map)
    save_npz_dir(made, directory)
    stamp.write_text(json.dumps(fingerprint))
    return directory


_loaded: dict[Path, SEDData] = {}


def _data(directory: Path) -> SEDData:
    """The features of ``directory``, read once per process."""
    if directory not in _loaded:
        _loaded[directory] = load_npz_dir(directory)
    return _loaded[directory]


def _init_worker() -> None:
    torch.set_num_threads(1)  # the runs share the cores


def _work(job: Job, features_dir: Path, log_dir: Path, progress: Any) -> RunResult:
    """One run on a worker: it puts the number of iterations it has done since its last message on ``progress``."""
    return train_run(
        job.name, job.seed, _data(features_dir), job.config, log_dir, on_iterations=progress.put, every=_TICK
    )


def _train_one_rank(job: Job, features_dir: Path, log_dir: Path, show_progress: bool) -> RunResult:
    """One rank of a run trained on several processes."""
    return train_run(job.name, job.seed, _data(features_dir), job.config, log_dir, progress_bar=show_progress)


def run_jobs(
    jobs: Sequence[Job],
    out: Path,
    logs: Path,
    workers: int,
    data_dir: Path | None = None,
    quick: bool = False,
    show_progress: bool = True,
    nproc: int = 1,
) -> list[RunResult]:
    """Make or check the data, then train ``jobs``, ``workers`` at a time (or each on ``nproc`` processes, in turn).

    The data goes to (or is reused from) ``out/features``, each job's TensorBoard events to ``logs/<log_name>``.
    Results come back in the order of ``jobs``.
    """
    if nproc > 1:
        features_dir = prepare_data(data_dir, out, quick, pool=None)
        results = []
        for job in jobs:
            log_dir = logs / job.log_name
            results.append(run_on_processes(nproc, _train_one_rank, job, features_dir, log_dir, show_progress)[0])
        return results
    context = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    with (
        context.Manager() as manager,
        ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool,
    ):
        features_dir = prepare_data(data_dir, out, quick, pool)
        ticks = manager.Queue()
        futures = [pool.submit(_work, job, features_dir, logs / job.log_name, ticks) for job in jobs]
        _follow(
            futures, ticks, _progress_label(jobs, workers), sum(job.config.iterations for job in jobs), show_progress
        )
        return [future.result() for future in futures]


def _progress_label(jobs: Sequence[Job], workers: int) -> str:
    """What the bar counts: "training iterations of 8 runs x 2000, 2 at a time"."""
    lengths = sorted({job.config.iterations for job in jobs})
    each = f" x {lengths[0]}" if len(lengths) == 1 else ""
    return f"training iterations of {len(jobs)} runs{each}, {min(workers, len(jobs))} at a time"


def _follow(futures: Sequence[Future[RunResult]], ticks: Any, label: str, total: int, show: bool) -> None:
    """Drive an Ignite engine through one iteration per training iteration the workers report, so ProgressBar
    counts training iterations (of all runs together)."""

    def messages() -> Iterator[int]:
        while True:
            try:
                yield from itertools.repeat(0, ticks.get(timeout=1.0))
            except queue.Empty:
                # a failed run sends no more ticks: stop following, the caller re-raises its error
                if any(f.done() and f.exception() is not None for f in futures):
                    return
                if all(f.done() for f in futures):
                    return

    follower = Engine(lambda engine, batch: batch)
    if show:
        ProgressBar(desc=label, persist=True).attach(follower)
    if total:
        follower.run(messages(), max_epochs=1, epoch_length=total)
