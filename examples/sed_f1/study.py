"""``--study convergence``: does the copy teacher's loss persist in trained models? Adam against AdamW.

The same runs (``copy`` and ``ema_train``) with Adam and with AdamW (decoupled
weight decay), for several seeds, long enough for the students and the
``ema_train`` teachers to plateau. Reported: the scores at the end, the copy
teacher's spread over the last third of training, the conv norm ratios over
time, and the measured angular update per step against the random-walk
prediction of ``motion.py``, over the last third of the constant learning rate
(the prediction is for a steady state, which the final decay leaves).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.sed_f1.compare import Job
from examples.sed_f1.experiment import RunResult, TrainConfig
from examples.sed_f1.report import (
    curve_of,
    figure,
    group,
    layer_means,
    markdown_table,
    plateau,
    plot_row,
    save,
    study_key,
)

STUDY_RUNS = ("copy", "ema_train")


def study_configs(base: TrainConfig, weight_decay: float) -> dict[str, TrainConfig]:
    """The two optimisers, everything else as ``base``."""
    return {
        "adam": dataclasses.replace(base, optimizer="adam", weight_decay=0.0),
        "adamw": dataclasses.replace(base, optimizer="adamw", weight_decay=weight_decay),
    }


def study_jobs(seeds: Sequence[int], configs: dict[str, TrainConfig]) -> list[Job]:
    return [
        Job(name, seed, config, f"{name}-{optimizer}-seed{seed}")
        for seed in seeds
        for optimizer, config in configs.items()
        for name in STUDY_RUNS
    ]


def _last_third(result: RunResult, end: int | None = None) -> list[int]:
    """The evaluation iterations in the last third of training, or of its first ``end`` iterations."""
    end = max(result.curve) if end is None else end
    return [s for s in sorted(result.curve) if end * 2 / 3 <= s <= end]


def summarise(results: Sequence[RunResult], configs: dict[str, TrainConfig]) -> dict[str, Any]:
    """Per optimiser: gaps per seed, the copy teacher's spread, norm ratios over time, angles against the formula."""
    summary: dict[str, Any] = {}
    for optimizer, config in configs.items():
        rows = [r for r in results if r.optimizer == optimizer]
        runs = group(rows)
        ema = {r.seed: r for r in runs.get("ema_train", [])}
        copy = {r.seed: r for r in runs.get("copy", [])}
        seeds = sorted(set(ema) & set(copy))
        part: dict[str, Any] = {"config": dataclasses.asdict(config)}
        part["event_f1_gap_per_seed"] = {
            s: ema[s].teacher["event_f1"] - copy[s].teacher["event_f1"]  # type: ignore[index]
            for s in seeds
        }
        part["copy_teacher_below_its_student_per_seed"] = {
            s: copy[s].student["event_f1"] - copy[s].teacher["event_f1"]  # type: ignore[index]
            for s in seeds
        }
        last_thirds = {s: set(_last_third(copy[s])) for s in seeds}
        part["copy_teacher_event_f1_last_third"] = {
            s: [point for step, point in curve_of(copy[s], "teacher", "event_f1") if step in last_thirds[s]]
            for s in seeds
        }
        part["plateau"] = plateau(rows)[1]
        part["norm_ratio_over_time"] = _over_time(runs, "norm_ratio")
        part["angles"] = _angles(runs, config)
        summary[optimizer] = part
    return summary


def _over_time(runs: dict[str, list[RunResult]], field: str) -> dict[str, dict[int, list[float]]]:
    """Per run, at each evaluation, the per-layer mean over seeds of ``motion[field]``."""
    out: dict[str, dict[int, list[float]]] = {}
    for name, rows in runs.items():
        steps = sorted(rows[0].curve)
        out[name] = {s: layer_means(r.curve[s]["motion"][field] for r in rows) for s in steps}
    return out


_MOTION_FIELDS = ("angle_per_step", "angle_per_step_over_horizon", "predicted_ratio",
                  "predicted_ratio_over_horizon", "norm_ratio")  # fmt: skip


