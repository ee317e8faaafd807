"""The renderers of what people read: relative times, HTML and text tables, the
snapshot tree, and the grouped diff."""

from __future__ import annotations

from sandbox_kernel.display import (
    NOISE,
    group_diff,
    html_table,
    relative_time,
    tree_order,
)
from sandbox_kernel.magics.container import diff_view, snapshot_table, status_view

NOW = 1_800_000_000.0


def test_relative_times() -> None:
    assert relative_time(NOW - 5, NOW) == "just now"
    assert relative_time(NOW + 30, NOW) == "just now"
    assert relative_time(NOW - 180, NOW) == "3 min ago"
    assert relative_time(NOW - 2 * 3600, NOW) == "2 h ago"
    assert relative_time(NOW - 86400, NOW) == "1 day ago"
    assert relative_time(NOW - 5 * 86400, NOW) == "5 days ago"


def test_html_table_escapes_every_cell() -> None:
    html = html_table([["NAME", "NOTE"], ["<b>x</b>", "a & b"]], caption="<i>c</i>")
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "a &amp; b" in html and "&lt;i&gt;c&lt;/i&gt;" in html
    assert html.startswith("<table>") and html.endswith("</table>")
    assert html_table([]) == ""


def _meta(name: str, created: float, parent: str | None = None) -> dict[str, object]:
    return {"name": name, "created": created, "parent": parent, "mode": "live",
            "memory_bytes": 3 << 20, "file_bytes": 1536, "message": ""}  # fmt: skip


def test_tree_order_puts_children_under_parents() -> None:
    metas = [_meta("b", 2, "a"), _meta("a", 1), _meta("c", 3, "b"), _meta("d", 4, "a"),
             _meta("orphan", 5, "gone")]  # fmt: skip
    order = [(depth, m["name"]) for depth, m in tree_order(metas)]
    assert order == [(0, "a"), (1, "b"), (2, "c"), (1, "d"), (0, "orphan")]


def test_snapshot_table_text_and_html() -> None:
    rich = snapshot_table([_meta("a", NOW - 600), _meta("b", NOW - 60, "a")], "usage", NOW)
    lines = repr(rich).splitlines()
    assert lines[0].split() == ["NAME", "TAKEN", "MODE", "MEMORY", "FILES", "MESSAGE"]
    assert lines[1].startswith("a ") and "10 min ago" in lines[1] and "3M" in lines[1]
    assert lines[2].startswith("└─ b") and "1 min ago" in lines[2]
    assert lines[-1] == "usage"
    assert all(line == line.rstrip() for line in lines)
    assert (
        "<td>└─ b</td>" in rich._repr_html_() and "<caption>usage</caption>" in rich._repr_html_()
    )


def test_diff_is_grouped_sorted_and_hides_ipythons_files() -> None:
    changes = {
        "since": "s1",
        "added": ["/work/z.txt", "/work/a.txt", "/home/u/.ipython/profile_default/history.sqlite"],
        "changed": ["/home/u/.ipython/profile_default/history.sqlite-journal", "/work/m.txt"],
        "deleted": ["/work/old.txt"],
    }
    grouped = group_diff(changes)
    assert grouped == {"added": ["/work/a.txt", "/work/z.txt"], "changed": ["/work/m.txt"],
                       "deleted": ["/work/old.txt"]}  # fmt: skip
    assert len(group_diff(changes, everything=True)["added"]) == 3
    text = repr(diff_view(changes))
    assert text.splitlines() == [
        "Changes since s1: 2 added, 1 changed, 1 deleted (2 of IPython's history files "
        "hidden; --all shows them).",
        "+ /work/a.txt",
        "+ /work/z.txt",
        "~ /work/m.txt",
        "- /work/old.txt",
    ]
    assert "history.sqlite" in repr(diff_view(changes, everything=True))
    assert all(name.startswith("history.sqlite") for name in NOISE)


def test_a_diff_of_only_history_says_no_changes() -> None:
    changes = {"since": None, "added": [], "changed": ["/h/history.sqlite"], "deleted": []}
    assert repr(diff_view(changes)) == (
        "No changes since the kernel's start (1 of IPython's history files hidden; "
        "--all shows them)."
    )


def test_status_has_one_unit_style_per_row() -> None:
    status = {
        "usage": {"memory": 256 << 20, "cpu_seconds": 0.42, "pids": 12},
        "limits": {"memory": 1 << 30, "cpus": 1.0, "pids": 512},
        "snapshots": 2, "snapshot_bytes": 40 << 20, "current": "e2e-b",
    }  # fmt: skip
    text = repr(status_view(status))
    assert "256M" in text and "1G" in text and "25%" in text
    assert "0.4 s of CPU time" in text and "1 core" in text
    assert text.endswith("2 snapshots, 40M. Latest snapshot taken or restored: e2e-b.")
    status["current"] = None
    assert repr(status_view(status)).endswith("No snapshot taken or restored yet.")
