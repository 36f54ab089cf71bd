"""What a comparison shows: the tables (stdout and Markdown), the JSON, the plots, the plateau check and the verdict."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from examples.sed_f1.experiment import ALL_SCORES, RunResult

#: The columns of the printed table, per model; results.md has every score.
TABLE_SCORES = ("frame_f1", "event_f1", "event_f1_macro", "intersection_f1", "psds1", "psds2")
SHORT = {
    "frame_f1": "frame F1",
    "segment_f1": "segment F1",
    "event_f1": "event F1",
    "clip_f1": "clip F1",
    "event_f1_macro": "event F1 macro",
    "intersection_f1": "intersection F1",
    "psds1": "PSDS1",
    "psds2": "PSDS2",
}
COPY_RUNS = ("ignite-copy", "copy")  # the teachers in eval mode on the student's copied statistics

Key = Callable[[RunResult], str]


def run_key(result: RunResult) -> str:
    return result.name


def study_key(result: RunResult) -> str:
    return f"{result.name} ({result.optimizer})"


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` in %, the sample standard deviation over seeds (0 for one seed)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def group(results: Sequence[RunResult], key: Key = run_key) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for result in results:
        groups.setdefault(key(result), []).append(result)
    return groups


def markdown_table(results: Sequence[RunResult], scores: Sequence[str] = TABLE_SCORES, key: Key = run_key) -> str:
    """Mean ± std over seeds of ``scores`` (in %): a row for the teacher and one for the student of each run."""
    header = ["run", "model", "seeds", *(SHORT[m] for m in scores)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in group(results, key).items():
        for model in ("teacher", "student"):
            values = [getattr(r, model) for r in rows if getattr(r, model) is not None]
            if values:
                cells = [name, model, str(len(values)), *(mean_std([v[m] for v in values]) for m in scores)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_means(vectors: Iterable[Sequence[float]]) -> list[float]:
    """The element-wise mean of per-layer vectors (one per seed or evaluation): one mean per layer.

    >>> layer_means([[1.0, 2.0], [3.0, 6.0]])
    [2.0, 4.0]
    """
    return [statistics.mean(layer) for layer in zip(*vectors, strict=True)]


def norm_ratio_lines(results: Sequence[RunResult], key: Key = run_key) -> list[str]:
    """Per run, |teacher conv weights| / |student conv weights| per layer at the end, averaged over seeds."""
    lines = []
    for name, rows in group(results, key).items():
        ratios = [r.conv_norm_ratio for r in rows if r.conv_norm_ratio]
        if ratios:
            lines.append(f"{name}: " + " / ".join(f"{m:.2f}" for m in layer_means(ratios)))
    return lines


def curve_of(result: RunResult, model: str, metric: str) -> list[tuple[int, float]]:
    """``(iteration, score)`` of ``model`` ("teacher" or "student") at each evaluation."""
    return [(i, point[model][metric]) for i, point in sorted(result.curve.items())]


def plateau(results: Sequence[RunResult], tolerance: float = 0.015) -> tuple[bool | None, str]:
    """Have every student and every ``ema_train`` teacher plateaued: last two evaluations within ``tolerance``?

    Returns the verdict (``None`` when no curve has two evaluations) and the largest change in event F1 between
    the last two evaluations, with where it is, for the students and for the teachers.
    """
    changes: dict[str, list[tuple[float, str]]] = {"student": [], "teacher": []}
    for r in results:
        for model in ["student"] + (["teacher"] if r.mode == "ema_train" else []):
            points = curve_of(r, model, "event_f1")
            if len(points) >= 2:
                changes[model].append((abs(points[-1][1] - points[-2][1]), f"{r.name} {model}, seed {r.seed}"))
    found = [max(c) for c in changes.values() if c]
    if not found:
        return None, "fewer than two evaluations"
    text = "; ".join(f"{model}s at most {100 * max(c)[0]:.1f} ({max(c)[1]})" for model, c in changes.items() if c)
    return max(found)[0] <= tolerance, text


def _gap_line(runs: dict[str, list[RunResult]], name: str, margin: float) -> str:
    reference = {r.seed: r.teacher for r in runs["ema_train"] if r.teacher is not None}
    rows = [r for r in runs[name] if r.teacher is not None and r.seed in reference]

    def gap(metric: str) -> float:
        ours = statistics.mean(reference[r.seed][metric] for r in rows)
        return ours - statistics.mean(r.teacher[metric] for r in rows if r.teacher is not None)

    every_seed = all(r.teacher is not None and reference[r.seed]["event_f1"] > r.teacher["event_f1"] for r in rows)
    event, frame, psds1 = gap("event_f1"), gap("frame_f1"), gap("psds1")
    ok = event >= margin and every_seed
    return (
        f"{'PASS' if ok else 'FAIL'}: {name} teacher event F1 is {_points(event)} ema_train's "
        f"(needs >= {100 * margin:.0f} below), {'lower in every seed' if every_seed else 'NOT lower in every seed'}; "
        f"frame F1 {_points(frame)}, PSDS1 {_points(psds1)}"
    )


def _points(difference: float) -> str:
    """A difference (reference minus this) in points, with its direction: "2.3 points below"."""
    return f"{abs(100 * difference):.1f} points {'below' if difference >= 0 else 'above'}"


def verdict(
    results: Sequence[RunResult], margin: float = 0.10, teacher_slack: float = 0.02, tolerance: float = 0.015
) -> list[str]:
    """Does the comparison show the regression in trained models? One line per check, starting with PASS or FAIL.

    The checks: every student and ``ema_train`` teacher has plateaued (event
    F1 of the last two evaluations within ``tolerance``); the mean teacher
    event F1 of ``ignite-copy`` and ``copy`` is at least ``margin`` below
    ``ema_train``'s, and lower in every seed (their frame F1 and PSDS1 gaps are
    reported on the same line); the ``ema_train`` teacher is within
    ``teacher_slack`` of its own student, on frame and on event F1.
    """
    runs = group(results)
    settled, where = plateau(results, tolerance)
    outcome = "SKIP" if settled is None else "PASS" if settled else "FAIL"
    lines = [
        f"{outcome}: the students and the ema_train teachers have plateaued: event F1 of the last two evaluations "
        f"within {100 * tolerance:.1f} points (changes: {where})"
    ]
    if "ema_train" not in runs:
        return [*lines, "SKIP: no ema_train run to compare with"]
    lines += [_gap_line(runs, name, margin) for name in COPY_RUNS if name in runs]
    for metric in ("frame_f1", "event_f1"):
        rows = [r for r in runs["ema_train"] if r.teacher is not None]
        lag = statistics.mean(r.student[metric] for r in rows) - statistics.mean(
            r.teacher[metric] for r in rows if r.teacher is not None
        )
        ok = abs(lag) <= teacher_slack
        lines.append(
            f"{'PASS' if ok else 'FAIL'}: ema_train teacher {SHORT[metric]} is {_points(lag)} its student "
            f"(allowed: within {100 * teacher_slack:.0f})"
        )
    return lines


def write_json(results: Sequence[RunResult], path: Path, extra: dict[str, Any] | None = None) -> None:
    """``{"runs": [...], "curves": {...}}`` (and ``extra``): each run's fields without its curve, and the curves."""
    runs = [{k: v for k, v in r.to_json().items() if k != "curve"} for r in results]
    curves = {f"{r.name}/{r.optimizer}/seed{r.seed}": r.curve for r in results}
    path.write_text(json.dumps({"runs": runs, "curves": curves, **(extra or {})}, indent=2))


