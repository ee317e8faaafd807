"""The ``%container`` panel and the progress bars, without a kernel: the figures, the
text form, the buttons against a fake channel, and the bar handed over to the
process that finishes a restore."""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets
import pytest
from IPython.core.error import UsageError

from sandbox_kernel.display import NOISE
from sandbox_kernel.magics import progress
from sandbox_kernel.magics.container import HELP
from sandbox_kernel.magics.panel import (
    HINT,
    ContainerPanel,
    PanelView,
    gauges,
    panel_view,
    snapshot_rows,
    timeline_points,
)
from sandbox_kernel.magics.progress import (
    WIDGET_VIEW,
    BarState,
    DisplayView,
    Progress,
    estimate,
    finish_handed_over,
)

NOW = 1_800_000_000.0
GIB = 1 << 30


def _meta(name: str, created: float, parent: str | None = None, **more: Any) -> dict[str, Any]:
    return {"name": name, "created": created, "parent": parent, "mode": "live",
            "memory_bytes": 3 << 20, "file_bytes": 1536, "message": "", "seconds": 0.4,
            **more}  # fmt: skip


def _status(memory: int = 256 << 20, cpu: float = 10.0, pids: int = 12, **more: Any) -> Any:
    return {
        "usage": {"memory": memory, "cpu_seconds": cpu, "pids": pids},
        "limits": {"memory": GIB, "cpus": 1.0, "pids": 256},
        "snapshots": 2, "snapshot_bytes": 4 << 20, "current": "a", "last_exit": None,
        "store": {"count": 2, "quota_count": 100, "bytes": 4 << 20, "quota_bytes": 10 * GIB},
        **more,
    }  # fmt: skip


def _checkpoint(before: int, at: float, saving: bool = False) -> dict[str, Any]:
    return {"name": f"ckpt-k-{before - 1}-ab12", "cell": before - 1, "next": before,
            "line": f"x = {before - 1}", "time": at, "added_bytes": 5 << 20,
            "saving": saving}  # fmt: skip


def _listing(*metas: dict[str, Any]) -> dict[str, Any]:
    store = {"count": len(metas), "quota_count": 100, "bytes": 4 << 20, "quota_bytes": 10 * GIB}
    return {"snapshots": list(metas), "store": store}


# ---- the figures -----------------------------------------------------------------------


def test_gauges_against_the_limits() -> None:
    figures, sample = gauges(_status(), None, 100.0)
    memory, cpu, pids = figures
    assert (memory.name, memory.fraction, memory.text) == ("memory", 0.25, "256M of 1G")
    assert memory.bar_style == "success"
    # CPU use is a rate: the first answer has nothing to compare with.
    assert cpu.fraction is None and cpu.text == "measuring ..."
    assert sample == (10.0, 100.0)
    assert pids.fraction == 12 / 256 and pids.text == "12 of 256"
    figures, _ = gauges(_status(memory=950 << 20, cpu=11.5, pids=240), sample, 102.0)
    memory, cpu, pids = figures
    assert cpu.fraction == 0.75 and cpu.text == "0.75 cores of 1 core"
    assert cpu.bar_style == "warning"
    assert memory.bar_style == "danger" and pids.bar_style == "danger"


def test_gauges_without_limits_or_figures() -> None:
    status = _status()
    status["limits"] = {"memory": None, "cpus": None, "pids": None}
    memory, _, pids = gauges(status, None, 1.0)[0]
    assert memory.fraction is None and memory.text == "256M (no limit)"
    assert pids.text == "12 (no limit)"
    status["usage"] = None  # the container is gone
    figures, sample = gauges(status, None, 1.0)
    assert [g.text for g in figures] == ["-", "-", "-"] and sample is None


def test_snapshot_rows_are_a_tree_with_relative_times() -> None:
    metas = [_meta("b", NOW - 60, "a", message="note"), _meta("a", NOW - 600),
             _meta("c", NOW - 30, "b")]  # fmt: skip
    rows = snapshot_rows(metas, NOW, current="b")
    assert [r.label for r in rows] == ["a", "└─ b", "   └─ c"]
    assert [r.taken for r in rows] == ["10 min ago", "1 min ago", "just now"]
    assert [r.current for r in rows] == [False, True, False]
    assert rows[0].detail == "live, memory 3M, files 1.5K" and rows[1].message == "note"


