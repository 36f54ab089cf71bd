"""What a comparison shows: the table (stdout and Markdown), results.json, the plot, and the verdict."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from examples.sed_f1.experiment import RunResult
from examples.sed_f1.metrics import SCORES

SHORT = {score: score.removesuffix("_f1") for score in SCORES}  # "frame_f1" -> "frame"


def _mean_std(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def _by_run(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    runs: dict[str, list[RunResult]] = {}
    for result in results:
        runs.setdefault(result.name, []).append(result)
    return runs


def markdown_table(results: Sequence[RunResult]) -> str:
    """Mean ± std over seeds of every F1 (in %), teacher then student, one row per run."""
    header = ["run", "seeds"]
    header += [f"teacher {SHORT[m]}" for m in SCORES] + [f"student {SHORT[m]}" for m in SCORES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in _by_run(results).items():
        cells = [name, str(len(rows))]
        for model in ("teacher", "student"):
            for metric in SCORES:
                values = [getattr(r, model)[metric] for r in rows if getattr(r, model) is not None]
                cells.append(_mean_std(values) if values else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def norm_ratio_lines(results: Sequence[RunResult]) -> list[str]:
    """Per run, |teacher conv weights| / |student conv weights| per layer, averaged over seeds."""
    lines = []
    for name, rows in _by_run(results).items():
        ratios = [r.conv_norm_ratio for r in rows if r.conv_norm_ratio]
        if ratios:
            means = [statistics.mean(layer) for layer in zip(*ratios, strict=True)]
            lines.append(f"{name}: " + " / ".join(f"{m:.2f}" for m in means))
    return lines


def verdict(results: Sequence[RunResult], margin: float = 0.10, teacher_slack: float = 0.02) -> list[str]:
    """Does the comparison reproduce the regression? One line per check, each starting with PASS or FAIL.

    The checks: the mean teacher frame and event F1 of ``ignite-copy`` and ``copy``
    are at least ``margin`` below ``ema_train``'s, ``ema_train``'s teacher beats
    them in every seed, and ``ema_train``'s teacher is at most ``teacher_slack``
    below its own student.
    """
    runs = _by_run(results)
    if "ema_train" not in runs:
        return ["SKIP: no ema_train run to compare with"]
    lines = []
    reference = {r.seed: r for r in runs["ema_train"]}

    def teacher(rows: Sequence[RunResult], metric: str) -> float:
        return statistics.mean(r.teacher[metric] for r in rows if r.teacher is not None)

    for name in ("ignite-copy", "copy"):
        for metric in ("frame_f1", "event_f1"):
            if name not in runs:
                continue
            gap = teacher(runs["ema_train"], metric) - teacher(runs[name], metric)
            every_seed = all(
                r.teacher is not None and reference[r.seed].teacher is not None
                and reference[r.seed].teacher[metric] > r.teacher[metric]  # type: ignore[index]
                for r in runs[name]
                if r.seed in reference
            )  # fmt: skip
            ok = gap >= margin and every_seed
            lines.append(
                f"{'PASS' if ok else 'FAIL'}: {name} teacher {SHORT[metric]} F1 is {100 * gap:.1f} points below "
                f"ema_train's (needs >= {100 * margin:.0f}), "
                f"{'lower in every seed' if every_seed else 'NOT lower in every seed'}"
            )
    for metric in ("frame_f1", "event_f1"):
        rows = runs["ema_train"]
        lag = statistics.mean(r.student[metric] for r in rows) - teacher(rows, metric)
        ok = lag <= teacher_slack
        lines.append(
            f"{'PASS' if ok else 'FAIL'}: ema_train teacher {SHORT[metric]} F1 is {100 * lag:+.1f} points "
            f"below its student (allowed {100 * teacher_slack:.0f})"
        )
    return lines


def write_json(results: Sequence[RunResult], path: Path) -> None:
    runs = [{k: v for k, v in r.to_json().items() if k != "curve"} for r in results]
    curves = {f"{r.name}/seed{r.seed}": r.curve for r in results}
    path.write_text(json.dumps({"runs": runs, "curves": curves}, indent=2))


def plot_curves(results: Sequence[RunResult], path: Path) -> None:
    """Teacher frame and event F1 over training per run (student for ``supervised``): mean and a band over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for name, rows in _by_run(results).items():
        model = "student" if name == "supervised" else "teacher"
        steps = sorted(rows[0].curve)
        for axis, metric in zip(axes, ("frame_f1", "event_f1"), strict=True):
            per_seed = [[100 * r.curve[s][model][metric] for s in steps] for r in rows]
            mean = [statistics.mean(v) for v in zip(*per_seed, strict=True)]
            low = [min(v) for v in zip(*per_seed, strict=True)]
            high = [max(v) for v in zip(*per_seed, strict=True)]
            style = "--" if name == "supervised" else "-"
            (line,) = axis.plot(steps, mean, style, marker="o", markersize=3, label=f"{name} ({model})")
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    for axis, metric in zip(axes, ("frame", "event"), strict=True):
        axis.set_title(f"{metric}-based F1 on the test set (band: min-max over seeds)")
        axis.set_xlabel("iteration")
        axis.set_ylabel("F1 (%)")
        axis.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
