"""What a comparison shows: the tables (stdout and Markdown), the JSON, the plots, the plateau check and the verdict."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
INFO_RUNS = ("update", "copy+recal")  # teachers whose gap to ema_train is reported, not checked

Key = Callable[[RunResult], str]


def run_key(result: RunResult) -> str:
    return result.name


def study_key(result: RunResult) -> str:
    return f"{result.name} ({result.optimizer})"


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` in %, the sample standard deviation over seeds; the mean alone for one seed (no spread).

    >>> mean_std([0.5, 0.7]), mean_std([0.5])
    ('60.0 ± 14.1', '50.0')
    """
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


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


_OTHERS = "other students (not checked)"


def plateau(results: Sequence[RunResult], tolerance: float = 0.015) -> tuple[bool | None, str]:
    """Have the ``ema_train`` students and teachers plateaued: last two evaluations within ``tolerance``?

    The reference of every gap must be a trained model. The other runs' students are reported, not checked: a
    teacher on borrowed statistics keeps pulling its student about through the consistency loss (the study's
    ``copy`` students move by up to 2.5 points at the end), which is the regression, not a short run.

    Returns the verdict (``None`` when no ``ema_train`` curve has two evaluations) and the largest change in event
    F1 between the last two evaluations, with where it is, per group of curves.
    """
    changes: dict[str, list[tuple[float, str]]] = {"ema_train students": [], "ema_train teachers": [], _OTHERS: []}
    for r in results:
        for model in ("student", "teacher") if r.mode == "ema_train" else ("student",):
            points = curve_of(r, model, "event_f1")
            if len(points) >= 2:
                where = f"ema_train {model}s" if r.mode == "ema_train" else _OTHERS
                changes[where].append((abs(points[-1][1] - points[-2][1]), f"{r.name} {model}, seed {r.seed}"))
    checked = [max(c) for where, c in changes.items() if c and where != _OTHERS]
    text = "; ".join(f"{where} at most {100 * max(c)[0]:.1f} ({max(c)[1]})" for where, c in changes.items() if c)
    if not checked:
        return None, "no ema_train run with two evaluations" + (f" ({text})" if text else "")
    return max(checked)[0] <= tolerance, text


@dataclass(frozen=True)
class Check:
    """One line of the verdict: ``status`` is PASS, FAIL, SKIP (nothing to check), INFO (reported, not checked) or
    :data:`NOT_APPLICABLE` (a check that a --quick run is too short to meet)."""

    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.status}: {self.text}"


NOT_APPLICABLE = "n/a in a --quick run"


def failed(checks: Iterable[Check]) -> list[Check]:
    """The checks that failed: any makes the job exit non-zero."""
    return [check for check in checks if check.status == "FAIL"]


def _gap_line(runs: dict[str, list[RunResult]], name: str, margin: float | None) -> Check:
    """``name``'s teacher against the ``ema_train`` teacher of the same seeds: a check with ``margin``, else INFO."""
    reference = {r.seed: r.teacher for r in runs["ema_train"] if r.teacher is not None}
    rows = [r for r in runs[name] if r.teacher is not None and r.seed in reference]

    def gap(metric: str) -> float:
        ours = statistics.mean(reference[r.seed][metric] for r in rows)
        return ours - statistics.mean(r.teacher[metric] for r in rows if r.teacher is not None)

    every_seed = all(r.teacher is not None and reference[r.seed]["event_f1"] > r.teacher["event_f1"] for r in rows)
    event, frame, psds1 = gap("event_f1"), gap("frame_f1"), gap("psds1")
    needs = "not checked" if margin is None else f"needs >= {100 * margin:.0f} below"
    seeds = "lower in every seed" if every_seed else "NOT lower in every seed"
    text = (
        f"{name} teacher event F1 is {_points(event)} ema_train's ({needs}), {seeds}; frame F1 {_points(frame)}, "
        f"PSDS1 {_points(psds1)}"
    )
    if margin is None:
        return Check("INFO", text)
    return Check("PASS" if event >= margin and every_seed else "FAIL", text)


def _points(difference: float) -> str:
    """A difference (reference minus this) in points, with its direction: "2.3 points below"."""
    return f"{abs(100 * difference):.1f} points {'below' if difference >= 0 else 'above'}"


