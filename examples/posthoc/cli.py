"""``python -m examples.posthoc``: the digits run with PostHocEMA, from the command line."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from examples.posthoc.digits import GRID, Config, Results, reconstruct_grid, train
from examples.posthoc.report import check_lines, markdown_table, plot, write_json

DESCRIPTION = """\
One training run per seed on scikit-learn's digits with PostHocEMA tracking the power EMAs of width 0.05 and
0.10 (and EMAHandler tracking 0.03, 0.15 and 0.25 directly, as a check); after training, the EMA of every width
from 0.02 to 0.28 is reconstructed from the snapshots and evaluated. Writes posthoc_digits.png, results.json,
results.md and the snapshots to --out."""


def main(argv: Sequence[str] | None = None) -> list[Results]:
    parser = argparse.ArgumentParser(prog="python -m examples.posthoc", description=DESCRIPTION)
    parser.add_argument("--seeds", type=int, default=3, help="seeds, one training run each (default 3)")
    parser.add_argument(
        "--iters", type=int, default=None, help=f"training iterations per run (default {Config.iterations})"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/posthoc"), help="output folder (default runs/posthoc)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 300 iterations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.seeds < 1 or (args.iters is not None and args.iters < 20):
        parser.error("--seeds must be at least 1, --iters at least 20")
    seeds = 1 if args.quick else args.seeds
    iterations = args.iters or (300 if args.quick else Config.iterations)
    torch.set_num_threads(1)  # one core: the run is small, and threads fight on a shared machine
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    results = []
    for seed in range(seeds):
        config = Config(iterations=iterations, seed=seed)
        snapshot_dir = args.out / f"snapshots-seed{seed}"
        result, split = train(config, snapshot_dir, progress=not args.no_progress)
        reconstruct_grid(result, split, snapshot_dir, GRID)
        results.append(result)
        print(
            f"seed {seed}: trained in {result.train_seconds:.0f} s; {result.snapshots} snapshots "
            f"({result.snapshot_bytes / 1e6:.1f} MB); {len(GRID)} widths reconstructed in "
            f"{result.reconstruct_seconds:.2f} s"
        )
    minutes = (time.perf_counter() - start) / 60

    table = markdown_table(results)
    checks = "\n".join(f"- {line}" for line in check_lines(results))
    heading = f"{seeds} seed(s), {iterations} iterations, {results[0].config.labels_per_class} labels per class"
    write_json(results, args.out / "results.json")
    (args.out / "results.md").write_text(
        f"# PostHocEMA on digits\n\n{heading}; test metrics, mean over seeds.\n\n{table}\n\n{checks}\n"
    )
    plot(results, args.out / "posthoc_digits.png")
    print(f"\nTest metrics against sigma_rel, {heading} (mean over seeds):\n\n{table}\n\n{checks}\n")
    print(f"Wrote {args.out / 'posthoc_digits.png'}, results.json and results.md ({minutes:.1f} min in all)")
    return results
