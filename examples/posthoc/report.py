"""What the digits run shows: a table of the metrics against sigma_rel (stdout and Markdown), results.json, the PNG."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from examples.posthoc.digits import DIRECT, TRACKED, Results, Scores


def _scores(result: Results, table: str, sigma: float | None = None) -> Scores:
    """``result.student`` for ``"student"``, else ``result.<table>[sigma]``."""
    if table == "student":
        return result.student
    scores: Scores = getattr(result, table)[sigma]
    return scores


def _mean(results: Sequence[Results], metric: str, table: str, sigma: float | None = None) -> float:
    """Mean over seeds of ``metric`` of the scores that ``table`` and ``sigma`` pick."""
    return float(statistics.mean(getattr(_scores(r, table, sigma), metric) for r in results))


def markdown_table(results: Sequence[Results], every: int = 2) -> str:
    """Mean over seeds of test NLL and accuracy (%), reconstructed and, where there is one, tracked directly."""
    lines = [
        "| sigma_rel | profile fit error | reconstructed NLL | reconstructed acc. (%) | direct NLL | direct acc. (%) "
        "| direct by |",
        "|---|---|---|---|---|---|---|",
    ]
    grid = list(results[0].reconstructed)
    shown = [s for i, s in enumerate(grid) if i % every == 0 or s in TRACKED or s in DIRECT]
    for sigma in shown:
        cells = [
            f"{sigma:.2f}",
            f"{100 * max(r.fit_residual[sigma] for r in results):.2f}%",
            f"{_mean(results, 'nll', 'reconstructed', sigma):.4f}",
            f"{100 * _mean(results, 'accuracy', 'reconstructed', sigma):.1f}",
        ]
        table = "tracked" if sigma in TRACKED else "direct" if sigma in DIRECT else None
        if table is None:
            cells += ["", "", ""]
        else:
            cells += [
                f"{_mean(results, 'nll', table, sigma):.4f}",
                f"{100 * _mean(results, 'accuracy', table, sigma):.1f}",
                "PostHocEMA (tracked)" if sigma in TRACKED else "EMAHandler",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    student_nll, student_acc = _mean(results, "nll", "student"), 100 * _mean(results, "accuracy", "student")
    lines.append(f"| student | | | | {student_nll:.4f} | {student_acc:.1f} | no EMA |")
    return "\n".join(lines)


def check_lines(results: Sequence[Results]) -> list[str]:
    """The reconstruction against the EMAs tracked during the same run, and the best width."""
    lines = []
    for label, table, sigmas in (("tracked by PostHocEMA", "tracked", TRACKED), ("EMAHandler", "direct", DIRECT)):
        gaps = [
            abs(r.reconstructed[s].nll - getattr(r, table)[s].nll)
            for r in results
            for s in sigmas
            if s in r.reconstructed
        ]
        if gaps:
            lines.append(f"|reconstructed - {label}| test NLL: at most {max(gaps):.4f} over {len(gaps)} (width, seed)")
    grid = list(results[0].reconstructed)
    best = min(grid, key=lambda s: _mean(results, "nll", "reconstructed", s))
    best_nll, student_nll = _mean(results, "nll", "reconstructed", best), _mean(results, "nll", "student")
    lines.append(f"lowest mean test NLL at sigma_rel {best:.2f}: {best_nll:.4f} (the student's: {student_nll:.4f})")
    return lines


def write_json(results: Sequence[Results], path: Path) -> None:
    path.write_text(json.dumps([r.as_json() for r in results], indent=2) + "\n")


def plot(results: Sequence[Results], path: Path) -> None:
    """Test NLL and accuracy against sigma_rel: the reconstructions' mean over seeds (band: min to max), the
    EMAs tracked directly as markers, the student as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    grid = list(results[0].reconstructed)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, scale, label in (
        (axes[0], "nll", 1.0, "test NLL"),
        (axes[1], "accuracy", 100.0, "test accuracy (%)"),
    ):
        per_seed = [[scale * getattr(r.reconstructed[s], metric) for s in grid] for r in results]
        mean = [statistics.mean(v) for v in zip(*per_seed, strict=True)]
        ax.plot(grid, mean, color="C0", label="reconstructed from snapshots (PostHocEMA)")
        if len(results) > 1:
            low = [min(v) for v in zip(*per_seed, strict=True)]
            high = [max(v) for v in zip(*per_seed, strict=True)]
            ax.fill_between(grid, low, high, color="C0", alpha=0.2, linewidth=0)
        for table, marker, color, name in (
            ("tracked", "o", "C1", "tracked by PostHocEMA (0.05, 0.10)"),
            ("direct", "x", "C3", "tracked by EMAHandler(power_warmup)"),
        ):
            sigmas = list(getattr(results[0], table))
            values = [scale * _mean(results, metric, table, s) for s in sigmas]
            ax.plot(sigmas, values, linestyle="none", marker=marker, color=color, markersize=8, label=name)
        student = scale * _mean(results, metric, "student")
        ax.axhline(student, color="gray", linestyle="--", label="student (no EMA)")
        ax.set_xlabel("sigma_rel (EMA width / run length)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    config = results[0].config
    figure.suptitle(
        f"Digits, {config.labels_per_class} labels per class, {config.iterations} iterations, "
        f"{len(results)} seed(s): one run each, every width after training"
    )
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
