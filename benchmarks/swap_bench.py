"""The swap: ``with ema.swapped():`` on the benchmark models, its time and peak extra memory.

Beside it, the obvious way to evaluate a student with EMA weights, which keeps
a second copy of the model: clone the student's ``state_dict()``, load the EMA
model's into it, and load the clone back after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from benchmarks.measure import Settings, calls_for, interleaved, mean_call_seconds, median, profile_allocations
from benchmarks.models import MODELS, ModelSpec
from benchmarks.report import paired_ratio, print_table, us
from ignite_ema import ModelEMA, named_tensors

SWAP, RELOAD = "ignite_ema swapped() in and out", "state_dict clone + load_state_dict in and out"


def swap_once(ema: ModelEMA) -> None:
    with ema.swapped():
        pass


def _reload_once(student: nn.Module, ema_model: nn.Module) -> None:
    own = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(ema_model.state_dict())
    student.load_state_dict(own)


def bench_swap(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """Time of one swap in and out, and the peak memory it allocates, against the clone-and-load way."""
    student = spec.build()
    ema = ModelEMA(student, handle_buffers="update")
    calls: dict[str, Callable[[], None]] = {
        SWAP: partial(swap_once, ema),
        RELOAD: partial(_reload_once, student, ema.ema_model),
    }
    runs = {
        name: partial(mean_call_seconds, fn, calls_for(fn, 0.005 if settings.quick else 0.02))
        for name, fn in calls.items()
    }
    times = interleaved(runs, settings.rounds, settings.warmup)
    tensors = list(named_tensors(student).values())
    largest = max(t.numel() * t.element_size() for t in tensors)
    whole = sum(t.numel() * t.element_size() for t in tensors)
    rows = {}
    for name, fn in calls.items():
        peak = profile_allocations(fn).peak_bytes
        rows[name] = {
            "us": us(median(times[name])),
            "x_swap": paired_ratio(times[name], times[SWAP]),
            "peak_extra_bytes": peak,
            "peak_over_largest_tensor": round(peak / largest, 3),
        }
    return {"title": spec.title, "largest_tensor_bytes": largest, "model_bytes": whole, "rows": rows}


def print_swap(results: Sequence[dict[str, Any]]) -> None:
    header = ["model", "way", "us", "x swap", "peak extra B", "x largest tensor", "model B"]
    rows = []
    for r in results:
        for name, row in r["rows"].items():
            rows.append(
                [
                    r["title"],
                    name,
                    row["us"],
                    row["x_swap"],
                    row["peak_extra_bytes"],
                    row["peak_over_largest_tensor"],
                    r["model_bytes"],
                ]
            )
    print_table("swap: the EMA's weights into the student and back", header, rows)


def bench_all(settings: Settings, keys: Sequence[str]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    return [bench_swap(spec, settings) for spec in MODELS if spec.key in keys]
