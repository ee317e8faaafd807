"""``%container`` alone: a panel of the kernel's container, in ipywidgets.

Gauges of memory, CPU and processes against the limits; the snapshots as a tree with
Restore, Delete and Diff buttons; a Snapshot button with a name; the automatic
checkpoints as a timeline, with an Autosave switch and a button that goes back to
the chosen one; the limits, which can be changed up to the kernelspec's ceiling.
Every button acts through the magic's own commands and control-channel calls.

The gauges refresh on the ticks of a hidden ``Play`` widget, which runs in the
browser: a page that does not show the panel sends no ticks, and costs the kernel
nothing. Where widgets do not render (nbconvert, a terminal) the panel's text
form shows the status and the snapshots.

A live restore replaces the kernel's process by the snapshot's, which knows only
the panels that existed when the snapshot was taken. Those come back to life
(:meth:`ContainerPanel.after_restore`); a newer panel on the page has no process
behind it any more, and the restore's hand-off tells it so (see ``progress.py``).

The figures (:func:`gauges`, :func:`snapshot_rows`, :func:`panel_text`) are plain
functions of the control server's answers; :class:`ContainerPanel` puts them in
widgets.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any, Protocol

from IPython.core.error import UsageError

from sandbox_kernel.display import Rich, format_size, relative_time, tree_order

from .channel import Interrupted
from .container import _cores, _limit_rows, snapshot_table, status_view
from .progress import PANELS, WIDGET_VIEW, BarState, publish, widget_view

#: Milliseconds between two ticks of the panel's gauges, while a page shows it.
REFRESH_MS = 2000
#: Seconds after the panel is shown at which its ticker is started again if no tick
#: came yet (a view sees a change of ``playing`` only once it exists).
KICKS = (0.5, 2.0, 5.0, 10.0)
#: What the text form ends with.
HINT = "`%container help` lists the commands; where widgets render, this is a panel."
GAUGES = ("memory", "cpu", "pids")


# ---- the figures ---------------------------------------------------------------------


@dataclass(frozen=True)
class Gauge:
    """One gauge: ``fraction`` of the limit in use (None when there is no limit or
    no figure yet) and its text."""

    name: str
    fraction: float | None
    text: str

    @property
    def bar_style(self) -> str:
        """The widget's ``bar_style``: green, then amber from 70 %, red from 90 %."""
        if self.fraction is None or self.fraction < 0.7:
            return "success"
        return "warning" if self.fraction < 0.9 else "danger"


#: CPU time used (seconds) at a moment (seconds, any clock): two make a rate.
CpuSample = tuple[float, float]


def gauges(
    status: Mapping[str, Any], previous: CpuSample | None, now: float
) -> tuple[list[Gauge], CpuSample | None]:
    """The memory, CPU and pids gauges of a ``status`` answer, and the CPU sample to
    pass as ``previous`` next time (``now`` in seconds, on the clock of ``previous``).
    CPU use is a rate, cores over the time since ``previous``; without one it is
    not known yet."""
    use, limits = status.get("usage") or {}, status["limits"]

    def share(name: str, used: float | None, limit: float | None, text: str) -> Gauge:
        if used is None:
            return Gauge(name, None, "-")
        if not limit:
            return Gauge(name, None, f"{text} (no limit)")
        return Gauge(name, min(used / limit, 1.0), f"{text} of {_limit(name, limit)}")

    memory = use.get("memory")
    cpu_seconds = use.get("cpu_seconds")
    sample = None if cpu_seconds is None else (float(cpu_seconds), now)
    if sample is None or previous is None or sample[1] <= previous[1]:
        cpu = Gauge("cpu", None, "measuring ..." if sample is not None else "-")
    else:
        cores = max(0.0, (sample[0] - previous[0]) / (sample[1] - previous[1]))
        cpu = share("cpu", cores, limits.get("cpus"), f"{cores:.2f} cores")
    pids = use.get("pids")
    return [
        share("memory", memory, limits.get("memory"), format_size(memory)),
        cpu,
        share("pids", pids, limits.get("pids"), str(pids)),
    ], sample


