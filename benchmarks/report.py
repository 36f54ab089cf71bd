"""Plain-text tables and unit helpers shared by the benchmark sections."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.measure import median

__all__ = ["paired_ratio", "print_table", "us"]


def us(seconds: float) -> float:
    """Seconds to microseconds, rounded for the tables and the JSON."""
    return round(seconds * 1e6, 2)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios of two series measured in the same rounds."""
    return round(median([a / b for a, b in zip(numerator, denominator, strict=True)]), 3)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``rows`` under ``header``, the first column left-aligned and the others right-aligned."""
    cells = [[str(h) for h in header], *([_fmt(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        line = "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        print("  " + line)
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))
