"""Progress bars of snapshots and restores that take a while.

A snapshot or restore that runs over :data:`PROGRESS_AFTER` seconds shows a bar: an
ipywidgets bar where the frontend renders widgets, its text where it does not (a
terminal, nbclient), both in one display that is updated in place through its
``display_id``. Quick ones show nothing.

A restore ends in another process (the snapshot's own, or a new one on its files),
so the process that showed the bar cannot finish it. :meth:`Progress.handover`
describes the bar for the restore request's args; the control server hands the
args back to the process that finishes the restore (the ``resume`` op), and
:func:`finish_handed_over`, called there by the restore hand-off, shows the bar
done. It addresses the frontend's widget models by id, since the new process has
no objects for them.

Standard library only at import: ipywidgets is imported when a bar is shown.
"""

from __future__ import annotations

import contextvars
import importlib.util
import math
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .handoff import _start_time

#: Seconds a snapshot or restore runs before its bar is shown.
PROGRESS_AFTER = 0.3
#: Seconds between two moves of a shown bar.
TICK = 0.25
#: Characters of the text bar.
WIDTH = 24
#: The MIME type of a widget's view in a display.
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def publish(obj: Any, display_id: str | None = None, update: bool = False) -> None:
    """Display ``obj`` in the running cell's output (raw data when a dict), or update
    the display ``display_id``: IPython's ``display`` and ``update_display``."""
    from IPython import display

    send: Any = display.update_display if update else display.display
    if display_id is None:
        send(obj)
    else:
        send(obj, raw=isinstance(obj, dict), display_id=display_id)


def widget_view(model_id: str) -> dict[str, Any]:
    """A display's data for the view of widget model ``model_id``."""
    return {"version_major": 2, "version_minor": 0, "model_id": model_id}


@dataclass(frozen=True)
class BarState:
    """What a bar shows at one moment. ``fraction`` is 0 to 1; ``elapsed`` is in
    seconds; ``steps`` are the runtime's lines so far, oldest first."""

    title: str
    fraction: float
    elapsed: float
    steps: tuple[str, ...] = ()
    done: bool = False
    ok: bool = True

    @property
    def step(self) -> str:
        """The step now under way ("" before the runtime names one)."""
        return self.steps[-1] if self.steps else ""

    @property
    def line(self) -> str:
        """One line for a label: the title, the step or the outcome, the time."""
        if self.done and self.ok:
            return f"{self.title}: done in {self.elapsed:.2f} s"
        if self.done:
            return f"{self.title}: failed after {self.elapsed:.1f} s"
        step = f": {self.step}" if self.step else " ..."
        return f"{self.title}{step} ({self.elapsed:.1f} s)"

    @property
    def bar_style(self) -> str:
        """The widget's ``bar_style``: success or danger once done, else info."""
        if not self.done:
            return "info"
        return "success" if self.ok else "danger"

    @property
    def text(self) -> str:
        """The text form: a bar of ``#`` with :attr:`line`, then each step indented."""
        filled = round(self.fraction * WIDTH)
        bar = "[" + "#" * filled + "." * (WIDTH - filled) + "]"
        return "\n".join([f"{bar} {self.line}", *(f"  {s}" for s in self.steps)])


def estimate(steps: int, in_step: float, expected: float) -> float:
    """How far along (0 to 1) work is that has finished ``steps`` named steps and
    has spent ``in_step`` seconds in the current one, which is ``expected`` seconds
    long. An estimate, and never reaching the end before it is done: step ``k``
    spans from ``1 - 1/2**k`` toward ``1 - 1/2**(k+1)``, approached by time."""
    low, high = 1 - 0.5**steps, 1 - 0.5 ** (steps + 1)
    creep = 1 - math.exp(-in_step / max(expected, 0.01))
    return low + (high - low) * creep


class View(Protocol):
    """Where a :class:`Progress` shows itself: a display in the output (see
    :class:`DisplayView`) or a bar inside the ``%container`` panel."""

    def show(self, state: BarState) -> None:
        """Show the bar for the first time."""

    def update(self, state: BarState, text_changed: bool) -> None:
        """Show ``state``; ``text_changed`` when more than the fraction and time moved."""

    def handover(self) -> dict[str, Any]:
        """What another process needs to show this bar done: ids of its display and
        widget models (see :func:`finish_handed_over`)."""


