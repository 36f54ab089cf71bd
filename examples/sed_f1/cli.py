"""``python -m examples.sed_f1``: the SED comparison (and ``--study convergence``) from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from examples.sed_f1.compare import Job, fresh_log_dir, run_jobs
from examples.sed_f1.data import NPZ_LAYOUT
from examples.sed_f1.experiment import ALL_SCORES, OPTIMIZERS, RUNS, RunResult, TrainConfig
from examples.sed_f1.report import (
    NOT_APPLICABLE,
    failed,
    markdown_table,
    norm_ratio_lines,
    plot_curves,
    verdict,
    write_json,
)
from examples.sed_f1.study import plot_study, study_configs, study_jobs, study_text, summarise

DESCRIPTION = """\
Mean-teacher sound event detection on synthetic 16-kHz clips through a log-mel front end (or your own features
with --data): a CRNN student, and its EMA teacher kept by Ignite's EMAHandler ("ignite-copy", the behaviour of
the original report) or by ignite_ema in each buffer mode ("copy", "update", "ema_train"). Prints a table of F1
and PSDS (mean ± std over seeds), teacher and student side by side, and the verdict, and writes results.json,
results.md, f1_curves.png and TensorBoard logs (in a new tensorboard/<start time> folder per job) to --out. Exits
with status 1 when a check of the verdict fails. --study convergence trains copy and ema_train teachers with Adam
and with AdamW and writes convergence.json, convergence.md and convergence.png."""

#: The default job: the report's teacher and our three buffer modes, trained until the curves plateau (see
#: docs/sed_f1.md).
DEFAULT_RUNS = ("ignite-copy", "copy", "update", "ema_train")
DEFAULT = TrainConfig(
    iterations=2000, eval_every=250, optimizer="adamw", lr_decay_start=0.5, weight_decay=0.1, ema_decay=0.998
)
QUICK = dataclasses.replace(DEFAULT, iterations=200, eval_every=100)
STUDY_SEEDS = 2  # the study: both optimisers, everything else as the default job
DEFAULT_SEEDS = 2  # what 10 minutes on two cores allow (see docs/sed_f1.md)
QUICK_DIR = "quick"  # a --quick run's outputs go to this subfolder of the default folder, apart from the full job's


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.sed_f1",
        description=DESCRIPTION,
        epilog=NPZ_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", choices=["convergence"], default=None, help="run the convergence study instead")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per run (default 2, and 2 in the study)")
    iterations = f"iterations per run (default {DEFAULT.iterations}, the study too)"
    parser.add_argument("--iters", type=int, default=None, help=iterations)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"default {DEFAULT.optimizer}")
    parser.add_argument("--weight-decay", type=float, default=None, help=f"AdamW's (default {DEFAULT.weight_decay})")
    parser.add_argument("--ema-decay", type=float, default=None, help=f"the teacher's (default {DEFAULT.ema_decay})")
    parser.add_argument(
        "--lr-decay-start",
        type=float,
        default=None,
        help="the fraction of the iterations after which the learning rate falls linearly to 0 by the end; 1 "
        f"keeps it constant (default {DEFAULT.lr_decay_start})",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one core each (default 2)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train each run on N processes (DistributedDataParallel over gloo, through ignite.distributed); "
        "runs then go one at a time and --workers is not used (default 1)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/sed_f1, the study's "
                        f"runs/sed_f1_convergence; with --quick their {QUICK_DIR}/ subfolder)")  # fmt: skip
    parser.add_argument("--data", type=Path, default=None, help="a folder of .npz features instead of synthetic data")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=None, help="runs to compare (default: "
                        f"{' '.join(DEFAULT_RUNS)}; not with --study)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 200 iterations, smaller data; "
                        "the checks it is too short for are reported as n/a")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if (args.seeds is not None and args.seeds < 1) or args.workers < 1 or args.nproc < 1:
        parser.error("--seeds, --workers and --nproc must be at least 1")
    if args.iters is not None and args.iters < 50:
        parser.error("--iters must be at least 50")
    if args.study and args.runs:
        parser.error("--runs is not for --study, which trains copy and ema_train")
    if (args.weight_decay is not None and args.weight_decay < 0) or (
        args.ema_decay is not None and not 0 < args.ema_decay < 1
    ):
        parser.error("--weight-decay must be >= 0 and --ema-decay in (0, 1)")
    return args


def _config(args: argparse.Namespace) -> TrainConfig:
    config = QUICK if args.quick else DEFAULT
    if args.iters is not None:
        evaluations = config.iterations // config.eval_every
        config = dataclasses.replace(config, iterations=args.iters, eval_every=max(50, args.iters // evaluations))
    optimizer = args.optimizer or config.optimizer
    weight_decay = args.weight_decay if args.weight_decay is not None else config.weight_decay
    if optimizer == "adam":
        weight_decay = 0.0
    ema_decay = args.ema_decay if args.ema_decay is not None else config.ema_decay
    lr_decay_start = args.lr_decay_start if args.lr_decay_start is not None else config.lr_decay_start
    try:
        return dataclasses.replace(
            config, optimizer=optimizer, weight_decay=weight_decay, ema_decay=ema_decay, lr_decay_start=lr_decay_start
        )
    except ValueError as error:
        raise SystemExit(f"python -m examples.sed_f1: error: {error}") from None


def _describe(config: TrainConfig) -> str:
    decay = f", weight decay {config.weight_decay}" if config.weight_decay else ""
    return (
        f"{config.iterations} iterations of {config.labelled_per_batch} + {config.unlabelled_per_batch} clips, "
        f"{config.optimizer} (lr {config.lr}{config.lr_schedule}{decay}), EMA decay {config.ema_decay}, "
        f"median filter {config.median_frames} frames"
    )


def _out(args: argparse.Namespace, default: str) -> Path:
    """--out, else ``default`` (its ``quick/`` subfolder for --quick, so a smoke run never overwrites a full job)."""
    if args.out is not None:
        return Path(args.out)
    return Path(default) / QUICK_DIR if args.quick else Path(default)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison (or the study) and print what it shows; returns the exit status: 1 if a check failed."""
    args = parse_args(argv)
    start = time.perf_counter()
    config = _config(args)
    source = f"features in {args.data}" if args.data else "synthetic data"
    how = f"{args.nproc} processes per run" if args.nproc > 1 else f"{args.workers} workers"
    if args.study:
        _study(args, config, source, how, start)
        return 0

    seeds = 1 if args.quick else (args.seeds or DEFAULT_SEEDS)
    names = args.runs or list(DEFAULT_RUNS)
    out = _out(args, "runs/sed_f1")
    out.mkdir(parents=True, exist_ok=True)
    logs = fresh_log_dir(out)
    size = f"{len(names)} runs x {seeds} seed{'s' if seeds > 1 else ''}"
    print(f"{size} on {source}, {how}: {_describe(config)}")
    jobs = [Job(name, seed, config, f"{name}-seed{seed}") for seed in range(seeds) for name in names]
    results = run_jobs(
        jobs, out, logs, args.workers, args.data, args.quick, show_progress=not args.no_progress, nproc=args.nproc
    )
    plot_curves(results, out / "f1_curves.png")

    table = markdown_table(results)
    checks = verdict(results, quick=args.quick)
    failures = failed(checks)
    outcome = f"{len(failures)} check(s) FAILED: exit status 1" if failures else "No check failed: exit status 0"
    if args.quick:
        outcome += (
            f". A --quick run is a smoke test, too short to plateau or for a teacher to catch up with its student: "
            f"those checks are '{NOT_APPLICABLE}', the full job makes them"
        )
    norms = "\n".join(f"- {line}" for line in norm_ratio_lines(results))
    norm_note = f"Teacher / student conv weight norm, per conv layer, at the end (mean over seeds):\n\n{norms}\n"
    heading = f"{size}, {_describe(config)}, {source}."
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed (no spread)"
    what = (
        "F1 and PSDS in % on the test set (frame scores median-filtered; F1 at threshold 0.5, PSDS over 50 "
        f"thresholds), {spread}"
    )
    minutes = (time.perf_counter() - start) / 60  # everything but writing two text files
    extra = {"config": dataclasses.asdict(config), "minutes": minutes, "tensorboard": str(logs.relative_to(out))}
    write_json(results, out / "results.json", extra)
    (out / "results.md").write_text(
        f"# SED comparison\n\n{heading}\n{what}.\n\n{markdown_table(results, scores=ALL_SCORES)}\n\n"
        + "\n".join(f"- {check}" for check in checks)
        + f"\n\n{outcome}.\n\n{norm_note}\nDone in {minutes:.1f} min.\n"
    )

    print(f"\n{what}:\n\n{table}\n")
    print("\n".join(str(check) for check in checks))
    print(f"\n{outcome}.")
    print(f"\n{norm_note}", end="")
    print(
        "\nThe teachers of 'ignite-copy', 'copy' and 'update' run in eval mode on statistics borrowed from the "
        f"student; 'ema_train' keeps its own.\nDone in {minutes:.1f} min (wall time, data included). Wrote "
        f"results.json, results.md, f1_curves.png and {logs.relative_to(out)}/ to {out}"
    )
    return 1 if failures else 0