def _angles(runs: dict[str, list[RunResult]], config: TrainConfig) -> dict[str, Any]:
    """Over the last third of the constant learning rate, mean over seeds and evaluations: angles per step,
    predictions and measured ratios."""
    constant_until = config.constant_lr_until
    out: dict[str, Any] = {"window": [constant_until * 2 / 3, constant_until]}
    for name, rows in runs.items():
        window = [(r, s) for r in rows for s in _last_third(r, constant_until)]
        out[name] = {
            f: layer_means(r.curve[s]["motion"][f] for r, s in window if r.curve[s]["motion"][f])
            for f in _MOTION_FIELDS
        }
    if config.optimizer == "adamw":
        out["equilibrium_angle_per_step"] = math.sqrt(2 * config.lr * config.weight_decay)  # Wan et al. 2021, AdamW
    return out


def _layers(values: Sequence[float], digits: int = 3) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values) if values else "n/a (a run shorter than the horizon)"


def study_text(results: Sequence[RunResult], summary: dict[str, Any]) -> str:
    """The study's findings as Markdown: the table, then per optimiser the gaps, spreads, ratios and angles."""
    lines = ["F1 and PSDS in % on the test set, mean ± std over seeds:", "", markdown_table(results, key=study_key), ""]
    for optimizer, part in summary.items():
        config = TrainConfig(**part["config"])
        decay = f", weight decay {config.weight_decay}" if config.weight_decay else ""
        lines.append(f"### {optimizer} (lr {config.lr}{config.lr_schedule}{decay}, EMA decay {config.ema_decay})")
        lines.append("")
        gaps = ", ".join(f"{100 * g:.1f}" for g in part["event_f1_gap_per_seed"].values())
        below = ", ".join(f"{100 * g:+.1f}" for g in part["copy_teacher_below_its_student_per_seed"].values())
        lines.append(f"- ema_train teacher minus copy teacher, event F1 per seed: {gaps} points")
        lines.append(f"- copy's student minus its teacher, event F1 per seed: {below} points")
        spreads = "; ".join(
            f"seed {s}: {100 * min(v):.1f} to {100 * max(v):.1f}"
            for s, v in part["copy_teacher_event_f1_last_third"].items()
        )
        lines.append(f"- copy teacher event F1 over the last third of training: {spreads}")
        lines.append(f"- plateau: {part['plateau']}")
        for name, over_time in part["norm_ratio_over_time"].items():
            points = ", ".join(f"{step}: {_layers(r, 2)}" for step, r in over_time.items())
            lines.append(f"- {name}: teacher/student conv norm per layer over iterations: {points}")
        angles = part["angles"]
        if "equilibrium_angle_per_step" in angles:
            lines.append(
                f"- equilibrium angular update sqrt(2 lr wd) = {angles['equilibrium_angle_per_step']:.4f} rad/step"
            )
        window = "iterations {:.0f} to {:.0f}".format(*angles["window"])
        for name in (n for n in angles if n not in ("equilibrium_angle_per_step", "window")):
            a = angles[name]
            lines.append(
                f"- {name}, {window}: angle per step {_layers(a['angle_per_step'], 4)} rad -> predicted ratio "
                f"{_layers(a['predicted_ratio'])}; over the EMA horizon {_layers(a['angle_per_step_over_horizon'], 4)}"
                f" rad/sqrt(step) -> {_layers(a['predicted_ratio_over_horizon'])}; measured "
                f"{_layers(a['norm_ratio'])}"
            )
        lines.append("")
    return "\n".join(lines)


def plot_study(results: Sequence[RunResult], path: Path) -> None:
    """One row of curves and norm ratios per optimiser."""
    optimizers = list(dict.fromkeys(r.optimizer for r in results))
    fig, axes = figure(len(optimizers))
    for row, optimizer in zip(axes, optimizers, strict=True):
        plot_row(row, [r for r in results if r.optimizer == optimizer], key=study_key)
    save(fig, path)