def _limit(name: str, limit: float) -> str:
    if name == "memory":
        return format_size(int(limit))
    if name == "cpu":
        return _cores(limit)
    return str(int(limit))


@dataclass(frozen=True)
class Row:
    """One snapshot as the panel lists it. ``label`` is its name under its parent's
    (``└─``, indented by depth); ``current`` for the one the kernel took or restored
    last (the next snapshot's parent)."""

    name: str
    label: str
    taken: str
    detail: str
    message: str
    current: bool = False


def snapshot_rows(
    metas: Sequence[Mapping[str, Any]], now: float, current: str | None = None
) -> list[Row]:
    """The snapshots as a tree of parents, oldest first among siblings, with times
    relative to ``now`` (seconds since the epoch)."""
    rows = []
    for depth, m in tree_order(metas):
        label = ("   " * (depth - 1) + "└─ " if depth else "") + m["name"]
        detail = (
            f"{m['mode']}, memory {format_size(m['memory_bytes'])}, "
            f"files {format_size(m['file_bytes'])}"
        )
        rows.append(
            Row(m["name"], label, relative_time(m["created"], now), detail,
                m.get("message") or "", m["name"] == current)
        )  # fmt: skip
    return rows


@dataclass(frozen=True)
class Point:
    """One automatic checkpoint on the panel's timeline: the state before cell
    ``before``, after cell ``after`` whose first line is ``line``."""

    before: int
    after: int
    line: str
    taken: str
    added: str

    @property
    def label(self) -> str:
        return str(self.before)

    @property
    def text(self) -> str:
        return (
            f"before cell {self.before}: after [{self.after}] {self.line}, "
            f"{self.taken}, {self.added} added"
        )


def timeline_points(checkpoints: Sequence[Mapping[str, Any]], now: float) -> list[Point]:
    """The checkpoints of ``%container history``, oldest first, as timeline points
    with times relative to ``now``."""
    return [
        Point(int(c["next"]), int(c["cell"]), str(c["line"]), relative_time(c["time"], now),
              format_size(c["added_bytes"]) + (" (saving)" if c.get("saving") else ""))
        for c in checkpoints
    ]  # fmt: skip


def _usage(store: Mapping[str, Any]) -> str:
    return (
        f"Your snapshots: {store['count']} of {store['quota_count']}, "
        f"{format_size(store['bytes'])} of {format_size(store['quota_bytes'])}."
    )


def panel_view(status: Mapping[str, Any], listing: Mapping[str, Any], now: float) -> Rich:
    """The panel as text and HTML, for where widgets do not render: the status, the
    snapshots, and how to list the commands."""
    state = status_view(dict(status))
    metas, usage = listing["snapshots"], _usage(listing["store"])
    if metas:
        snaps = snapshot_table(metas, usage, now)
        text, html = repr(snaps), snaps._repr_html_()
    else:
        text = f"No snapshots yet: `%container snapshot NAME` takes one.\n{usage}"
        html = f"<p>{escape(text)}</p>"
    return Rich(
        f"{state!r}\n\n{text}\n\n{HINT}",
        f"{state._repr_html_()}{html}<p>{escape(HINT)}</p>",
    )


# ---- the widgets ---------------------------------------------------------------------


class Commands(Protocol):
    """What the panel asks of the ``%container`` magic (``ContainerMagics``)."""

    shell: Any
    handoff: Any

    def _call(self, op: str, **args: Any) -> Any: ...

    def _snapshot(self, line: str, view: Any = None) -> dict[str, Any] | None: ...

    def _restore(self, line: str, view: Any = None) -> None: ...

    def _diff(self, line: str) -> None: ...

    def _undo(self, line: str, view: Any = None) -> None: ...

    def _autosave(self, line: str) -> None: ...


def _io_loop_later(shell: Any) -> Callable[[float, Callable[[], None]], None]:
    """Run a function on the kernel's main loop after a delay (between requests, like
    the widgets' own messages)."""

    def later(delay: float, fn: Callable[[], None]) -> None:
        kernel = getattr(shell, "kernel", None)
        loop = getattr(kernel, "io_loop", None)
        if loop is not None:
            loop.call_later(delay, fn)

    return later


