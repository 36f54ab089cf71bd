"""Mean teacher on scikit-learn's 8x8 digits (1,797 images, shipped with the package: no download).

A few labels per class are kept; the rest of the training images are
unlabelled. We compare the supervised baseline (student only) with mean
teacher in each buffer mode, over several seeds, and report test accuracy of
the student and of the teacher.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import ignite.distributed as idist
import torch
from ignite.engine import Engine, create_supervised_evaluator
from ignite.handlers import ProgressBar
from ignite.metrics import Accuracy
from torch import Tensor, nn

from examples.mean_teacher.trainer import create_mean_teacher_trainer
from ignite_ema import EMAHandler, unwrap_model
from ignite_ema._launch import run_on_processes  # a helper of the examples and tests, not public API

RUNS = ("supervised", "copy", "update", "ema_train")


@dataclass(frozen=True)
class DigitsSplit:
    train_x: Tensor  # [N, 1, 8, 8], values in [0, 1]
    train_y: Tensor
    labelled: Tensor  # bool [N]
    test_x: Tensor
    test_y: Tensor


def load_digits_split(seed: int, labels_per_class: int, test_fraction: float = 0.3) -> DigitsSplit:
    """A fixed test split, and ``labels_per_class`` labelled training images per class chosen by ``seed``."""
    from sklearn.datasets import load_digits  # the examples' extra, not a package dependency

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the same test set for every seed
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    gen = torch.Generator().manual_seed(seed)
    labelled = torch.zeros(len(train), dtype=torch.bool)
    for digit in range(10):
        members = (y[train] == digit).nonzero().flatten()
        labelled[members[torch.randperm(len(members), generator=gen)[:labels_per_class]]] = True
    return DigitsSplit(x[train], y[train], labelled, x[test], y[test])


def mixed_batches(
    split: DigitsSplit, iterations: int, labelled_per_batch: int, unlabelled_per_batch: int, seed: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Batches of ``(x, y, labelled)``: labelled items drawn with replacement, the rest from all training images."""
    gen = torch.Generator().manual_seed(seed)
    labelled_idx = split.labelled.nonzero().flatten()
    for _ in range(iterations):
        lab = labelled_idx[torch.randint(len(labelled_idx), (labelled_per_batch,), generator=gen)]
        unl = torch.randint(len(split.train_y), (unlabelled_per_batch,), generator=gen)
        idx = torch.cat([lab, unl])
        mask = torch.arange(len(idx)) < labelled_per_batch
        yield split.train_x[idx], split.train_y[idx], mask


def small_convnet() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 2 * 2, 10),
    )  # fmt: skip


def jitter(x: Tensor) -> Tensor:
    """Input noise for both models: a random shift of up to one pixel and Gaussian noise."""
    shifts = torch.randint(-1, 2, (2,)).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3)) + 0.1 * torch.randn_like(x)


@dataclass
class RunResult:
    run: str
    seed: int
    student: float
    teacher: float | None
    seconds: float


def run_once(run: str, seed: int, iterations: int, labels_per_class: int, progress: bool = True) -> RunResult:
    """Train one configuration and return its test accuracies.

    Under ``torch.distributed`` (see ``--nproc``) the student is trained with DDP, each rank drawing its share
    of every batch; the EMA statistics are averaged over the ranks and the test set is split between them.
    """
    start = time.perf_counter()
    rank, world = idist.get_rank(), idist.get_world_size()
    split = load_digits_split(seed, labels_per_class)
    torch.manual_seed(seed)
    student = idist.auto_model(small_convnet(), sync_bn=False)
    handler = None
    if run != "supervised":
        handler = EMAHandler(  # sync_buffers: a no-op in a single process
            student, momentum=0.01, handle_buffers=run, mean_teacher_warmup=True, sync_buffers="update"
        )
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    trainer = create_mean_teacher_trainer(
        student,
        handler,
        optimizer,
        supervised_loss=nn.functional.cross_entropy,
        consistency_weight=10.0,
        rampup_iters=iterations // 4,
        student_noise=jitter,
        teacher_noise=jitter,
    )
    if progress and rank == 0:
        ProgressBar(desc=f"{run} seed {seed}", persist=False).attach(trainer, output_transform=lambda out: out["loss"])
    batches = mixed_batches(split, iterations, 16 // world, 48 // world, seed + 7919 * rank)
    trainer.run(list(batches), max_epochs=1)

    test = list(zip(torch.split(split.test_x, 64), torch.split(split.test_y, 64), strict=True))[rank::world]
    student_acc = _accuracy(unwrap_model(student), test)  # Accuracy sums its counts over the ranks
    teacher_acc = _accuracy(handler.ema_model, test) if handler is not None else None
    return RunResult(run, seed, student_acc, teacher_acc, time.perf_counter() - start)


def _accuracy(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]]) -> float:
    evaluator: Engine = create_supervised_evaluator(model, metrics={"accuracy": Accuracy()})
    return float(evaluator.run(data).metrics["accuracy"])


def summary_table(results: Sequence[RunResult]) -> str:
    """Mean ± std over seeds of the test accuracy per run, as Markdown (the mean alone for one seed: no spread)."""

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        if len(values) == 1:
            return f"{100 * values[0]:.1f}"
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    lines = ["| run | seeds | student accuracy (%) | teacher accuracy (%) |", "|---|---|---|---|"]
    for run in dict.fromkeys(r.run for r in results):
        rows = [r for r in results if r.run == run]
        teacher = [r.teacher for r in rows if r.teacher is not None]
        lines.append(f"| {run} | {len(rows)} | {cell([r.student for r in rows])} | {cell(teacher)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(prog="python -m examples.mean_teacher", description=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--iters", type=int, default=1500, help="training iterations per run (default 1500)")
    parser.add_argument("--labels-per-class", type=int, default=10, help="labelled images per class (default 10)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs to compare")
    parser.add_argument("--quick", action="store_true", help="one seed, 300 iterations: a smoke run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--nproc", type=int, default=1, help="train each run on N processes (DDP over gloo, ignite.distributed)"
    )
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    seeds, iterations = (1, 300) if args.quick else (args.seeds, args.iters)

    results = []
    for seed in range(seeds):
        for run in args.runs:
            job = (run, seed, iterations, args.labels_per_class, not args.no_progress)
            result = run_on_processes(args.nproc, run_once, *job)[0] if args.nproc > 1 else run_once(*job)
            results.append(result)
            teacher = f", teacher {100 * result.teacher:.1f}%" if result.teacher is not None else ""
            print(f"{run:>10} seed {seed}: student {100 * result.student:.1f}%{teacher} ({result.seconds:.0f} s)")
    print(f"\nTest accuracy, {args.labels_per_class} labels per class, {iterations} iterations:\n")
    print(summary_table(results))
    return results
