"""Timing and allocation accounting.

Timings are taken round after round, every contender once per round, with the
garbage collector off (as ``timeit`` does) and on this thread's CPU time when
torch runs on one thread (see :func:`use_cpu_clock`).

- The order is shuffled anew each round (seeded): which run precedes which
  changes how fast the next one is, even across a cache flush, so no
  contender keeps one neighbour.
- Before each run the caches are flushed (outside the clock): all contenders
  share the student, and none should find it left in the L3 cache by another;
  each run starts as an update after a training step would.
- Ratios are taken within a round, between runs a fraction of a second apart,
  and their median reported: background load that comes and goes slows both
  sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter, thread_time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.models import MODELS, ModelSpec

__all__ = [
    "Allocations",
    "Settings",
    "calls_for",
    "clock",
    "flush_caches",
    "gc_off",
    "interleaved",
    "mean_call_seconds",
    "median",
    "one_thread_models",
    "profile_allocations",
    "use_cpu_clock",
]

_clock: Callable[[], float] = perf_counter


def use_cpu_clock(enabled: bool) -> None:
    """Time with this thread's CPU time (``time.thread_time``) instead of the wall clock.

    On a loaded machine the wall clock also counts the time the scheduler gives
    other processes; with one torch thread all the work runs on the calling
    thread, so its CPU time counts the update alone. (Memory bandwidth that
    other processes take still slows it.) With more threads, use the wall clock.
    """
    global _clock
    _clock = thread_time if enabled else perf_counter


def clock() -> float:
    """The current reading of the clock chosen by :func:`use_cpu_clock` (the wall clock by default)."""
    return _clock()


_FLUSH_ELEMENTS = 32 * 2**20  # 128 MiB of float32: several times any L3 this runs on
_flush_buffer: list[torch.Tensor] = []


def flush_caches() -> None:
    """Read and write a buffer larger than the last-level cache, evicting whatever the previous run left there."""
    if not _flush_buffer:
        _flush_buffer.append(torch.zeros(_FLUSH_ELEMENTS))
    _flush_buffer[0].add_(1.0)


@dataclass(frozen=True)
class Settings:
    """How long to measure: timed rounds, discarded warm-up rounds, and whether this is a smoke run."""

    rounds: int
    warmup: int = 1
    quick: bool = False

    def updates(self, spec_updates: int) -> int:
        """Updates per timed run: fewer when quick."""
        return max(4, spec_updates // 4) if self.quick else spec_updates


@contextmanager
def gc_off() -> Iterator[None]:
    """Collect, then keep the cyclic garbage collector off for the block."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def interleaved(runs: Mapping[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Each callable returns the seconds it measured; call each once per round, ``warmup`` rounds discarded."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for r in range(warmup + rounds):
        order.shuffle(names)
        with gc_off():
            for name in names:
                flush_caches()
                elapsed = runs[name]()
                if r >= warmup:
                    times[name].append(elapsed)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean_call_seconds(fn: Callable[[], object], calls: int) -> float:
    """Mean time of ``calls`` back-to-back calls of ``fn``."""
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def calls_for(fn: Callable[[], object], budget: float = 0.02) -> int:
    """How many calls of ``fn`` fill about ``budget`` seconds (at least 3)."""
    fn()
    return max(3, min(20000, int(budget / max(mean_call_seconds(fn, 3), 1e-7))))


@dataclass(frozen=True)
class Allocations:
    """Tensor memory allocated by one call: the peak above the memory in use before it, the total, the count."""

    peak_bytes: int
    total_bytes: int
    count: int


def _allocation_sizes(prof: profile) -> list[tuple[int, int]]:
    """(time, signed bytes) of every CPU allocation and free the profiler saw."""
    from torch._C._profiler import _EventType  # private: the public event list drops allocations inside ops

    found: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            found.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(found)


def profile_allocations(fn: Callable[[], object]) -> Allocations:
    """Allocations made by one call of ``fn``, from ``torch.profiler`` memory profiling (CPU allocator)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = total = count = 0
    for _, size in _allocation_sizes(prof):
        level += size
        peak = max(peak, level)
        if size > 0:
            total += size
            count += 1
    return Allocations(peak_bytes=peak, total_bytes=total, count=count)


def one_thread_models(prog: str, description: str, argv: Sequence[str] | None) -> tuple[Settings, list[ModelSpec]]:
    """The command line of a per-model benchmark (``--rounds``, ``--quick``, ``--models``), with torch on one
    thread timed by its CPU clock and seeded: the settings and the chosen ``benchmarks.models.MODELS``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--models", nargs="+", choices=[m.key for m in MODELS], default=[m.key for m in MODELS])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    use_cpu_clock(True)
    torch.manual_seed(0)
    settings = Settings(rounds=args.rounds or (3 if args.quick else 21), quick=args.quick)
    return settings, [spec for spec in MODELS if spec.key in args.models]
