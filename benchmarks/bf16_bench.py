"""The update of a bf16 student (float32 shadows, a bf16 EMA model) against the single-pass floor.

``python -m benchmarks.bf16_bench``: on the three benchmark models in bf16, ``ModelEMA.update`` timed side by side
with the floor of one fused pass, which reads the bf16 student and the float32 shadow and writes the shadow and
the bf16 mirror: 12 bytes per element, timed as one float32 ``lerp_`` over a flat buffer of as many elements (read
8, write 4). The update makes three passes (the students widened to float32 in chunks, one ``lerp_``, the copy into
the mirror): about 22 bytes per element. One thread, the medians of paired rounds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from benchmarks.measure import Settings, calls_for, interleaved, mean_call_seconds, median, one_thread_models
from benchmarks.models import ModelSpec, describe
from benchmarks.report import paired_ratio, print_table, us
from ignite_ema import ModelEMA

MOMENTUM = 2e-4
OURS, FLOOR = "ModelEMA.update, bf16 student", "floor: one float32 lerp_ over as many elements (12 B each)"


def bench_bf16(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    student = spec.build().to(torch.bfloat16)
    ema = ModelEMA(student, handle_buffers="update")
    elements = describe(student)["averaged_elements"]
    shadow, source = torch.zeros(elements), torch.ones(elements)
    calls: dict[str, Callable[[], object]] = {
        OURS: partial(ema.update, MOMENTUM),
        FLOOR: partial(shadow.lerp_, source, MOMENTUM),
    }
    runs = {
        name: partial(mean_call_seconds, fn, calls_for(fn, 0.005 if settings.quick else 0.02))
        for name, fn in calls.items()
    }
    times = interleaved(runs, settings.rounds, settings.warmup)
    return {
        "title": spec.title,
        "ours_us": us(median(times[OURS])),
        "floor_us": us(median(times[FLOOR])),
        "x_floor": paired_ratio(times[OURS], times[FLOOR]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings, specs = one_thread_models("python -m benchmarks.bf16_bench", __doc__.split("\n\n")[0], argv)
    results = [bench_bf16(spec, settings) for spec in specs]
    rows = [[r["title"], r["ours_us"], r["floor_us"], r["x_floor"]] for r in results]
    print_table(
        "bf16 students: the update against the single-pass floor", ["model", "ours us", "floor us", "x floor"], rows
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
