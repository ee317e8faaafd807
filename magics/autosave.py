"""Automatic checkpoints, from inside the kernel (see ``runtime/timetravel.py``).

The kernel is the one place that knows when it goes idle: a cell's reply is sent
and no other request waits. After each cell (IPython's ``post_run_cell``),
:class:`Autosave` looks again a moment later, on the kernel's own event loop; if no
request runs or waits by then, it asks the runtime for a checkpoint and waits for
it on that loop, so nothing runs while the kernel is dumped. During "Run All"
the next cell already waits on the kernel's shell lock, and no checkpoint is taken
between queued cells.

At each cell's start it writes the cell's request header and routing identities
to ``/run/sandbox/cell.json``: if the process dies in the cell (out of memory, a
segfault), the runtime restores the last checkpoint and the restored process ends
that cell with an error (see ``handoff.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .channel import ChannelError, Interrupted

#: After a cell, how long the kernel must stay idle before it is checkpointed, in
#: seconds: a request of a "Run All" arrives well within it.
IDLE_DELAY = 0.05
#: Where the cell under way is written for the runtime.
CELL_FILE = Path("/run/sandbox/cell.json")
#: There while autosave is on (the runtime's; see runtime/timetravel.py).
AUTOSAVE_FILE = Path("/run/sandbox/autosave")


def _start_time() -> str:
    return Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]


def _first_line(source: object) -> str:
    for line in str(source or "").splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


def _unread(kernel: Any) -> bool:
    """Whether a shell request waits, unread, on the socket the kernel's main thread
    reads: ipykernel 7's pair from its shell channel thread, else the shell socket.
    Private attributes of ipykernel's; where they are missing, nothing is seen."""
    import zmq

    manager = getattr(getattr(kernel, "shell_channel_thread", None), "manager", None)
    pair = getattr(manager, "_shell_channel_to_main", None)
    sock = getattr(pair, "to_socket", None)
    if sock is None:
        sock = getattr(getattr(kernel, "shell_stream", None), "socket", None)
    if sock is None:
        return False
    try:
        return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)
    except zmq.ZMQError:
        return False


class Autosave:
    """Asks for a checkpoint each time the kernel goes idle after a cell.

    ``call(op, **args)`` sends a request on the kernel's control channel (the
    magic's); ``handoff`` is the kernel's :class:`RestoreHandoff`.
    """

    def __init__(self, shell: Any, handoff: Any, call: Callable[..., Any]) -> None:
        self.shell = shell
        self.handoff = handoff
        self.call = call
        #: Whether autosave is on, as this process last heard (None: not heard).
        self._on: bool | None = None
        self._heard_in = ""  # the process start time it was heard in
        self._last: tuple[int, str] | None = None
        self._pending = False
        self._ended_at = 0.0
        self.warning = ""

    def start(self) -> None:
        self.shell.events.register("pre_run_cell", self._cell_starts)
        self.shell.events.register("post_run_cell", self._cell_ended)

    def close(self) -> None:
        for event, hook in (("pre_run_cell", self._cell_starts),
                            ("post_run_cell", self._cell_ended)):  # fmt: skip
            with contextlib.suppress(ValueError):
                self.shell.events.unregister(event, hook)

    # ---- whether it is on ----------------------------------------------------------

    def heard(self, on: bool) -> None:
        """The runtime said autosave is ``on`` (or off) for this kernel."""
        self._on = on
        self._heard_in = _start_time()

    @property
    def on(self) -> bool:
        """Whether to ask: while the runtime shows autosave on, and unless it said no
        in this very process (a restore brings back a process that may have heard
        otherwise). One stat: a kernel without autosave never asks."""
        if not AUTOSAVE_FILE.exists():
            return False
        if self._on is None or self._heard_in != _start_time():
            return True
        return self._on

    # ---- the hooks -----------------------------------------------------------------

    def _cell_starts(self, info: Any) -> None:
        """``pre_run_cell``: write the cell under way for the runtime."""
        if not self.on or self.handoff.kernel is None:
            return
        try:
            parent, idents = self.handoff.cell_origin()
            # IPython has counted this cell already: its number is one less.
            count = int(getattr(self.shell, "execution_count", 1)) - 1
            cell = {
                "header": parent.get("header", {}), "ident": idents, "count": count,
                # Whom the process after a crash waits for before it answers.
                "peers": self.handoff.frontend_peers(),
            }  # fmt: skip
            data = json.dumps(cell, default=str).encode()
            # Rewritten in place: the runtime made it, and the folder is not ours.
            fd = os.open(CELL_FILE, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except (OSError, KeyError, TypeError, ValueError):
            pass  # not in a sandboxed kernel's run folder, or no request under way

    def _cell_ended(self, result: Any) -> None:
        """``post_run_cell``: look again once the reply is out."""
        count = getattr(result, "execution_count", None)
        if count is None or not self.on:
            return  # a silent execution: nothing a user sees as a cell
        source = getattr(getattr(result, "info", None), "raw_cell", "")
        line = _first_line(source)
        if line.startswith("%container"):
            return  # a command of the magic's own changes nothing to go back to
        self._last = (int(count), line)
        self._ended_at = time.monotonic()
        kernel = self.handoff.kernel
        loop = getattr(kernel, "io_loop", None)
        if loop is None or self._pending:
            return
        self._pending = True
        loop.call_later(IDLE_DELAY, self._when_idle)

    def _busy(self) -> bool:
        """Whether a request runs or waits on the kernel's shell: it holds or waits
        for the shell's lock, or has not been read from the socket yet (ipykernel
        reads one message per turn of its loop)."""
        kernel = self.handoff.kernel
        lock = getattr(kernel, "_main_asyncio_lock", None)
        if lock is not None and (lock.locked() or getattr(lock, "_waiters", None)):
            return True
        if getattr(self.handoff, "_in_snapshot", False):
            return True
        return _unread(kernel)

    def _when_idle(self) -> None:
        """On the kernel's loop, once idle: take the checkpoint (the loop waits)."""
        self._pending = False
        # A look that fell due while a later cell ran (the loop was blocked) comes
        # right at that cell's end: the next queued request is not read yet.
        wait = IDLE_DELAY - (time.monotonic() - self._ended_at)
        if wait > 0:
            self._pending = True
            self.handoff.kernel.io_loop.call_later(wait, self._when_idle)
            return
        if self._last is None or self._busy():
            return
        cell, line = self._last
        self._last = None
        from .container import trim_heap  # here: container.py imports this module

        trim_heap()
        next_count = int(getattr(self.shell, "execution_count", cell + 1))
        try:
            reply = self.call("checkpoint", cell=cell, next=next_count, line=line)
        except Interrupted:
            return  # this process is the restore of a checkpoint: the handoff arrives
        except ChannelError as err:
            print(f"%container: a checkpoint failed ({err})", file=sys.__stderr__)
            return
        if not isinstance(reply, dict):
            return
        self.heard(bool(reply.get("autosave")))
        if reply.get("warning"):
            self.warning = str(reply["warning"])
            self.shell.events.register("pre_run_cell", self._warn)

    def _warn(self, *_: Any) -> None:
        """Before the next cell's output: autosave turned itself off, and why."""
        self.shell.events.unregister("pre_run_cell", self._warn)
        if self.warning:
            text = f"%container: autosave is off: {self.warning}. "
            print(text + "`%container autosave on` turns it back on.", file=sys.stderr, flush=True)
            self.warning = ""