def test_the_text_form_has_the_status_and_the_snapshots() -> None:
    view = panel_view(_status(), _listing(_meta("a", NOW - 600), _meta("b", NOW, "a")), NOW)
    text = repr(view)
    assert "memory" in text and "256M" in text and "1G" in text and "25%" in text
    assert "└─ b" in text and "10 min ago" in text and "Your snapshots: 2 of 100" in text
    assert text.endswith(HINT)
    assert "<table>" in view._repr_html_() and "<td>└─ b</td>" in view._repr_html_()
    empty = repr(panel_view(_status(), _listing(), NOW))
    assert "No snapshots yet" in empty
    # The help stays one line per command, and names the panel.
    assert "%container alone opens a panel" in HELP and "  restore NAME" in HELP
    assert NOISE  # the panel's diff is the magic's: IPython's files stay hidden


# ---- progress bars ---------------------------------------------------------------------


def test_bar_text_and_estimate() -> None:
    assert estimate(0, 0.0, 1.0) == 0.0
    steps = [estimate(k, t, 1.0) for k in range(4) for t in (0.0, 0.5, 5.0)]
    assert steps == sorted(steps) and steps[-1] < 1.0
    state = BarState("Snapshot s", 0.5, 1.25, ("saved files", "checksumming"))
    lines = state.text.splitlines()
    assert lines[0] == "[############............] Snapshot s: checksumming (1.2 s)"
    assert lines[1:] == ["  saved files", "  checksumming"]
    done = BarState("Snapshot s", 1.0, 2.5, done=True)
    assert done.line == "Snapshot s: done in 2.50 s" and done.bar_style == "success"
    assert BarState("R", 0.3, 1.0, done=True, ok=False).bar_style == "danger"


class RecordingView:
    def __init__(self) -> None:
        self.shown: list[BarState] = []
        self.updates: list[tuple[BarState, bool]] = []
        self.moved = threading.Event()

    def show(self, state: BarState) -> None:
        self.shown.append(state)
        self.moved.set()

    def update(self, state: BarState, text_changed: bool) -> None:
        self.updates.append((state, text_changed))
        self.moved.set()

    def handover(self) -> dict[str, Any]:
        return {"display_id": "d1", "bar": "b1", "label": "l1", "box": "x1"}


def test_a_quick_operation_shows_no_bar() -> None:
    view = RecordingView()
    bar = Progress("Snapshot s", view, after=10.0)
    bar.start()
    bar.step("saved files")
    bar.finish()
    assert not bar.shown and not view.shown and not view.updates


def test_a_slow_operation_shows_its_steps_and_its_end() -> None:
    view = RecordingView()
    bar = Progress("Snapshot s", view, after=0.0)
    bar.start()
    assert view.moved.wait(5)
    bar.step("checksumming")
    bar.finish()
    assert view.shown and view.shown[0].title == "Snapshot s"
    last, text_changed = view.updates[-1]
    assert last.done and last.ok and last.fraction == 1.0 and text_changed
    assert last.steps == ("checksumming",)
    assert any(changed and s.step == "checksumming" and not s.done for s, changed in view.updates)
    count = len(view.updates)
    time.sleep(3 * progress.TICK)
    assert len(view.updates) == count  # it stopped moving


def test_an_abandoned_bar_says_nothing_more() -> None:
    view = RecordingView()
    bar = Progress("Snapshot s", view, after=0.0)
    bar.start()
    assert view.moved.wait(5)
    bar.abandon()
    count = len(view.updates)
    bar.finish()  # a late finish of an abandoned bar moves nothing either
    time.sleep(2 * progress.TICK)
    assert len(view.updates) <= count + 1
    handed = bar.handover()
    assert handed["display_id"] == "d1" and handed["title"] == "Snapshot s"
    assert abs(handed["started"] - time.time()) < 60 and handed["after"] == 0.0


def test_a_display_view_names_its_models_before_they_exist() -> None:
    view = DisplayView(widgets=True)
    handed = view.handover()
    assert handed["bar"] == view.ids["bar"] and handed["box"] == view.ids["box"]
    assert WIDGET_VIEW not in view.bundle(BarState("R", 0.1, 0.4))
    text_only = DisplayView(widgets=False).handover()
    assert text_only["bar"] is None and text_only["display_id"]


class FakeSession:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], dict[str, Any], Any]] = []

    def send(
        self, stream: Any, kind: str, content: Any, parent: Any = None, ident: Any = None
    ) -> None:
        self.sent.append((kind, content, parent, ident))


class FakeKernel:
    def __init__(self) -> None:
        self.session = FakeSession()
        self.iopub_socket = object()