class Progress:
    """The bar of one snapshot or restore, made by the magic's command.

    :meth:`start` starts a daemon thread that shows the bar after ``after``
    seconds and moves it every :data:`TICK` seconds (the magic's own thread is
    blocked on the control channel meanwhile); :meth:`step` takes each line of
    progress the runtime sends; :meth:`finish` shows the outcome. In a process
    restored from a snapshot taken during the snapshot this bar belongs to, the
    bar is the other timeline's: :meth:`abandon` stops it without a word (and the
    thread stops by itself when it sees the process was restored).
    """

    def __init__(
        self,
        title: str,
        view: View,
        *,
        expected: float = 1.0,
        after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.title = title
        self.view = view
        #: Seconds each step is expected to take (the bar's pace, not a promise).
        self.expected = expected
        #: Seconds before the bar shows (None: :data:`PROGRESS_AFTER`, read now, so that
        #: a test can change it in a running kernel).
        self.after = PROGRESS_AFTER if after is None else after
        self._clock = clock
        self._started = clock()
        self._wall_started = time.time()
        self._step_started = self._started
        self._steps: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._shown = False
        self._outcome: bool | None = None
        self._identity = _start_time()

    @property
    def shown(self) -> bool:
        """Whether the bar has been shown."""
        return self._shown

    def state(self) -> BarState:
        """The bar's state now."""
        now = self._clock()
        done = self._outcome is not None
        fraction = (
            1.0
            if self._outcome
            else estimate(len(self._steps), now - self._step_started, self.expected)
        )
        return BarState(
            self.title, fraction, now - self._started, tuple(self._steps), done,
            self._outcome is not False,
        )  # fmt: skip

    def start(self) -> None:
        """Start the thread that shows and moves the bar. Its display goes to the
        running cell (the thread runs in a copy of the caller's context, where
        ipykernel keeps the cell's parent header)."""
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._run,), daemon=True).start()

    def _run(self) -> None:
        if self._stop.wait(self.after):
            return
        while not self._stop.is_set():
            if _start_time() != self._identity:
                return  # restored from a snapshot taken meanwhile: not this bar's process
            self._refresh(text_changed=False)
            self._stop.wait(TICK)

    def _refresh(self, text_changed: bool) -> None:
        with self._lock:
            if self._stop.is_set() and self._outcome is None:
                return
            state = self.state()
            if not self._shown:
                self._shown = True
                self.view.show(state)
            else:
                self.view.update(state, text_changed)

    def step(self, text: str) -> None:
        """A line of progress from the runtime: the next step starts. Called by the
        control channel's ``on_progress``."""
        with self._lock:
            self._steps.append(text)
            self._step_started = self._clock()
        if self._shown:
            self._refresh(text_changed=True)

    def finish(self, ok: bool = True) -> None:
        """The work ended (``ok``, or failed): a shown bar shows it; one never shown
        stays unshown."""
        self._stop.set()
        self._outcome = ok
        if self._shown:
            self._refresh(text_changed=True)

    def abandon(self) -> None:
        """Stop, showing nothing more (see the class's docstring)."""
        self._stop.set()

    def handover(self) -> dict[str, Any]:
        """The bar for a restore request's args, for :func:`finish_handed_over` in the
        process that finishes the restore: the view's ids, the title, and when the
        restore started (seconds since the epoch)."""
        return {
            **self.view.handover(), "title": self.title, "started": self._wall_started,
            "after": self.after,
        }  # fmt: skip


