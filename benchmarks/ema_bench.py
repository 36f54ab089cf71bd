"""Per-update cost of ignite_ema's EMAHandler beside its peers and the fused-lerp floor.

Sections, all measured in one process, side by side:

1. per model, the time of one update for each contender (engine-based ones
   minus the bare engine's time per iteration), its ratio to the floor, and the
   tensor memory allocated during one update;
2. ``every=k`` (k = 1, 2, 4, 8): ours' mean EMA cost per training iteration;
3. the EMA's share of a training step of the SED example's CRNN;
4. a breakdown of ours' update: engine events, schedule, multi-tensor calls;
5. the swap of the EMA's weights into the student: time and peak extra memory;
6. an FSDP2 student on 1 and 2 gloo processes: EMA memory per rank, update cost
   against the floor over the local shards, and an EMA that gathers per update.

Run ``python -m benchmarks`` (``--quick`` for a smoke run); results are printed
and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from torch import nn

from benchmarks.breakdown import engine_overheads, forward_hook_cost, model_breakdown, print_breakdown
from benchmarks.contenders import (
    BARE,
    FLOOR,
    FOREACH,
    IGNITE,
    MOMENTUM,
    NOTES,
    OURS,
    TIMM,
    Contender,
    DirectContender,
    EngineContender,
    build_contenders,
    load_timm_model_ema,
    ours_on_engine,
    per_update,
)
from benchmarks.fsdp_bench import OURS as FSDP_OURS
from benchmarks.fsdp_bench import bench_fsdp, print_fsdp
from benchmarks.measure import Settings, interleaved, median, profile_allocations, use_cpu_clock
from benchmarks.models import MODELS, ModelSpec, describe
from benchmarks.report import paired_ratio, print_table, us
from benchmarks.swap_bench import SWAP, print_swap
from benchmarks.swap_bench import bench_all as bench_swaps
from examples.sed_f1.model import CRNN

EVERY = (1, 2, 4, 8)
TARGET_FLOOR_RATIO = 1.15  # ours / floor on the large-tensor models
TARGET_VS_IGNITE = 10.0  # ignite / ours on the many-small-tensor model
TARGET_SHARDED_FLOOR_RATIO = 1.2  # ours / a bare _foreach_lerp_ over the local shards, 2 ranks
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


# ------------------------------------------------------- 1. per-model table


def bench_model(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """Per-update time, ratios and allocations of every contender on one model."""
    student = spec.build()
    contenders = build_contenders(student, MOMENTUM)
    n = settings.updates(spec.updates_per_run)
    runs = {c.name: partial(c.timed_run, n) for c in contenders}
    update_seconds = per_update(interleaved(runs, settings.rounds, settings.warmup), contenders, n)
    rows: dict[str, dict[str, Any]] = {}
    for c in contenders:
        alloc = None if c.name == BARE else asdict(profile_allocations(c.update_once))
        rows[c.name] = {
            "us_per_update": us(median(update_seconds[c.name])),
            "ratio_to_floor": None if c.name == BARE else paired_ratio(update_seconds[c.name], update_seconds[FLOOR]),
            "ratio_to_ours": None if c.name == BARE else paired_ratio(update_seconds[c.name], update_seconds[OURS]),
            "allocations": alloc,
            "rounds_us": [us(t) for t in update_seconds[c.name]],
        }
    return {"title": spec.title, "model": describe(student), "updates_per_run": n, "contenders": rows}


def print_model(result: dict[str, Any]) -> None:
    m = result["model"]
    title = (
        f"{result['title']}: {m['parameters']:,} params, {m['tensors']} tensors ({m['averaged_tensors']} averaged, "
        f"{m['averaged_elements']:,} elements; {m['integer_buffers']} integer buffers)"
    )
    header = ["contender", "us/update", "x floor", "x ours", "peak extra B", "alloc B", "allocs"]
    rows = []
    for name, r in result["contenders"].items():
        a = r["allocations"] or {}
        label = f"{name} (per iteration)" if name == BARE else name
        timing = [r["us_per_update"], r["ratio_to_floor"], r["ratio_to_ours"]]
        rows.append([label, *timing, a.get("peak_bytes"), a.get("total_bytes"), a.get("count")])
    print_table(title, header, rows)


# ------------------------------------------------------------ 2. every=k


def bench_every(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """Ours attached with ``ITERATION_COMPLETED(every=k)``: mean EMA cost per iteration."""
    student = spec.build()
    # Every k does the same number of updates per run, so the run's first update, the one after the cache
    # flush, weighs alike in all of them; the bare engine is subtracted per iteration.
    updates = settings.updates(spec.updates_per_run)
    iterations = {BARE: updates * max(EVERY)} | {f"every={k}": updates * k for k in EVERY}
    contenders: list[Contender] = [EngineContender(BARE)]
    for k in EVERY:
        contender = ours_on_engine(student, MOMENTUM, Events.ITERATION_COMPLETED(every=k))
        contender.name = f"every={k}"
        contenders.append(contender)
    runs = {c.name: partial(c.timed_run, iterations[c.name]) for c in contenders}
    times = interleaved(runs, settings.rounds, settings.warmup)
    bare = [t / iterations[BARE] for t in times[BARE]]
    per_iter = {
        name: [t / iterations[name] - b for t, b in zip(times[name], bare, strict=True)]
        for name in iterations
        if name != BARE
    }
    out: dict[str, Any] = {"title": spec.title, "updates_per_run": updates, "every": {}}
    for k in EVERY:
        rounds = per_iter[f"every={k}"]
        out["every"][k] = {
            "us_per_iteration": us(median(rounds)),
            "us_per_update": us(median(rounds) * k),
            "ratio_to_every_1": paired_ratio(rounds, per_iter["every=1"]),
        }
    return out


def print_every(results: Sequence[dict[str, Any]]) -> None:
    header = ["model", *(f"k={k} us/it" for k in EVERY), *(f"k={k} x k=1" for k in EVERY[1:])]
    rows = []
    for r in results:
        e = r["every"]
        rows.append(
            [r["title"], *(e[k]["us_per_iteration"] for k in EVERY), *(e[k]["ratio_to_every_1"] for k in EVERY[1:])]
        )
    print_table("ignite_ema with every=k: mean EMA cost per training iteration", header, rows)


# --------------------------------------------------------------- 3. CRNN


def _crnn_train_step(model: nn.Module) -> Callable[[], None]:
    """One forward + backward + Adam step of the SED CRNN on a fixed batch of 16 log-mel clips (64 x 128)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 64, 128, generator=gen)
    frames = (torch.rand(16, 64, 10, generator=gen) < 0.1).float()  # the CRNN halves the frame rate
    clips = frames.amax(dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    bce = nn.functional.binary_cross_entropy

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        frame_probs, clip_probs = model(x)
        torch.autograd.backward(bce(frame_probs, frames) + bce(clip_probs, clips))  # the SED runs' supervised loss
        optimizer.step()

    return step


def bench_crnn(settings: Settings) -> dict[str, Any]:
    """A training step and one EMA update of ours, in the same rounds."""
    model = CRNN(n_classes=10).train()
    step = DirectContender("train step", _crnn_train_step(model))
    step.update_once()  # Adam's state
    contenders: list[Contender] = [EngineContender(BARE), ours_on_engine(model, MOMENTUM)]
    n, steps_per_run = settings.updates(64), 2 if settings.quick else 4
    runs = {c.name: partial(c.timed_run, n) for c in contenders}
    runs[step.name] = partial(step.timed_run, steps_per_run)
    times = interleaved(runs, settings.rounds, settings.warmup)
    update_seconds = per_update(times, contenders, n)
    steps = [t / steps_per_run for t in times[step.name]]
    shares = [e / (s + e) for e, s in zip(update_seconds[OURS], steps, strict=True)]
    return {
        "model": describe(model),
        "train_step_us": us(median(steps)),
        "ema_update_us": us(median(update_seconds[OURS])),
        "ema_share_of_step_percent": round(100 * median(shares), 3),
    }


def print_crnn(result: dict[str, Any]) -> None:
    m = result["model"]
    rows = [
        ["training step (fwd + bwd + Adam)", result["train_step_us"]],
        ["ignite_ema update (attached, minus bare engine)", result["ema_update_us"]],
        ["EMA share of (step + EMA), %", result["ema_share_of_step_percent"]],
    ]
    print_table(
        f"CRNN (batch 16 x 64 mel x 128 frames; {m['parameters']:,} params, {m['tensors']} tensors)", ["", "us"], rows
    )


# ------------------------------------------------------------- targets


def check_targets(
    models: dict[str, dict[str, Any]], swaps: Sequence[dict[str, Any]], fsdp: dict[str, Any]
) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    found = []
    for swap in swaps:
        over = swap["rows"][SWAP]["peak_over_largest_tensor"]
        found.append(
            {"target": f"swap {swap['title'][:3]}: peak extra <= the largest tensor", "value": over, "met": over <= 1.0}
        )
    sharded = fsdp["worlds"][2]["x_floor"][FSDP_OURS]
    found.append(
        {
            "target": f"FSDP2, 2 ranks: ours <= {TARGET_SHARDED_FLOOR_RATIO} x floor over local shards",
            "value": sharded,
            "met": sharded <= TARGET_SHARDED_FLOOR_RATIO,
        }
    )
    halved = fsdp["worlds"][2]["ema_bytes_per_rank"] / fsdp["worlds"][1]["ema_bytes_per_rank"]
    found.append(
        {"target": "FSDP2: EMA bytes per rank, 2 ranks / 1 rank <= 0.51", "value": halved, "met": halved <= 0.51}
    )
    for key in ("conv", "transformer"):
        if key in models:
            rows = models[key]["contenders"]
            ratio = rows[OURS]["ratio_to_floor"]
            found.append(
                {
                    "target": f"{key}: ours <= {TARGET_FLOOR_RATIO} x floor",
                    "value": ratio,
                    "met": ratio <= TARGET_FLOOR_RATIO,
                }
            )
            found.append(
                {
                    "target": f"{key}: (context) {FOREACH} / floor",
                    "value": rows[FOREACH]["ratio_to_floor"],
                    "met": None,
                }
            )
    if "small" in models:
        rows = models["small"]["contenders"]
        if TIMM in rows:
            ratio = rows[TIMM]["ratio_to_ours"]
            found.append(
                {"target": "small: timm / ours >= 1 (ours at least as fast)", "value": ratio, "met": ratio >= 1.0}
            )
        ratio = rows[IGNITE]["ratio_to_ours"]
        found.append(
            {"target": f"small: ignite / ours >= {TARGET_VS_IGNITE}", "value": ratio, "met": ratio >= TARGET_VS_IGNITE}
        )
    return found


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    verdict = {True: "met", False: "MISSED", None: ""}
    rows = [[t["target"], f"{t['value']:.3f}", verdict[t["met"]]] for t in targets]
    print_table("targets (median of per-round ratios)", ["", "value", ""], rows)


# ------------------------------------------------------------------- main


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("pytorch-ignite", "ignite-ema"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    try:
        found["timm"] = load_timm_model_ema()[1]
    except (ModuleNotFoundError, PackageNotFoundError):
        found["timm"] = "not installed: timm left out"
    return found


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="cpu: this thread's CPU time (default with one thread: robust to other processes); wall: perf_counter",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: few rounds, short runs")
    parser.add_argument("--models", nargs="+", choices=[m.key for m in MODELS], default=[m.key for m in MODELS])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    use_cpu_clock(clock == "cpu")
    settings = Settings(rounds=args.rounds or (3 if args.quick else 21), quick=args.quick)
    specs = [m for m in MODELS if m.key in args.models]
    config = {
        **_versions(),
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
        "clock": clock,
        "rounds": settings.rounds,
        "quick": settings.quick,
        "momentum": MOMENTUM,
        "load_average_start": os.getloadavg(),
    }
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    print("semantics:\n" + "\n".join(f"  {name}: {note}" for name, note in NOTES.items()))

    models = {}
    for spec in specs:
        models[spec.key] = bench_model(spec, settings)
        print_model(models[spec.key])
    every = [bench_every(spec, settings) for spec in specs]
    print_every(every)
    crnn = bench_crnn(settings)
    print_crnn(crnn)
    pieces = {spec.key: model_breakdown(spec, settings) for spec in specs}
    engine = engine_overheads(settings)
    hook = forward_hook_cost(settings)
    print_breakdown(pieces, {k: m["contenders"][OURS] for k, m in models.items()}, engine, hook)
    swaps = bench_swaps(settings, [spec.key for spec in specs])
    print_swap(swaps)
    fsdp = bench_fsdp(settings)
    print_fsdp(fsdp)
    targets = check_targets(models, swaps, fsdp)
    print_targets(targets)

    config["load_average_end"] = os.getloadavg()
    results = {
        "config": config,
        "semantics": NOTES,
        "models": models,
        "every": every,
        "crnn": crnn,
        "breakdown": pieces,
        "engine": engine,
        "teacher_probe": hook,
        "swap": swaps,
        "fsdp": fsdp,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