def verdict(
    results: Sequence[RunResult],
    margin: float = 0.10,
    teacher_slack: float = 0.02,
    tolerance: float = 0.015,
    quick: bool = False,
) -> list[Check]:
    """Does the comparison show the regression in trained models? One :class:`Check` per line.

    The checks: the ``ema_train`` students and teachers have plateaued (event
    F1 of the last two evaluations within ``tolerance``; the other students'
    changes are reported); the mean teacher event F1 of ``ignite-copy`` and
    ``copy`` is at least ``margin`` below ``ema_train``'s, and lower in every
    seed (their frame F1 and PSDS1 gaps are reported on the same line;
    ``update``'s gap is reported, not checked); the ``ema_train`` teacher is
    within ``teacher_slack`` of its own student, on frame and on event F1.

    quick: a smoke run (``--quick``), too short to plateau or for the teacher's average to catch up with its
        student: those checks are reported as :data:`NOT_APPLICABLE`; the gaps are still checked.
    """
    runs = group(results)
    settled, where = plateau(results, tolerance)
    outcome = "SKIP" if settled is None else NOT_APPLICABLE if quick else "PASS" if settled else "FAIL"
    checks = [
        Check(
            outcome,
            f"the ema_train students and teachers have plateaued: event F1 of the last two evaluations within "
            f"{100 * tolerance:.1f} points (changes: {where})",
        )
    ]
    if "ema_train" not in runs:
        return [*checks, Check("SKIP", "no ema_train run to compare with")]
    checks += [_gap_line(runs, name, margin) for name in COPY_RUNS if name in runs]
    checks += [_gap_line(runs, name, None) for name in INFO_RUNS if name in runs]
    for metric in ("frame_f1", "event_f1"):
        rows = [r for r in runs["ema_train"] if r.teacher is not None]
        lag = statistics.mean(r.student[metric] for r in rows) - statistics.mean(
            r.teacher[metric] for r in rows if r.teacher is not None
        )
        status = NOT_APPLICABLE if quick else "PASS" if abs(lag) <= teacher_slack else "FAIL"
        allowed = f"allowed: within {100 * teacher_slack:.0f}"
        checks.append(Check(status, f"ema_train teacher {SHORT[metric]} is {_points(lag)} its student ({allowed})"))
    return checks


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
    """Into three axes: frame and event F1 of teacher (solid) and student (dashed), and the conv norm ratios.

    The legends go below the axes, where they cover no curve whatever the scores.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    layer_styles: tuple[Literal["-", "--", ":"], ...] = ("-", "--", ":")
    for colour, (name, rows) in zip(colours * 4, group(results, key).items(), strict=False):
        for axis, metric in zip(axes[:2], ("frame_f1", "event_f1"), strict=True):
            for model, style in (("teacher", "-"), ("student", "--")):
                if all(model in point for r in rows for point in r.curve.values()):
                    _band(axis, rows, _score(model, metric), color=colour, linestyle=style, label=f"{name} {model}")
        if all("norm_ratio" in p["motion"] for r in rows for p in r.curve.values()):
            layers = len(next(iter(rows[0].curve.values()))["motion"]["norm_ratio"])
            for layer, style in zip(range(layers), layer_styles, strict=False):
                _band(axes[2], rows, _ratio(layer), color=colour, linestyle=style)
    for axis, label in zip(axes, ("frame-based F1 (%)", "event-based F1 (%)", "teacher / student norm"), strict=True):
        axis.set_xlabel("iteration")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_title("frame F1 on the test set (band: min-max over seeds)")
    axes[1].set_title("event F1 (solid: teacher, dashed: student)")
    axes[2].set_title("conv weight norm, teacher / student, per layer")
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "fontsize": 8}
    axes[1].legend(ncol=2, **below)
    # the colours are the runs of the middle legend; one entry per layer, not one per run and layer
    keys = [Line2D([], [], color="0.3", linestyle=s, label=f"conv {i + 1}") for i, s in enumerate(layer_styles)]
    if axes[2].lines:
        title = "colours: the runs, as in the middle panel"
        axes[2].legend(handles=keys, ncol=3, title=title, title_fontsize=8, **below)


def figure(rows: int) -> tuple[Any, Any]:
    """A figure of ``rows`` rows of three axes, files only (no display here or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 3, figsize=(16, 5 * rows), squeeze=False)
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
    "NOT_APPLICABLE",
    "TABLE_SCORES",
    "Check",
    "curve_of",
    "failed",
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
