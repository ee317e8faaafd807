"""Figures for people: sizes and text tables, for the CLI and the ``%container`` magic.

Standard library only: the magic imports it inside every kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Bytes in one unit of each suffix, largest first.
UNITS = (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def format_size(size: int | None) -> str:
    """Bytes for people, one decimal at most: ``format_size(3 << 30) == '3G'``,
    ``format_size(1536) == '1.5K'``; None is ``-``."""
    if size is None:
        return "-"
    for unit, factor in UNITS:
        if size >= factor:
            text = f"{size / factor:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{size}B"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as aligned columns, two spaces apart, the first row the heading;
    no trailing spaces."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