def test_the_process_that_finishes_a_restore_finishes_its_bar() -> None:
    kernel = FakeKernel()
    parent = {"header": {"msg_id": "restore-cell"}}
    handed = {"display_id": "d1", "bar": "b1", "label": "l1", "box": "x1",
              "title": "Restoring s", "started": time.time() - 2, "after": 0.3}  # fmt: skip
    finish_handed_over(kernel, {"name": "s", "parent": parent, "progress": handed})
    sent = {(kind, c.get("comm_id")): (c, p) for kind, c, p, _ in kernel.session.sent}
    bar, to = sent[("comm_msg", "b1")]
    assert bar["data"] == {"method": "update", "state": {"value": 1.0, "bar_style": "success"},
                           "buffer_paths": []} and to is parent  # fmt: skip
    label, _ = sent[("comm_msg", "l1")]
    assert label["data"]["state"]["value"].startswith("Restoring s: done in 2.")
    display, to = sent[("update_display_data", None)]
    assert display["transient"] == {"display_id": "d1"} and to is parent
    assert display["data"][WIDGET_VIEW]["model_id"] == "x1"
    assert display["data"]["text/plain"].startswith("[########################] Restoring s")
    # Kinds sent last: the display after the widgets' updates, all before the reply.
    assert kernel.session.sent[-1][0] == "update_display_data"


def test_a_bar_never_shown_is_left_alone_and_nothing_breaks_a_restore() -> None:
    kernel = FakeKernel()
    handed = {"display_id": "d1", "bar": "b1", "label": "l1", "box": None,
              "title": "Restoring s", "started": time.time(), "after": 5.0,
              "panel": "gone", "stale": {"m1": {"value": "stale"}}}  # fmt: skip
    finish_handed_over(kernel, {"name": "s", "parent": {}, "progress": handed})
    # The panel the restore was asked from is not in this process: it is told so.
    assert [(k, c["comm_id"]) for k, c, _, _ in kernel.session.sent] == [("comm_msg", "m1")]
    finish_handed_over(None, {"progress": "not a dict"})
    finish_handed_over(kernel, {"progress": {"started": "garbage"}})  # printed, not raised


# ---- the panel against a fake channel --------------------------------------------------


class FakeMagics:
    """What the panel asks of ContainerMagics, answering from a fake channel."""

    shell = None
    handoff = None

    def __init__(self) -> None:
        self.metas = [_meta("a", NOW - 600), _meta("b", NOW - 60, "a")]
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.commands: list[tuple[str, str, Any]] = []
        self.limits = {"memory": GIB, "cpus": 1.0, "pids": 256}
        self.autosave = True
        self.checkpoints = [_checkpoint(2, NOW - 120), _checkpoint(3, NOW - 60),
                            _checkpoint(5, NOW - 5, saving=True)]  # fmt: skip

    def _call(self, op: str, **args: Any) -> Any:
        self.calls.append((op, args))
        if op == "status":
            return {**_status(), "snapshots": len(self.metas), "limits": dict(self.limits),
                    "checkpoints": [c["name"] for c in self.checkpoints]}  # fmt: skip
        if op == "history":
            return {"checkpoints": list(self.checkpoints), "autosave": self.autosave}
        if op == "list":
            return _listing(*self.metas)
        if op == "delete":
            self.metas = [m for m in self.metas if m["name"] != args["name"]]
            return None
        if op == "limits":
            if args.get("memory") == "64G":
                raise UsageError(
                    "%container limits: memory limit 64G is above this kernel's ceiling of 1G"
                )
            self.limits["pids"] = int(args.get("pids") or self.limits["pids"])
            return dict(self.limits)
        raise AssertionError(f"unexpected op {op}")

    def _snapshot(self, line: str, view: Any = None) -> dict[str, Any] | None:
        self.commands.append(("snapshot", line, view))
        return _meta(line.split()[0] if line else "snap-1", NOW)

    def _restore(self, line: str, view: Any = None) -> None:
        self.commands.append(("restore", line, view))
        raise UsageError("%container restore: the snapshot's images are damaged")

    def _diff(self, line: str) -> None:
        self.commands.append(("diff", line, None))

    def _undo(self, line: str, view: Any = None) -> None:
        self.commands.append(("undo", line, view))
        if line == "--to 2":
            raise UsageError("%container undo: to before cell 2 has no checkpoint")

    def _autosave(self, line: str) -> None:
        self.commands.append(("autosave", line, None))
        self.autosave = line == "on"


