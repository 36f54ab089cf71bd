"""``python -m examples.sed_f1``: the SED comparison from the command line."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from examples.sed_f1.compare import run_all
from examples.sed_f1.data import NPZ_LAYOUT
from examples.sed_f1.experiment import RUNS, RunResult, TrainConfig
from examples.sed_f1.report import markdown_table, norm_ratio_lines, plot_curves, verdict, write_json

DESCRIPTION = """\
Mean-teacher sound event detection on synthetic log-mel clips (or your own features with --data):
a CRNN student, and its EMA teacher kept by Ignite's EMAHandler ("ignite-copy", the behaviour of the
original report) or by ignite_ema in each buffer mode. Prints a table of F1 scores (mean ± std over
seeds) and writes results.json, results.md, f1_curves.png and TensorBoard logs to --out."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.sed_f1",
        description=DESCRIPTION,
        epilog=NPZ_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per run (default 3)")
    parser.add_argument("--iters", type=int, default=None, help="training iterations per run (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one core each (default 2)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train each run on N processes (DistributedDataParallel over gloo, through ignite.distributed); "
        "runs then go one at a time and --workers is not used (default 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/sed_f1"), help="output folder (default runs/sed_f1)")
    parser.add_argument("--data", type=Path, default=None, help="a folder of .npz features instead of synthetic data")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="runs to compare")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 300 iterations, smaller data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1 or args.nproc < 1 or (args.iters is not None and args.iters < 50):
        parser.error("--seeds, --workers and --nproc must be at least 1, --iters at least 50")
    return args


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    iterations = args.iters or (300 if args.quick else 1000)
    config = TrainConfig(iterations=iterations, eval_every=max(50, iterations // 5))
    args.out.mkdir(parents=True, exist_ok=True)
    source = f"features in {args.data}" if args.data else "synthetic data"
    how = f"{args.nproc} processes per run" if args.nproc > 1 else f"{args.workers} workers"
    print(f"{len(args.runs)} runs x {seeds} seeds, {iterations} iterations each, on {source}, {how}")

    start = time.perf_counter()
    results = run_all(
        args.runs, range(seeds), config, args.out, args.workers, args.data, quick=args.quick,
        show_progress=not args.no_progress, nproc=args.nproc,
    )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60

    table = markdown_table(results)
    checks = verdict(results)
    norms = "\n".join(f"- {line}" for line in norm_ratio_lines(results))
    norm_note = f"Teacher / student conv weight norm, per conv layer (mean over seeds):\n\n{norms}\n"
    write_json(results, args.out / "results.json")
    (args.out / "results.md").write_text(
        f"# SED comparison\n\n{len(args.runs)} runs x {seeds} seeds, {iterations} iterations, {source}.\n"
        f"F1 in % at threshold 0.5 on the test set, mean ± std over seeds.\n\n{table}\n\n"
        + "\n".join(f"- {line}" for line in checks)
        + f"\n\n{norm_note}"
    )
    plot_curves(results, args.out / "f1_curves.png")

    print(f"\nF1 (%) at threshold 0.5 on the test set, mean ± std over {seeds} seed(s):\n\n{table}\n")
    print("\n".join(checks))
    print(f"\n{norm_note}", end="")
    print(
        f"\nThe teachers of 'ignite-copy', 'copy' and 'update' run in eval mode on statistics borrowed from the "
        f"student; 'ema_train' keeps its own.\nDone in {minutes:.1f} min. Wrote results.json, results.md, "
        f"f1_curves.png and tensorboard/ to {args.out}"
    )
    return results