class ContainerPanel:
    """The panel ``%container`` shows; ``widgets`` is the ipywidgets module.

    Made by the magic, which displays it: its display has the widget view, the text
    form and an HTML form (:meth:`_repr_mimebundle_`). ``clock`` is the time in
    seconds since the epoch; ``later(delay, fn)`` runs ``fn`` on the kernel's loop
    (both replaceable by tests).
    """

    def __init__(
        self,
        magics: Commands,
        widgets: Any,
        *,
        clock: Callable[[], float] = time.time,
        later: Callable[[float, Callable[[], None]], None] | None = None,
    ) -> None:
        self.magics = magics
        self.w = w = widgets
        self._clock = clock
        self._later = later if later is not None else _io_loop_later(magics.shell)
        self._cpu: CpuSample | None = None
        self._metas: list[dict[str, Any]] | None = None
        self._current: str | None = None
        self._limits: dict[str, str] = {}
        self._last_tick = 0.0
        self._ticks = 0
        self._confirm: str | None = None  # the snapshot whose Delete was clicked once
        self.status: dict[str, Any] | None = None
        self.listing: dict[str, Any] | None = None

        self.heading = w.HTML("<b>Container</b>")
        # The ticker starts only when the kernel says so after the page shows it: a
        # page reloaded later shows a still ticker until this is clicked.
        self.refresh_button = w.Button(description="Refresh", icon="refresh",
                                       layout=w.Layout(width="100px"))  # fmt: skip
        self.refresh_button.on_click(lambda _: self.restart())
        self.gauge_bars = {
            name: w.FloatProgress(min=0.0, max=1.0, value=0.0, description=name,
                                  layout=w.Layout(width="260px"))
            for name in GAUGES
        }  # fmt: skip
        self.gauge_labels = {name: w.Label("-") for name in GAUGES}
        self.ticker = w.Play(
            value=0, min=0, max=1, step=1, interval=REFRESH_MS, repeat=True,
            show_repeat=False, playing=False, layout=w.Layout(display="none"),
        )  # fmt: skip
        self.ticker.observe(self._on_tick, "value")
        self.name_field = w.Text(placeholder="name (optional)", layout=w.Layout(width="180px"))
        self.note_field = w.Text(placeholder="message (optional)", layout=w.Layout(width="240px"))
        self.snapshot_button = w.Button(description="Snapshot", icon="camera")
        self.snapshot_button.on_click(lambda _: self.take_snapshot())
        self.rows = w.VBox()
        self._history: list[str] | None = None  # the checkpoints the timeline shows
        self._quiet = False  # the Autosave switch is being set from the runtime's state
        self.autosave_box = w.Checkbox(value=False, description="Autosave", indent=False,
                                       layout=w.Layout(width="110px"))  # fmt: skip
        self.autosave_box.observe(self._on_autosave, "value")
        self.timeline = w.ToggleButtons(options=[], tooltips=[],
                                        style={"button_width": "40px"})  # fmt: skip
        self.timeline.observe(self._on_point, "value")
        self.point_label = w.Label("")
        self.undo_button = w.Button(description="Go back here", icon="undo", disabled=True)
        self.undo_button.on_click(lambda _: self.undo())
        self._points: dict[int, Point] = {}
        self.limit_fields = {
            name: w.Text(description=name, layout=w.Layout(width="180px"))
            for name in ("memory", "cpus", "pids")
        }
        self.limits_button = w.Button(description="Set limits")
        self.limits_button.on_click(lambda _: self.set_limits())
        self.bar = w.FloatProgress(min=0.0, max=1.0, value=0.0,
                                   layout=w.Layout(width="260px", visibility="hidden"))  # fmt: skip
        self.bar_label = w.Label("")
        self.message = w.HTML("")
        self.output = w.Output()
        gauges_box = w.VBox([
            w.HBox([self.gauge_bars[name], self.gauge_labels[name]]) for name in GAUGES
        ])  # fmt: skip
        self.box = w.VBox([
            w.HBox([self.heading, self.refresh_button]), gauges_box, self.ticker,
            w.HTML("<b>Snapshots</b>"),
            w.HBox([self.name_field, self.note_field, self.snapshot_button]),
            self.rows,
            w.HTML("<b>Checkpoints</b> (before each cell)"),
            w.HBox([self.autosave_box, self.point_label]),
            self.timeline, self.undo_button,
            w.HTML("<b>Limits</b>"),
            w.HBox([*self.limit_fields.values(), self.limits_button]),
            w.HBox([self.bar, self.bar_label]),
            self.message, self.output,
        ])  # fmt: skip
        PANELS.add(self)

    @property
    def model_id(self) -> str:
        """The id of the panel's outer widget model."""
        model_id: str = self.box.model_id
        return model_id

    # ---- showing -------------------------------------------------------------------

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """The widget view, and the text and HTML forms of the status and snapshots."""
        data: dict[str, Any] = {WIDGET_VIEW: widget_view(self.model_id)}
        if self.status is not None and self.listing is not None:
            view = panel_view(self.status, self.listing, self._clock())
            data["text/plain"], data["text/html"] = repr(view), view._repr_html_()
        else:
            data["text/plain"] = f"%container panel\n{HINT}"
        return data

    def show(self) -> None:
        """Fill the panel, display it in the running cell, and start its ticker."""
        self.refresh()
        publish(self)
        self._kick(0)

    def _kick(self, attempt: int) -> None:
        """Start the ticker in the browser: a ``Play`` view starts ticking when it sees
        ``playing`` change to true, so the change must come after the view exists,
        which the kernel cannot see; it tries a few times until a tick comes."""
        if self._ticks or attempt > len(KICKS):
            return
        if attempt:
            self.ticker.playing = False
            self.ticker.playing = True
        if attempt < len(KICKS):
            self._later(KICKS[attempt], lambda: self._kick(attempt + 1))

    # ---- refreshing ----------------------------------------------------------------

    def restart(self) -> None:
        """The Refresh button: refresh now, and start the ticker again."""
        self.say("")
        self.refresh()
        self._ticks = 0
        self._kick(1)

    def refresh(self) -> None:
        """Ask the runtime for the status and the snapshots, and show them."""
        try:
            status = self.magics._call("status")
            listing = self.magics._call("list")
            history = self.magics._call("history")
        except (UsageError, Interrupted) as err:
            self.say(str(err), error=True)
            return
        self._show_status(status)
        self._show_snapshots(listing, force=True)
        self._show_timeline(history)
        self._show_limits(status["limits"])

    def _on_tick(self, change: Any) -> None:
        """A tick of the browser's ticker: refresh the gauges (and the snapshots,
        when their number changed or every 15 ticks, for the relative times).
        Ticks queued while a cell ran arrive together: only one of them refreshes."""
        self._ticks += 1
        now = time.monotonic()
        if now - self._last_tick < REFRESH_MS / 2000:
            return
        self._last_tick = now
        try:
            status = self.magics._call("status")
            stale = self._metas is None or status["snapshots"] != len(self._metas)
            listing = self.magics._call("list") if stale or self._ticks % 15 == 0 else None
            moved = status.get("checkpoints") != self._history or self._ticks % 15 == 0
            history = self.magics._call("history") if moved else None
        except (UsageError, Interrupted) as err:
            self.ticker.playing = False
            self.say(f"{err} (the gauges stopped; run %container again)", error=True)
            return
        self._show_status(status)
        if listing is not None:
            self._show_snapshots(listing)
        if history is not None:
            self._show_timeline(history)

    def _show_status(self, status: dict[str, Any]) -> None:
        self.status = status
        figures, self._cpu = gauges(status, self._cpu, time.monotonic())
        for gauge in figures:
            bar = self.gauge_bars[gauge.name]
            bar.value = gauge.fraction or 0.0
            bar.bar_style = gauge.bar_style
            self.gauge_labels[gauge.name].value = gauge.text
        current = status.get("current")
        if current and current in (status.get("checkpoints") or ()):
            origin = "latest: an automatic checkpoint (see the timeline)"
        elif current:
            origin = f"latest snapshot {current}"
        else:
            origin = "no snapshot taken or restored yet"
        self.heading.value = f"<b>Container</b> &middot; {escape(origin)}"

    def _show_snapshots(self, listing: dict[str, Any], force: bool = False) -> None:
        """Show the snapshots; the rows' widgets are made again only when the
        snapshots or the current one changed (else only their times move)."""
        self.listing = listing
        metas = listing["snapshots"]
        current = (self.status or {}).get("current")
        rows = snapshot_rows(metas, self._clock(), current)
        same = (
            not force and self._metas is not None and current == self._current
            and [m["name"] for m in metas] == [m["name"] for m in self._metas]
        )  # fmt: skip
        self._metas, self._current = metas, current
        if same:
            for row, box in zip(rows, self.rows.children if rows else (), strict=True):
                box.children[1].value = row.taken
            return
        old = self.rows.children
        self.rows.children = [self._row(row) for row in rows] or [
            self.w.Label(f"No snapshots yet. {_usage(listing['store'])}")
        ]
        for box in old:  # the frontend's models of the old rows go too
            for child in box.children:
                child.close()
            box.close()

    def _show_timeline(self, history: dict[str, Any]) -> None:
        """Show the checkpoints as a row of cell numbers (the states before those
        cells), the newest chosen, and the Autosave switch as the runtime has it."""
        self._quiet = True
        try:
            self.autosave_box.value = bool(history.get("autosave"))
        finally:
            self._quiet = False
        points = timeline_points(history["checkpoints"], self._clock())
        self._history = [c["name"] for c in history["checkpoints"]]
        self._points = {p.before: p for p in points}
        chosen = self.timeline.value
        self.timeline.options = [(p.label, p.before) for p in points]
        self.timeline.tooltips = [p.text for p in points]
        if points:
            self.timeline.value = chosen if chosen in self._points else points[-1].before
        self._on_point(None)

    def _on_point(self, change: Any) -> None:
        """A point of the timeline chosen: say what it is, and offer to go back."""
        point = self._points.get(self.timeline.value) if self.timeline.value is not None else None
        self.undo_button.disabled = point is None
        if point is not None:
            self.point_label.value = point.text
        elif self.autosave_box.value:
            self.point_label.value = "No checkpoints yet: one is taken when a cell ends."
        else:
            self.point_label.value = "Autosave is off: no checkpoints are taken."

    def _row(self, row: Row) -> Any:
        w = self.w
        mark = " (latest)" if row.current else ""
        label = w.HTML(
            f"<code style='white-space: pre'>{escape(row.label)}</code>{escape(mark)}",
            layout=w.Layout(min_width="160px"),
        )
        restore = w.Button(description="Restore", layout=w.Layout(width="80px"))
        restore.on_click(lambda _: self.restore(row.name))
        delete = w.Button(description="Delete", layout=w.Layout(width="120px"))
        delete.on_click(lambda button: self.delete(row.name, button))
        diff = w.Button(description="Diff", layout=w.Layout(width="60px"))
        diff.on_click(lambda _: self.diff(row.name))
        details = w.Label(f"{row.detail}{', ' + row.message if row.message else ''}")
        return w.HBox([label, w.Label(row.taken, layout=w.Layout(width="90px")), details,
                       restore, delete, diff])  # fmt: skip

    def _show_limits(self, limits: dict[str, Any]) -> None:
        values = dict(_limit_rows(limits))
        self._limits = {
            "memory": values["memory"] if limits.get("memory") else "",
            "cpus": f"{limits['cpus']:g}" if limits.get("cpus") else "",
            "pids": str(limits["pids"]) if limits.get("pids") else "",
        }
        for name, field in self.limit_fields.items():
            field.value = self._limits[name]
            field.placeholder = "unlimited"

    def say(self, text: str, error: bool = False) -> None:
        """Show one line under the panel's buttons (in red for an error)."""
        style = "color: var(--jp-error-color1, #d32f2f)" if error else ""
        self.message.value = f"<span style='{style}'>{escape(text)}</span>"

    # ---- the buttons ---------------------------------------------------------------

    def _act(self, busy: str, action: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``action`` (a magic's command), with what it prints in the panel's
        output area and its refusal in the panel's message line: (whether it ran
        through, its result)."""
        self.say(busy)
        self._confirm = None
        with self.output:
            self.output.clear_output()
            try:
                return True, action()
            except (UsageError, Interrupted) as err:
                self.say(str(err), error=True)
                return False, None

    def take_snapshot(self) -> None:
        """The Snapshot button: ``%container snapshot [NAME] [-m MESSAGE]``."""
        name, note = self.name_field.value.strip(), self.note_field.value.strip()
        words = ([name] if name else []) + (["-m", note] if note else [])
        title = f"Snapshot {name}" if name else "Snapshot"
        origin = self.magics.handoff.cell_origin()
        line = shlex.join(words)
        done, meta = self._act(f"{title} ...", lambda: self.magics._snapshot(line, PanelView(self)))
        if not done:
            return
        if meta is None:
            # This process is a restore of the snapshot this click took: if a cell
            # asked for the restore, it waits for a reply this click never sends.
            _answer_restore_cell(self.magics.shell, *origin)
            return
        self.say(f"Snapshot {meta.get('name', name)} taken.")
        self.name_field.value = self.note_field.value = ""
        self.refresh()

    def restore(self, name: str) -> None:
        """A Restore button: ``%container restore NAME``. A live restore ends in the
        snapshot's process; what this panel shows then is in :meth:`_stale`."""
        view = PanelView(self, self._stale(name))
        done, _ = self._act(
            f"Restoring {name} ...", lambda: self.magics._restore(shlex.quote(name), view)
        )
        # Reached when the restore failed (the panel says why), or brought back the
        # files alone (the kernel restarts).
        if done:
            self.refresh()

    def undo(self) -> None:
        """The Go back here button: ``%container undo --to CELL`` for the chosen point."""
        before = self.timeline.value
        if before is None:
            self.say("Choose a checkpoint on the timeline first.")
            return
        done, _ = self._act(
            f"Going back to before cell {before} ...",
            lambda: self.magics._undo(
                f"--to {int(before)}",
                PanelView(self, self._stale(f"the state before cell {before}")),
            ),
        )
        if done:
            self.refresh()

    def _on_autosave(self, change: Any) -> None:
        """The Autosave switch: ``%container autosave on|off``."""
        if self._quiet:
            return
        state = "on" if change["new"] else "off"
        done, _ = self._act(f"Autosave {state} ...", lambda: self.magics._autosave(state))
        if done:
            self.say(f"Autosave is {state}.")
        self.refresh()

    def _stale(self, name: str) -> dict[str, dict[str, Any]]:
        """How this panel must look after a restore to a process that does not know it
        (sent by model id from there): it says so, and its buttons and ticker stop.
        ``name`` is a snapshot's, or what an undo went back to."""
        what = name if name.startswith("the state") else f"snapshot {name}"
        text = (
            f"Restored to {what}. The kernel's process is now the one saved then, "
            "which does not know this panel: run <code>%container</code> for a live one."
        )
        return {
            self.message.model_id: {"value": f"<b>{text}</b>"},
            self.ticker.model_id: {"playing": False},
            self.rows.model_id: {"children": []},
            self.snapshot_button.model_id: {"disabled": True},
            self.limits_button.model_id: {"disabled": True},
            self.timeline.model_id: {"disabled": True},
            self.undo_button.model_id: {"disabled": True},
            self.autosave_box.model_id: {"disabled": True},
        }

    def delete(self, name: str, button: Any = None) -> None:
        """A Delete button: asks again, then ``%container delete NAME``."""
        if self._confirm != name:
            self._confirm = name
            if button is not None:
                button.description, button.button_style = "Really delete?", "danger"
            self.say(f"Click again to delete snapshot {name}.")
            return
        done, _ = self._act(f"Deleting {name} ...", lambda: self.magics._call("delete", name=name))
        if done:
            self.say(f"Deleted snapshot {name}.")
            self.refresh()

    def diff(self, name: str) -> None:
        """A Diff button: ``%container diff NAME``, shown in the panel's output area."""
        self._act(f"Files changed since {name}:", lambda: self.magics._diff(shlex.quote(name)))

    def set_limits(self) -> None:
        """The Set limits button: change the limits whose fields changed (the control
        server refuses above the kernelspec's ceiling; the panel shows why)."""
        changes = {
            name: field.value.strip()
            for name, field in self.limit_fields.items()
            if field.value.strip() != self._limits.get(name, "")
        }
        if not changes:
            self.say("No limit changed: edit a field first.")
            return
        done, limits = self._act(
            "Setting limits ...", lambda: self.magics._call("limits", **changes)
        )
        if not done:
            return
        self.say("Limits: " + ", ".join(f"{k} {v}" for k, v in _limit_rows(limits)) + ".")
        self._show_limits(limits)

    # ---- after a restore -----------------------------------------------------------

    def after_restore(self, info: dict[str, Any]) -> None:
        """This process was just restored, and it has this panel (the panel existed
        when the snapshot was taken): the page's models of it moved on meanwhile, so
        send them this process's state, and refresh. Called by
        :func:`~sandbox_kernel.magics.progress.finish_handed_over`."""
        self._confirm, self._metas, self._cpu, self._ticks = None, None, None, 0
        self._history = None
        for widget in _descendants(self.box):
            widget.send_state()
        self.bar.layout.visibility = "hidden"
        if info.get("undo") is not None:
            self.say(f"Back to the state before cell {info['undo']}.")
        elif info.get("kind") == "restore":
            self.say(f"Restored to snapshot {info.get('name')}.")
        else:
            self.say("The kernel was reset.")
        self._later(0.0, self.refresh)
        self._later(0.5, lambda: self._kick(1))


def _descendants(widget: Any) -> list[Any]:
    """``widget`` and every widget inside it (boxes' children, and their layouts)."""
    found = [widget]
    if getattr(widget, "layout", None) is not None:
        found.append(widget.layout)
    for child in getattr(widget, "children", ()):
        found.extend(_descendants(child))
    return found


class PanelView:
    """A snapshot's or restore's bar inside the panel (see ``progress.View``);
    ``stale`` is what the panel shows if the restore ends in a process without it."""

    def __init__(self, panel: ContainerPanel, stale: dict[str, dict[str, Any]] | None = None):
        self.panel = panel
        self.stale = stale or {}

    def show(self, state: BarState) -> None:
        self.panel.bar.layout.visibility = "visible"
        self.update(state, True)

    def update(self, state: BarState, text_changed: bool) -> None:
        self.panel.bar.value = state.fraction
        self.panel.bar.bar_style = state.bar_style
        self.panel.bar_label.value = state.line

    def handover(self) -> dict[str, Any]:
        return {
            "display_id": None,
            "bar": self.panel.bar.model_id,
            "label": self.panel.bar_label.model_id,
            "panel": self.panel.model_id,
            "stale": self.stale,
        }


def _answer_restore_cell(shell: Any, parent: dict[str, Any], idents: list[str]) -> None:
    """Send the reply of a cell that restored this process, when the snapshot was
    taken by a panel's button rather than by a cell.

    The restore hand-off (``RestoreHandoff.finish_restore``) makes this process's
    reply to its snapshot's request the reply to the restoring request; a click
    gets no reply, so a restoring cell would wait forever. This sends one as the
    click's, which the hand-off redirects. Nothing when a click asked for the
    restore (a click waits for no reply).
    """
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return
    asking = kernel.get_parent("shell").get("header", {}).get("msg_type")
    if asking != "execute_request":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # As ipykernel's own dispatch_shell picks the socket for the main shell.
    if getattr(kernel, "_supports_kernel_subshells", False):
        stream = kernel.shell_channel_thread.manager.get_subshell_to_shell_channel_socket(None)
    else:
        stream = kernel.shell_stream
    content = {
        "status": "ok", "execution_count": shell.execution_count - 1,
        "user_expressions": {}, "payload": [],
    }  # fmt: skip
    ident = [bytes.fromhex(i) for i in idents]
    kernel.session.send(stream, "execute_reply", content, parent=parent, ident=ident)


def open_panel(magics: Commands) -> None:
    """Show the panel, or its text form where ipywidgets cannot be imported. Called by
    ``%container`` with no command."""
    try:
        import ipywidgets  # type: ignore[import-untyped]
    except ImportError:
        publish(panel_view(magics._call("status"), magics._call("list"), time.time()))
        return
    ContainerPanel(magics, ipywidgets).show()