@pytest.fixture
def panel() -> ContainerPanel:
    made = ContainerPanel(FakeMagics(), ipywidgets, clock=lambda: NOW, later=lambda d, f: None)
    made.refresh()
    return made


def _buttons(row: Any) -> dict[str, Any]:
    return {c.description: c for c in row.children if isinstance(c, ipywidgets.Button)}


def test_the_panel_shows_gauges_rows_and_limits(panel: ContainerPanel) -> None:
    assert panel.gauge_bars["memory"].value == 0.25
    assert panel.gauge_labels["memory"].value == "256M of 1G"
    assert panel.gauge_labels["cpu"].value == "measuring ..."
    first, second = panel.rows.children
    assert "a" in first.children[0].value and "└─ b" in second.children[0].value
    assert set(_buttons(second)) == {"Restore", "Delete", "Diff"}
    assert [f.value for f in panel.limit_fields.values()] == ["1G", "1", "256"]
    assert "latest snapshot a" in panel.heading.value
    data = panel._repr_mimebundle_()
    assert data[WIDGET_VIEW]["model_id"] == panel.model_id
    assert "└─ b" in data["text/plain"] and HINT in data["text/plain"]
    assert "<table>" in data["text/html"]
    assert panel.ticker.layout.display == "none" and panel.ticker.interval == 2000


def test_restore_button_acts_through_the_magic_and_shows_its_refusal(
    panel: ContainerPanel,
) -> None:
    _buttons(panel.rows.children[1])["Restore"].click()
    kind, line, view = panel.magics.commands[-1]  # type: ignore[attr-defined]
    assert (kind, line) == ("restore", "b") and isinstance(view, PanelView)
    handed = view.handover()
    assert handed["panel"] == panel.model_id and handed["bar"] == panel.bar.model_id
    # What the page shows if the restore ends in a process without this panel.
    stale = handed["stale"]
    assert "run <code>%container</code>" in stale[panel.message.model_id]["value"]
    assert stale[panel.ticker.model_id] == {"playing": False}
    assert stale[panel.rows.model_id] == {"children": []}
    assert "images are damaged" in panel.message.value and "color" in panel.message.value


def test_delete_asks_twice_and_diff_shows_in_the_panel(panel: ContainerPanel) -> None:
    delete = _buttons(panel.rows.children[1])["Delete"]
    delete.click()
    assert delete.description == "Really delete?" and "Click again" in panel.message.value
    assert ("delete", {"name": "b"}) not in panel.magics.calls  # type: ignore[attr-defined]
    delete.click()
    assert ("delete", {"name": "b"}) in panel.magics.calls  # type: ignore[attr-defined]
    assert len(panel.rows.children) == 1 and "Deleted snapshot b" in panel.message.value
    _buttons(panel.rows.children[0])["Diff"].click()
    assert panel.magics.commands[-1][:2] == ("diff", "a")  # type: ignore[attr-defined]


def test_limits_within_and_above_the_ceiling(panel: ContainerPanel) -> None:
    panel.set_limits()
    assert "No limit changed" in panel.message.value
    panel.limit_fields["pids"].value = "300"
    panel.set_limits()
    assert ("limits", {"pids": "300"}) in panel.magics.calls  # type: ignore[attr-defined]
    assert "pids 300" in panel.message.value
    panel.limit_fields["memory"].value = "64G"
    panel.set_limits()
    assert "above this kernel&#x27;s ceiling of 1G" in panel.message.value


def test_snapshot_button_sends_name_and_message(panel: ContainerPanel) -> None:
    class Handoff:
        def cell_origin(self) -> tuple[dict[str, Any], list[str]]:
            return {"header": {"msg_type": "comm_msg"}}, ["00"]

    panel.magics.handoff = Handoff()
    panel.name_field.value, panel.note_field.value = "before-fit", "a note"
    panel.snapshot_button.click()
    kind, line, view = panel.magics.commands[-1]  # type: ignore[attr-defined]
    assert (kind, line) == ("snapshot", "before-fit -m 'a note'") and isinstance(view, PanelView)
    assert "Snapshot before-fit taken" in panel.message.value and panel.name_field.value == ""


def test_ticks_refresh_the_gauges_at_most_once_per_interval(panel: ContainerPanel) -> None:
    magics: Any = panel.magics
    before = len(magics.calls)
    panel.ticker.value = 1
    panel.ticker.value = 0  # a tick queued behind the first
    statuses = [op for op, _ in magics.calls[before:] if op == "status"]
    assert len(statuses) == 1
    assert panel.gauge_labels["cpu"].value != "-"


