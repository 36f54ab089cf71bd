"""PostHocEMA's costs: the update beside the single-EMA handler, the snapshots, the reconstruction.

Sections, on the benchmark models (``benchmarks.models``):

1. the per-iteration cost of ``PostHocEMA`` with two EMAs against ignite_ema's
   ``EMAHandler`` (one EMA), both with ``handle_buffers="update"``, attached to
   an engine with a no-op step, minus the bare engine (CPU clock with one
   thread, as ``python -m benchmarks``);
2. one snapshot (a file per EMA) in float16 and float32: bytes per file and
   the wall time of writing both through ``DiskSaver`` (into a temporary
   directory);
3. the reconstruction from a directory of snapshots: the wall time of one
   target and of eight in one pass, and the tensor memory it allocates (the
   CPU allocator's peak, from ``torch.profiler``).

Run ``python -m benchmarks.posthoc_bench`` (``--quick`` for a smoke run); the
tables are printed and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from ignite.engine import Events

from benchmarks.contenders import BARE, MOMENTUM, OURS, EngineContender, ours_on_engine, per_update
from benchmarks.ema_bench import _cpu, _versions
from benchmarks.measure import Settings, interleaved, median, profile_allocations, use_cpu_clock
from benchmarks.models import MODELS, ModelSpec, describe
from benchmarks.report import paired_ratio, print_table, us
from ignite_ema import PostHocEMA, reconstruct_from_snapshots

POSTHOC = "PostHocEMA (0.05, 0.10)"
DEFAULT_OUT = Path(__file__).resolve().parent / "posthoc_results.json"
TARGETS = (0.03, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)


def _posthoc_on_engine(spec: ModelSpec, snapshot_dir: Path) -> EngineContender:
    """PostHocEMA on a fresh engine, with no snapshot inside the timed runs."""
    posthoc = PostHocEMA(
        spec.build(), (0.05, 0.10), snapshot_every=10**9, snapshot_dir=snapshot_dir, handle_buffers="update"
    )
    contender = EngineContender(POSTHOC, handler=posthoc)
    posthoc.attach(contender.engine)
    # Each timed run completes, and a completed run ends with a snapshot; here it would only fill the disk.
    _no_snapshot_at_completion(posthoc, contender)
    return contender


def _no_snapshot_at_completion(posthoc: PostHocEMA, contender: EngineContender) -> None:
    assert posthoc._adapter is not None  # attached
    contender.engine.remove_event_handler(posthoc._adapter._on_completed, Events.COMPLETED)


# ------------------------------------------------------------------ 1. update


def bench_update(spec: ModelSpec, settings: Settings, workdir: Path) -> dict[str, Any]:
    """Per-update time of PostHocEMA (two EMAs) and of EMAHandler (one), engine overhead subtracted."""
    contenders = [
        EngineContender(BARE),
        ours_on_engine(spec.build(), MOMENTUM),
        _posthoc_on_engine(spec, workdir / f"update-{spec.key}"),
    ]
    n = settings.updates(spec.updates_per_run)
    runs = {c.name: partial(c.timed_run, n) for c in contenders}
    seconds = per_update(interleaved(runs, settings.rounds, settings.warmup), contenders, n)
    return {
        "title": spec.title,
        "model": describe(spec.build()),
        "bare_engine_us_per_iteration": us(median(seconds[BARE])),
        "ema_handler_us": us(median(seconds[OURS])),
        "posthoc_us": us(median(seconds[POSTHOC])),
        "posthoc_over_ema_handler": paired_ratio(seconds[POSTHOC], seconds[OURS]),
    }


def print_update(results: Sequence[dict[str, Any]]) -> None:
    header = ["model", "EMAHandler us/update", "PostHocEMA us/update", "x EMAHandler", "bare engine us/it"]
    rows = [
        [
            r["title"],
            r["ema_handler_us"],
            r["posthoc_us"],
            r["posthoc_over_ema_handler"],
            r["bare_engine_us_per_iteration"],
        ]
        for r in results
    ]
    print_table("1. update cost: PostHocEMA with two EMAs against the single-EMA handler", header, rows)


# ---------------------------------------------------------------- 2. snapshots


def _wall(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = perf_counter()
        fn()
        times.append(perf_counter() - start)
    return times


def bench_snapshots(spec: ModelSpec, settings: Settings, workdir: Path) -> dict[str, Any]:
    """Bytes per file and the wall time of one snapshot (both EMAs), float16 and float32."""
    out: dict[str, Any] = {"title": spec.title}
    repeats = 2 if settings.quick else 5
    for label, dtype in (("float16", torch.float16), ("float32", None)):
        directory = workdir / f"snap-{spec.key}-{label}"
        posthoc = PostHocEMA(
            spec.build(), (0.05, 0.10), snapshot_every=10**9, snapshot_dir=directory, snapshot_dtype=dtype
        )
        contender = EngineContender(POSTHOC, handler=posthoc)
        posthoc.attach(contender.engine)
        _no_snapshot_at_completion(posthoc, contender)
        seconds = []
        for _ in range(repeats):
            contender.timed_run(1)  # one update, so that there is something new to write
            start = perf_counter()
            posthoc.snapshot()
            seconds.append(perf_counter() - start)
        sizes = [info.path.stat().st_size for info in posthoc.snapshots]
        out[label] = {
            "bytes_per_file": int(statistics.median(sizes)),
            "files_per_snapshot": 2,
            "write_seconds_per_snapshot": round(median(seconds), 4),
        }
        for info in posthoc.snapshots:
            info.path.unlink()
    return out


def print_snapshots(results: Sequence[dict[str, Any]]) -> None:
    header = ["model", "fp16 MB/file", "fp16 s/snapshot", "fp32 MB/file", "fp32 s/snapshot"]
    rows = [
        [
            r["title"],
            r["float16"]["bytes_per_file"] / 1e6,
            r["float16"]["write_seconds_per_snapshot"],
            r["float32"]["bytes_per_file"] / 1e6,
            r["float32"]["write_seconds_per_snapshot"],
        ]
        for r in results
    ]
    print_table("2. one snapshot (a file per EMA, two EMAs), written through DiskSaver", header, rows)


# ------------------------------------------------------------ 3. reconstruction


def bench_reconstruction(spec: ModelSpec, settings: Settings, workdir: Path) -> dict[str, Any]:
    """From a directory of ``times`` float16 snapshots of both EMAs: one target, eight in one pass, memory."""
    times = 4 if settings.quick else 10
    directory = workdir / f"rec-{spec.key}"
    model = spec.build()
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=1, snapshot_dir=directory, handle_buffers="update")
    contender = EngineContender(POSTHOC, handler=posthoc)
    posthoc.attach(contender.engine)
    contender.timed_run(times)  # a snapshot at every iteration
    repeats = 1 if settings.quick else 3

    def rec(targets: Sequence[float]) -> object:
        return reconstruct_from_snapshots(directory, list(targets), model=model)

    rec(TARGETS[:1])  # warm: the files are in the page cache for every timed call alike
    one = _wall(partial(rec, TARGETS[:1]), repeats)
    eight = _wall(partial(rec, TARGETS), repeats)
    model_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    alloc_one = profile_allocations(partial(rec, TARGETS[:1]))
    alloc_eight = profile_allocations(partial(rec, TARGETS))
    file_bytes = sum(p.stat().st_size for p in directory.iterdir())
    for path in directory.iterdir():
        path.unlink()
    return {
        "title": spec.title,
        "snapshot_files": 2 * times,
        "snapshot_bytes": file_bytes,
        "seconds_one_target": round(median(one), 3),
        "seconds_eight_targets": round(median(eight), 3),
        "seconds_per_extra_target": round((median(eight) - median(one)) / 7, 4),
        "float32_model_bytes": model_bytes,
        "peak_allocated_bytes_one_target": alloc_one.peak_bytes,
        "peak_allocated_bytes_eight_targets": alloc_eight.peak_bytes,
    }


def print_reconstruction(results: Sequence[dict[str, Any]]) -> None:
    header = ["model", "files", "s, 1 target", "s, 8 targets", "s per extra", "peak MB 1 / 8", "fp32 model MB"]
    rows = [
        [
            r["title"],
            r["snapshot_files"],
            r["seconds_one_target"],
            r["seconds_eight_targets"],
            r["seconds_per_extra_target"],
            f"{r['peak_allocated_bytes_one_target'] / 1e6:.1f} / {r['peak_allocated_bytes_eight_targets'] / 1e6:.1f}",
            r["float32_model_bytes"] / 1e6,
        ]
        for r in results
    ]
    print_table("3. reconstruction from a snapshot directory (float16 files, page cache warm)", header, rows)


# ------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.posthoc_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of section 1 (default 21; 3 quick)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: few rounds, short runs")
    parser.add_argument("--models", nargs="+", choices=[m.key for m in MODELS], default=[m.key for m in MODELS])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    use_cpu_clock(True)  # section 1; sections 2 and 3 include disk work and use the wall clock
    settings = Settings(rounds=args.rounds or (3 if args.quick else 21), quick=args.quick)
    specs = [m for m in MODELS if m.key in args.models]
    config = {
        **_versions(),
        "cpu": _cpu(),
        "threads": 1,
        "rounds": settings.rounds,
        "quick": settings.quick,
        "load_average_start": os.getloadavg(),
    }
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        update = [bench_update(spec, settings, workdir) for spec in specs]
        print_update(update)
        snapshots = [bench_snapshots(spec, settings, workdir) for spec in specs]
        print_snapshots(snapshots)
        reconstruction = [bench_reconstruction(spec, settings, workdir) for spec in specs]
        print_reconstruction(reconstruction)
    config["load_average_end"] = os.getloadavg()
    results = {"config": config, "update": update, "snapshots": snapshots, "reconstruction": reconstruction}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
