"""The training step with no EMA, with the synchronous EMA and with the asynchronous one, on the CPU.

``python -m benchmarks.step_bench``: an MLP of ``DEPTH`` square ``Linear`` layers trained with SGD and momentum on
batches of ``BATCH`` (the regime of fine-tuning a wide model on small batches, where the EMA's pass over the weights
is a large part of the step), at several widths. Torch computes on one thread (``torch.set_num_threads(1)``), so the
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

DEPTH, BATCH, DECAY = 4, 16, 0.9998
WIDTHS = (512, 1024, 2048, 3072)
NONE, SYNC, ASYNC = "no EMA", "synchronous EMA", "asynchronous EMA"


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def step_loop(width: int, ema: str) -> Callable[[int], float]:
    """A training loop of its own (student, optimiser, EMA as named): called with ``steps``, it runs them and returns
    the seconds per step, including the wait for the last asynchronous update."""
    model = mlp(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    average = None if ema == NONE else ModelEMA(model, decay=DECAY, asynchronous=ema == ASYNC)
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(BATCH, width, generator=generator), torch.randn(BATCH, width, generator=generator)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()  # waits for the asynchronous update started at the previous step
            if average is not None:
                average.update()
        if average is not None:
            average.wait()
        return (time.perf_counter() - start) / steps

    return run


def bench_width(width: int, rounds: int, quick: bool) -> dict[str, Any]:
    loops = {name: step_loop(width, name) for name in (NONE, SYNC, ASYNC)}
    one_step = median([loops[NONE](2) for _ in range(3)])
    steps = max(3, int((0.1 if quick else 0.4) / one_step))
    times = interleaved({name: partial(run, steps) for name, run in loops.items()}, rounds, warmup=1)
    parameters = sum(p.numel() for p in mlp(width).parameters())
    return {
        "width": width,
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    widths = args.widths or (WIDTHS[:2] if args.quick else WIDTHS)
    results = [bench_width(w, args.rounds or (3 if args.quick else 9), args.quick) for w in widths]
    rows = [
        [
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
        f"Training step on the CPU, one compute thread: MLP of {DEPTH} layers, batch {BATCH}, SGD + momentum",
        ["width (parameters)", "no EMA ms", "sync ms", "async ms", "sync vs none", "async vs none"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