class DisplayView:
    """A bar in the cell's output: one display with a widget view (with
    ``widgets``, where ipywidgets can be imported) and its text, updated in place.

    The widgets are made (and ipywidgets imported) only when the bar is first
    shown, with model ids chosen here, so that :meth:`handover` can name them
    before they exist.
    """

    def __init__(self, widgets: bool) -> None:
        self.widgets = widgets
        self.display_id = uuid.uuid4().hex
        self.ids = {part: uuid.uuid4().hex for part in ("box", "bar", "label")}
        self._bar: Any = None
        self._label: Any = None

    def bundle(self, state: BarState) -> dict[str, Any]:
        """The display's data: the text, and the widget view once the widgets exist."""
        data: dict[str, Any] = {"text/plain": state.text}
        if self._bar is not None:
            data[WIDGET_VIEW] = widget_view(self.ids["box"])
        return data

    def show(self, state: BarState) -> None:
        if self.widgets:
            import ipywidgets as w  # type: ignore[import-untyped]

            self._bar = w.FloatProgress(
                model_id=self.ids["bar"], min=0.0, max=1.0, value=state.fraction,
                bar_style=state.bar_style, layout=w.Layout(width="240px"),
            )  # fmt: skip
            self._label = w.Label(model_id=self.ids["label"], value=state.line)
            w.HBox([self._bar, self._label], model_id=self.ids["box"])
        publish(self.bundle(state), display_id=self.display_id)

    def update(self, state: BarState, text_changed: bool) -> None:
        if self._bar is not None:
            self._bar.value = state.fraction
            self._bar.bar_style = state.bar_style
            self._label.value = state.line
        # The text only at a new step or the end: each update re-renders the output.
        if text_changed:
            publish(self.bundle(state), display_id=self.display_id, update=True)

    def handover(self) -> dict[str, Any]:
        return {
            "display_id": self.display_id,
            "box": self.ids["box"] if self.widgets else None,
            "bar": self.ids["bar"] if self.widgets else None,
            "label": self.ids["label"] if self.widgets else None,
        }


def widgets_available() -> bool:
    """Whether ipywidgets can be imported (without importing it: that takes a while)."""
    return "ipywidgets" in sys.modules or importlib.util.find_spec("ipywidgets") is not None


def displayed(title: str, *, expected: float = 1.0) -> Progress:
    """A bar in the running cell's output: a widget and its text where ipywidgets can
    be imported, the text alone where not."""
    return Progress(title, DisplayView(widgets_available()), expected=expected)


# ---- after a restore, in the process that finishes it -----------------------------


#: The live ``%container`` panels of this process (see ``panel.py``), told of each
#: restore it finishes: each has a ``model_id`` and an ``after_restore(info)`` method.
PANELS: weakref.WeakSet[Any] = weakref.WeakSet()


def finish_handed_over(kernel: Any, info: dict[str, Any]) -> None:
    """In the process that finishes a restore: show the restore's bar done and tell
    this process's panels. Called by the restore hand-off with the ``resume`` info.

    ``info["progress"]`` is what :meth:`Progress.handover` gave to the restore
    request, if anything; its widgets (and a panel's, when the restore was asked
    from a panel this process does not have) are updated by id, and its display is
    replaced by its final text, all as output of the asking request. Never raises:
    a bar is not worth a failed restore.
    """
    try:
        _finish_handed_over(kernel, info)
    except Exception as err:  # see the docstring
        print(f"%container: could not finish the progress bar ({err!r})", file=sys.__stderr__)


def _finish_handed_over(kernel: Any, info: dict[str, Any]) -> None:
    live = {panel.model_id: panel for panel in list(PANELS)}
    for panel in live.values():
        panel.after_restore(info)
    bar = info.get("progress")
    session = getattr(kernel, "session", None)
    if not isinstance(bar, dict) or session is None:
        return
    parent = info.get("parent") or {}
    elapsed = max(0.0, time.time() - float(bar.get("started") or time.time()))
    state = BarState(str(bar.get("title", "Restore")), 1.0, elapsed, done=True)
    updates: dict[str, dict[str, Any]] = {}
    # A bar of a restore quicker than PROGRESS_AFTER was never shown.
    shown = elapsed >= float(bar.get("after", PROGRESS_AFTER))
    if bar.get("panel") not in live:
        updates.update(bar.get("stale") or {})
    if shown and bar.get("panel") not in live:
        if bar.get("bar"):
            updates[bar["bar"]] = {"value": 1.0, "bar_style": state.bar_style}
        if bar.get("label"):
            updates[bar["label"]] = {"value": state.line}
    for model_id, changes in updates.items():
        content = {
            "comm_id": model_id,
            "data": {"method": "update", "state": changes, "buffer_paths": []},
        }
        session.send(
            kernel.iopub_socket, "comm_msg", content, parent=parent,
            ident=f"comm-{model_id}".encode(),
        )  # fmt: skip
    if shown and bar.get("display_id"):
        data: dict[str, Any] = {"text/plain": state.text}
        if bar.get("box"):
            data[WIDGET_VIEW] = widget_view(bar["box"])
        content = {"data": data, "metadata": {}, "transient": {"display_id": bar["display_id"]}}
        session.send(
            kernel.iopub_socket, "update_display_data", content, parent=parent,
            ident=b"update_display_data",
        )  # fmt: skip
