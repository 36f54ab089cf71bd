"""Ours' update against the torch call it is built on, for an A/B of two checkouts.

``python -m benchmarks.ab_update [rounds]`` prints, per benchmark model, the median over rounds of
(ours attached to an engine, minus the bare engine) / ``torch._foreach_lerp_`` alone and / the floor, and
ours' µs per update. Both ratios are taken within a round of one process, so they survive a machine whose
speed drifts; run it in two checkouts, alternating, and compare the ratios (an older checkout needs the
script copied in; the helpers it uses, models.MODELS among them, are there from commit a9f8b78 on)::

    git worktree add ../old <commit> && cp benchmarks/ab_update.py ../old/benchmarks/
    for i in 1 2 3; do for d in ../old .; do (cd $d && python -m benchmarks.ab_update 11); done; done
"""

from __future__ import annotations

import json
import statistics
import sys
from functools import partial

import torch

from benchmarks import contenders, models
from benchmarks.measure import interleaved, use_cpu_clock


def measure(rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for spec in models.MODELS:
        student, n = spec.build(), spec.updates_per_run
        runs = {
            "ours": contenders.ours_on_engine(student, contenders.MOMENTUM),
            "bare": contenders.EngineContender("bare"),
            "foreach": contenders.foreach_lerp_alone(student, contenders.MOMENTUM),
            "floor": contenders.floor_lerp(student, contenders.MOMENTUM),
        }
        times = interleaved({key: partial(c.timed_run, n) for key, c in runs.items()}, rounds, 1)
        ours = [t - b for t, b in zip(times["ours"], times["bare"], strict=True)]
        out[spec.key] = {
            "ours_over_foreach": statistics.median(o / f for o, f in zip(ours, times["foreach"], strict=True)),
            "ours_over_floor": statistics.median(o / f for o, f in zip(ours, times["floor"], strict=True)),
            "ours_us_per_update": statistics.median(ours) / n * 1e6,
        }
    return out


def main() -> None:
    torch.set_num_threads(1)
    use_cpu_clock(True)
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 11)))


if __name__ == "__main__":
    main()
