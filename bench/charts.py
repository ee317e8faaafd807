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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"chart: {path}", file=sys.stderr)
    return path