def _study(args: argparse.Namespace, config: TrainConfig, source: str, how: str, start: float) -> list[RunResult]:
    seeds = 1 if args.quick else (args.seeds or STUDY_SEEDS)
    out = _out(args, "runs/sed_f1_convergence")
    out.mkdir(parents=True, exist_ok=True)
    logs = fresh_log_dir(out)
    configs = study_configs(config, config.weight_decay or DEFAULT.weight_decay)
    print(f"convergence study: copy and ema_train x adam and adamw x {seeds} seeds on {source}, {how}")
    for optimizer, c in configs.items():
        print(f"  {optimizer}: {_describe(c)}")
    jobs = study_jobs(range(seeds), configs)
    results = run_jobs(
        jobs, out, logs, args.workers, args.data, args.quick, show_progress=not args.no_progress, nproc=args.nproc
    )
    plot_study(results, out / "convergence.png")
    summary = summarise(results, configs)
    text = study_text(results, summary)
    minutes = (time.perf_counter() - start) / 60
    extra = {"summary": summary, "minutes": minutes, "tensorboard": str(logs.relative_to(out))}
    write_json(results, out / "convergence.json", extra)
    (out / "convergence.md").write_text(f"# Convergence study\n\n{text}\nDone in {minutes:.1f} min.\n")
    print(f"\n{text}\nDone in {minutes:.1f} min (wall time, data included). Wrote convergence.json, convergence.md, "
          f"convergence.png and {logs.relative_to(out)}/ to {out}")  # fmt: skip
    return results


__all__ = ["DEFAULT", "DEFAULT_RUNS", "main", "parse_args"]