def _band(axis: Any, rows: Sequence[RunResult], value: Callable[[RunResult, int], float], **style: Any) -> None:
    """Mean over seeds and a min-max band, against the evaluation iterations of the first run."""
    x = sorted(rows[0].curve)
    per_seed = [[value(r, s) for s in x] for r in rows]
    columns = list(zip(*per_seed, strict=True))
    (line,) = axis.plot(x, [statistics.mean(c) for c in columns], marker="o", markersize=3, **style)
    axis.fill_between(x, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(), alpha=0.15)


def _score(model: str, metric: str) -> Callable[[RunResult, int], float]:
    return lambda r, step: 100 * float(r.curve[step][model][metric])


def _ratio(layer: int) -> Callable[[RunResult, int], float]:
    return lambda r, step: float(r.curve[step]["motion"]["norm_ratio"][layer])


def plot_row(axes: Sequence[Any], results: Sequence[RunResult], key: Key = run_key) -> None:
    """Into three axes: frame and event F1 of teacher (solid) and student (dashed), and the conv norm ratios."""
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (name, rows) in zip(colours * 4, group(results, key).items(), strict=False):
        for axis, metric in zip(axes[:2], ("frame_f1", "event_f1"), strict=True):
            for model, style in (("teacher", "-"), ("student", "--")):
                if all(model in point for r in rows for point in r.curve.values()):
                    _band(axis, rows, _score(model, metric), color=colour, linestyle=style, label=f"{name} {model}")
        if all("norm_ratio" in p["motion"] for r in rows for p in r.curve.values()):
            layers = len(next(iter(rows[0].curve.values()))["motion"]["norm_ratio"])
            for layer, style in zip(range(layers), ("-", "--", ":"), strict=False):
                label = f"{name} conv {layer + 1}"
                _band(axes[2], rows, _ratio(layer), color=colour, linestyle=style, label=label)
    for axis, label in zip(axes, ("frame-based F1 (%)", "event-based F1 (%)", "teacher / student norm"), strict=True):
        axis.set_xlabel("iteration")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_title("frame F1 on the test set (band: min-max over seeds)")
    axes[1].set_title("event F1 (solid: teacher, dashed: student)")
    axes[2].set_title("conv weight norm, teacher / student, per layer")
    axes[1].legend(loc="lower right", fontsize=7)
    axes[2].legend(loc="lower right", fontsize=7)


def figure(rows: int) -> tuple[Any, Any]:
    """A figure of ``rows`` rows of three axes, files only (no display here or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.4 * rows), squeeze=False)
    return fig, axes


def save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(results: Sequence[RunResult], path: Path) -> None:
    """The default job's plot: one row of :func:`plot_row`."""
    fig, axes = figure(1)
    plot_row(axes[0], results)
    save(fig, path)


__all__ = [
    "ALL_SCORES",
    "TABLE_SCORES",
    "curve_of",
    "figure",
    "group",
    "layer_means",
    "markdown_table",
    "mean_std",
    "norm_ratio_lines",
    "plateau",
    "plot_curves",
    "plot_row",
    "run_key",
    "save",
    "study_key",
    "verdict",
    "write_json",
]
