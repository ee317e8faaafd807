"""Figures for people: sizes, times, text and HTML tables, for the CLI and the
``%container`` magic.

Standard library only: the magic imports it inside every kernel.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

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


def relative_time(then: float, now: float) -> str:
    """How long ago ``then`` was, for people: ``just now``, ``3 min ago``,
    ``2 h ago``, ``5 days ago``; a time in the future is ``just now``."""
    seconds = int(now - then)
    if seconds < 45:
        return "just now"
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            count = round(seconds / size)
            plural = "s" if unit == "day" and count != 1 else ""
            return f"{count} {unit}{plural} ago"
    return "just now"  # pragma: no cover - 45 s and more is at least a minute


def html_table(rows: Sequence[Sequence[str]], caption: str = "") -> str:
    """Rows of cells as an HTML table, the first row the heading; every cell escaped."""
    if not rows:
        return ""
    head, *body = rows
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head))
    parts.append("</tr></thead><tbody>")
    for row in body:
        parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


class Rich:
    """Output with an HTML form and a plain-text one: a frontend shows the richest
    it can (``_repr_html_``), and text-only ones (a terminal, a log) the text."""

    def __init__(self, text: str, html_text: str) -> None:
        self.text = text
        self.html_text = html_text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return self.html_text


def tree_order(metas: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """Snapshots as a tree of parents and children: ``(depth, meta)`` in the order to
    show them, oldest first among siblings. A snapshot whose parent is gone is a root."""
    names = {m["name"] for m in metas}
    children: dict[str | None, list[Mapping[str, Any]]] = {}
    for meta in sorted(metas, key=lambda m: m["created"]):
        parent = meta.get("parent") if meta.get("parent") in names else None
        children.setdefault(parent, []).append(meta)
    ordered: list[tuple[int, Mapping[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for meta in children.get(parent, []):
            ordered.append((depth, meta))
            walk(meta["name"], depth + 1)

    walk(None, 0)
    return ordered


#: IPython's own files in a kernel's home: they change with every cell, so ``diff``
#: hides them unless asked for everything.
NOISE = ("history.sqlite", "history.sqlite-journal", "history.sqlite-wal", "history.sqlite-shm")

#: The groups of a diff, in the order shown.
DIFF_GROUPS = (("added", "+"), ("changed", "~"), ("deleted", "-"))


def group_diff(changes: Mapping[str, Any], everything: bool = False) -> dict[str, list[str]]:
    """The paths of a diff by group (added, changed, deleted), each sorted, without
    IPython's history files unless ``everything``."""
    grouped = {}
    for key, _ in DIFF_GROUPS:
        paths = sorted(changes.get(key) or [])
        if not everything:
            paths = [p for p in paths if p.rsplit("/", 1)[-1] not in NOISE]
        grouped[key] = paths
    return grouped