def test_refresh_asks_again_and_restarts_the_ticker(panel: ContainerPanel) -> None:
    magics: Any = panel.magics
    magics.metas.append(_meta("c", NOW, "b"))
    kicks: list[float] = []
    panel._later = lambda delay, fn: kicks.append(delay)
    panel.ticker.value = 1  # a tick came once: the ticker is not kicked any more
    panel.refresh_button.click()
    assert len(panel.rows.children) == 3 and panel.ticker.playing and kicks


def test_a_restored_process_brings_its_panel_back(panel: ContainerPanel) -> None:
    later: list[Any] = []
    panel._later = lambda delay, fn: later.append(fn)
    finish_handed_over(None, {"kind": "restore", "name": "a", "parent": {}})
    assert "Restored to snapshot a" in panel.message.value
    for fn in later:
        fn()
    assert len(panel.rows.children) == 2
    finish_handed_over(None, {"kind": "reset", "parent": {}})
    assert "The kernel was reset" in panel.message.value


def test_timeline_points_name_the_cell_before_and_after() -> None:
    first, last = timeline_points([_checkpoint(2, NOW - 120), _checkpoint(5, NOW, True)], NOW)
    assert (first.label, first.before, first.after) == ("2", 2, 1)
    assert first.text == "before cell 2: after [1] x = 1, 2 min ago, 5M added"
    assert last.text.endswith("5M (saving) added")
    assert timeline_points([], NOW) == []


def test_the_timeline_shows_checkpoints_and_goes_back_to_the_chosen_one(
    panel: ContainerPanel,
) -> None:
    magics: Any = panel.magics
    assert panel.timeline.options == (("2", 2), ("3", 3), ("5", 5))
    assert panel.timeline.value == 5 and "before cell 5" in panel.point_label.value
    assert panel.timeline.tooltips[0].startswith("before cell 2: after [1] x = 1")
    assert panel.autosave_box.value and not panel.undo_button.disabled
    panel._show_status({**_status(), "current": "ckpt-k-4-ab12",
                        "checkpoints": ["ckpt-k-4-ab12"]})  # fmt: skip
    assert "automatic checkpoint" in panel.heading.value and "ckpt" not in panel.heading.value
    panel.timeline.value = 3
    assert "before cell 3: after [2] x = 2" in panel.point_label.value
    panel.undo_button.click()
    kind, line, view = magics.commands[-1]
    assert (kind, line) == ("undo", "--to 3") and isinstance(view, PanelView)
    stale = view.handover()["stale"]
    assert "the state before cell 3" in stale[panel.message.model_id]["value"]
    assert stale[panel.undo_button.model_id] == {"disabled": True}
    # A refusal shows in the panel, in red; the choice stays.
    panel.timeline.value = 2
    panel.undo_button.click()
    assert "has no checkpoint" in panel.message.value and "color" in panel.message.value
    assert panel.timeline.value == 2


def test_the_autosave_switch_acts_through_the_magic(panel: ContainerPanel) -> None:
    magics: Any = panel.magics
    panel.autosave_box.value = False
    assert magics.commands[-1][:2] == ("autosave", "off") and not magics.autosave
    assert "Autosave is off" in panel.message.value
    magics.checkpoints = []
    panel.refresh()  # set from the runtime's state: no command is sent
    assert magics.commands[-1][:2] == ("autosave", "off")
    assert panel.timeline.options == () and panel.undo_button.disabled
    assert "Autosave is off" in panel.point_label.value
    panel.autosave_box.value = True
    assert magics.commands[-1][:2] == ("autosave", "on")
    assert "No checkpoints yet" in panel.point_label.value


def test_a_tick_reads_the_history_only_when_the_checkpoints_changed(
    panel: ContainerPanel,
) -> None:
    magics: Any = panel.magics
    before = len(magics.calls)
    panel._last_tick = 0.0
    panel.ticker.value = 1
    assert "history" not in [op for op, _ in magics.calls[before:]]
    magics.checkpoints.append(_checkpoint(7, NOW))
    panel._last_tick = 0.0
    panel.ticker.value = 0
    assert "history" in [op for op, _ in magics.calls[before:]]
    assert panel.timeline.options[-1] == ("7", 7)


def test_an_undone_process_says_where_it_went_back_to(panel: ContainerPanel) -> None:
    panel._later = lambda delay, fn: None
    finish_handed_over(None, {"kind": "restore", "name": "ckpt-k-2-ab12", "undo": 3,
                              "parent": {}})  # fmt: skip
    assert "Back to the state before cell 3" in panel.message.value
