"""The training step with no EMA, with the synchronous EMA and with the asynchronous one, on the CPU.

``python -m benchmarks.step_bench``: an MLP of ``DEPTH`` square ``Linear`` layers trained with plain SGD, at several
widths and two batch sizes. With one sample the step is a few passes over the weights (the forward and backward
passes read them, the gradients are zeroed and written, SGD reads both and writes the weights), so the EMA's pass is
a large part of it, and both are bound by memory bandwidth; with 8, the matrix products take a larger part, and
they are bound by compute. Torch computes on one thread (``torch.set_num_threads(1)``), so the
asynchronous EMA's worker thread has the machine's other core. Three students of the same initial weights train
side by side, one step loop each per round; a round times a few steps of each (wall clock, since the point is
waiting), the order shuffled per round, and the table gives the medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from benchmarks.measure import interleaved, median
from benchmarks.report import paired_ratio, print_table
from ignite_ema import ModelEMA

DEPTH, DECAY = 4, 0.9998
WIDTHS, BATCHES = (1024, 2048, 4096), (1, 8)
NONE, SYNC, ASYNC = "no EMA", "synchronous EMA", "asynchronous EMA"


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def step_loop(width: int, batch: int, ema: str) -> Callable[[int], float]:
    """A training loop of its own (student, optimiser, EMA as named): called with ``steps``, it runs them and returns
    the seconds per step, including the wait for the last asynchronous update."""
    model = mlp(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    average = None if ema == NONE else ModelEMA(model, decay=DECAY, asynchronous=ema == ASYNC)
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(batch, width, generator=generator), torch.randn(batch, width, generator=generator)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=False)  # no new gradient memory (page faults) per step
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()  # waits for the asynchronous update started at the previous step
            if average is not None:
                average.update()
        if average is not None:
            average.wait()
        return (time.perf_counter() - start) / steps

    return run


def bench(width: int, batch: int, rounds: int, quick: bool) -> dict[str, Any]:
    loops = {name: step_loop(width, batch, name) for name in (NONE, SYNC, ASYNC)}
    one_step = median([loops[NONE](2) for _ in range(3)])
    steps = max(3, int((0.1 if quick else 0.4) / one_step))
    times = interleaved({name: partial(run, steps) for name, run in loops.items()}, rounds, warmup=1)
    parameters = sum(p.numel() for p in mlp(width).parameters())
    return {
        "width": width,
        "batch": batch,
        "parameters_M": round(parameters / 1e6, 2),
        "no_ema_ms": round(1e3 * median(times[NONE]), 2),
        "sync_ms": round(1e3 * median(times[SYNC]), 2),
        "async_ms": round(1e3 * median(times[ASYNC]), 2),
        "sync_x": paired_ratio(times[SYNC], times[NONE]),
        "async_x": paired_ratio(times[ASYNC], times[NONE]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (the two smaller widths)")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help=f"MLP widths (default {WIDTHS})")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES, help=f"batch sizes (default {BATCHES})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    widths = args.widths or (WIDTHS[:2] if args.quick else WIDTHS)
    rounds = args.rounds or (3 if args.quick else 11)
    results = [bench(w, b, rounds, args.quick) for b in args.batches for w in widths]
    rows = [
        [
            r["batch"],
            f"{r['width']} ({r['parameters_M']}M)",
            r["no_ema_ms"],
            r["sync_ms"],
            r["async_ms"],
            f"{100 * (r['sync_x'] - 1):+.1f}%",
            f"{100 * (r['async_x'] - 1):+.1f}%",
        ]
        for r in results
    ]
    print_table(
        f"Training step on the CPU, one compute thread: MLP of {DEPTH} layers, SGD",
        ["batch", "width (parameters)", "no EMA ms", "sync ms", "async ms", "sync vs none", "async vs none"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
