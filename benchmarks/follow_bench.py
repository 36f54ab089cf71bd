"""What it costs an update to notice replaced student tensors: ``TensorWatch.changed()`` against ``update()``.

``python -m benchmarks.follow_bench``: on the three benchmark models, the
check alone and the whole update (which includes it) timed side by side in
the same rounds, one thread, and their ratio against the targets: at most 2%
of an update on the two large-tensor models, 10% on the 1,800-tensor one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from benchmarks.measure import Settings, calls_for, interleaved, mean_call_seconds, median, one_thread_models
from benchmarks.models import ModelSpec
from benchmarks.report import paired_ratio, print_table, us
from ignite_ema import ModelEMA

MOMENTUM = 2e-4
TARGETS = {"conv": 0.02, "transformer": 0.02, "small": 0.10}
CHECK, UPDATE = "the check (TensorWatch.changed)", "update() (check included)"


def bench_follow(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    ema = ModelEMA(spec.build(), handle_buffers="update")
    calls: dict[str, Callable[[], object]] = {CHECK: ema._watch.changed, UPDATE: partial(ema.update, MOMENTUM)}
    runs = {
        name: partial(mean_call_seconds, fn, calls_for(fn, 0.005 if settings.quick else 0.02))
        for name, fn in calls.items()
    }
    times = interleaved(runs, settings.rounds, settings.warmup)
    share = paired_ratio(times[CHECK], times[UPDATE])
    return {
        "title": spec.title,
        "check_us": us(median(times[CHECK])),
        "update_us": us(median(times[UPDATE])),
        "check_share": share,
        "target": TARGETS[spec.key],
        "met": share <= TARGETS[spec.key],
    }


def print_follow(results: Sequence[dict[str, Any]]) -> None:
    header = ["model", "check us", "update us", "check / update", "target", "met"]
    rows = [
        [r["title"], r["check_us"], r["update_us"], f"{r['check_share']:.1%}", f"{r['target']:.0%}", _yes(r["met"])]
        for r in results
    ]
    print_table("noticing replaced student tensors, per update (median of paired rounds)", header, rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def main(argv: Sequence[str] | None = None) -> int:
    settings, specs = one_thread_models("python -m benchmarks.follow_bench", __doc__.split("\n\n")[0], argv)
    results = [bench_follow(spec, settings) for spec in specs]
    print_follow(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
