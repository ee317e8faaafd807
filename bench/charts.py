"""Charts of the benchmarks' figures, for README (matplotlib, in the ``bench`` extra).

Each bench script that draws calls one of these with its own figures, after it
has printed its table. Without matplotlib a script still prints its figures and
says how to get the chart.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

#: Where README's charts live.
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: install the bench extra, pip install -e '.[bench]')", file=sys.stderr)
        return None
    return plt


def _save(plt, fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Lay out ``fig``, write it to ``path`` (PNG), close it; the path."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"chart: {path}", file=sys.stderr)
    return path


def distributions(
    path: Path, title: str, series: dict[str, list[float]], unit: str = "s"
) -> Path | None:
    """A box of each series, with every measurement as a dot; saved as ``path``
    (PNG). Returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.7 * len(series)), dpi=110)
    names = list(series)
    ax.boxplot([series[n] for n in names], vert=False, widths=0.5, showfliers=False)
    jitter = random.Random(0)
    for i, name in enumerate(names, start=1):
        values = series[name]
        ax.scatter(values, [i + jitter.uniform(-0.15, 0.15) for _ in values], s=10, alpha=0.6)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set_xlabel(unit)
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(plt, fig, path)


def against_size(
    path: Path,
    title: str,
    panels: dict[str, dict[str, list[tuple[float, float]]]],
    xlabel: str = "state (MiB)",
    ylabel: str = "s",
) -> Path | None:
    """One panel per entry of ``panels`` (``{panel: {series: [(x, y), ...]}}``), each
    series a line with its points marked; log-scaled x where the sizes span more
    than a decade. Saved as ``path`` (PNG); the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=110)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (panel, series) in zip(axes, panels.items(), strict=True):
        xs: list[float] = []
        for name, points in series.items():
            points = sorted(points)
            xs += [x for x, _ in points]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
        if xs and max(xs) > 10 * min(xs) > 0:
            ax.set_xscale("log")
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(plt, fig, path)


def lines(
    path: Path, title: str, series: dict[str, list[float]], xlabel: str, ylabel: str
) -> Path | None:
    """Each series a line over 1, 2, ... (its index); saved as ``path`` (PNG). The
    path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)
