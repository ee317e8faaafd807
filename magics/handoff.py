"""The restore hand-off: what a kernel process does when it wakes up restored.

A restore replaces the kernel's process with one from a snapshot (or, where memory
cannot come back, with a new one on the snapshot's files). The frontend still
waits for the reply to the cell that asked for it, its TCP connections are gone,
and a process restored from another kernel's snapshot holds that kernel's key.
:class:`RestoreHandoff` mends all three, from inside ipykernel.

It relies on ipykernel's private attributes (``_parent_ident``, ``_topic``,
``_publish_status``, ``iopub_thread._xpub_stream``, ``shell_channel_thread``...),
which is why it is kept apart from the magic's commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox_kernel.protocol import connections_from_outside

from .channel import Channel, ChannelError, Interrupted

CONNECTION_FILE = Path("/run/sandbox/connection.json")
#: How many connections the frontends had when the runtime restored this kernel.
PEERS_FILE = Path("/run/sandbox/peers.json")
#: How long a restored kernel waits for the frontend to reconnect before it speaks.
RECONNECT_WAIT = 10.0
#: Where the shell socket's handshakes are not watched (a process that did not
#: start watching before the frontend connected): how long a reconnected TCP
#: connection must be up before it is trusted to carry a reply.
HANDSHAKE_GRACE = 0.05
#: After the shell socket's ZeroMQ handshake with a peer, how long until the shell
#: thread has surely taken the new peer in (it does at its next turn of its loop).
AFTER_HANDSHAKE = 0.01
#: zmq.EVENT_HANDSHAKE_SUCCEEDED.
EVENT_HANDSHAKE_SUCCEEDED = 0x1000
#: zmq.XPUB_VERBOSE (pass every subscription up, not only a topic's first).
XPUB_VERBOSE = 40
#: Signatures remembered with the life they were signed in (see _signed_in).
SIGNED_KEPT = 4096
_DELIM = b"<IDS|MSG>"


def _launch_environment() -> dict[str, str]:
    """The environment this process was started with (a restored one: the
    template's)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _start_time() -> str:
    """This process's start time (it changes when CRIU restores the process)."""
    return Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]


class RestoreHandoff:
    """Carries a kernel process across restores; made by the ``%container`` magic in
    a sandboxed kernel (with its ``channel``), and closed by
    ``unload_ipython_extension``.

    At :meth:`start` it makes the session sign with the kernel's current key, asks
    whether this process must answer a reset or files-only restore, watches for
    restores no cell asked for, and registers :meth:`after_restore` as the shell's
    ``pre_execute`` hook.
    """

    def __init__(self, shell: Any, channel: Channel) -> None:
        self.shell = shell
        self.channel = channel
        # Set on news of the frontend (a subscription, a handshake): wakes the wait.
        self._news = threading.Event()
        # Subscriptions to iopub since this process last started (a restore starts
        # it again): (the start time they were counted under, how many).
        self._subscriptions = ("", 0)
        self._subscriptions_lock = threading.Lock()
        # ZeroMQ handshakes of the shell socket with peers from outside since this
        # process last started: (that start time, when each was done).
        self._handshakes: tuple[str, list[float]] = ("", [])
        # The start time of the process that began watching them ("" if not).
        self._handshakes_watched_since = ""
        self._restored = threading.Event()
        self._pause = threading.Event()  # never set: waits between retries
        self._identity_lock = threading.Lock()
        self._identity_start = _start_time()
        # The life (start time) each recent message was signed in, by signature,
        # oldest first: the iopub hold tells a message queued before a restore from
        # one the restored process signed.
        self._signed_in: OrderedDict[bytes, str] = OrderedDict()
        self._signed_lock = threading.Lock()
        self._hooked = False
        # Set while a cell takes a snapshot: a process restored from it wakes up in
        # that cell, whose own code asks what happened (see finish_restore).
        self._in_snapshot = False
        #: Said at the start of the next cell: what a restore the user did not ask
        #: for lost (a kernel brought back on another node).
        self._notice = ""
        #: The process life (start time) whose restore the watcher has handled: the
        #: next cell waits for it, so that it sees what the hand-off said.
        self._handled_life = _start_time()
        self._handled = threading.Condition()
        #: The process start time IPython's history database was last opened in.
        self._history_start = _start_time()
        self._history_lock = threading.Lock()
        #: Called when this process becomes a new kernel (from a base, or a reset):
        #: what a fresh process does at its start (the magic's warning of how the
        #: last process ended).
        self.new_kernel_hooks: list[Callable[[], None]] = []

    def start(self) -> None:
        """Take over the session's signing, start the threads, register the hook."""
        self._watch_subscriptions()
        self._watch_handshakes()
        self._sign_with_current_key()
        # A new kernel process: was it started by a reset, or by a restore that
        # could only bring the files back? Then a cell waits for its reply.
        threading.Thread(target=self._answer_pending, daemon=True).start()
        threading.Thread(target=self._watch_restores, daemon=True).start()
        self.shell.events.register("pre_execute", self.after_restore)
        self.shell.events.register("post_execute", self.snapshot_ends)
        self._hooked = True

    def close(self) -> None:
        """Unregister the ``pre_execute`` hook (the threads are daemons, and end with
        the process). Called by ``unload_ipython_extension``."""
        if self._hooked:
            self.shell.events.unregister("pre_execute", self.after_restore)
            self.shell.events.unregister("post_execute", self.snapshot_ends)
            self._hooked = False

    @property
    def kernel(self) -> Any:
        """The ipykernel kernel object this shell belongs to (None in a terminal)."""
        return getattr(self.shell, "kernel", None)

    # ---- what the magic's commands call ----------------------------------------------

    def snapshot_starts(self) -> None:
        """A cell starts taking a snapshot: a process restored from it wakes up in
        this cell (see :meth:`finish_restore`)."""
        self._in_snapshot = True

    def snapshot_ends(self) -> None:
        """The snapshot's call returned (also the ``post_execute`` hook)."""
        self._in_snapshot = False

    def cell_origin(self) -> tuple[dict[str, Any], list[str]]:
        """The running cell's request header and routing identities (hex): what a
        new or restored process needs to answer this cell."""
        kernel = self.kernel
        ident = kernel._parent_ident["shell"]
        idents = ident if isinstance(ident, list) else [ident]
        return kernel.get_parent("shell"), [i.hex() for i in idents]

    def next_number(self) -> int | None:
        """The number the next cell gets: IPython counts a cell as it starts, so
        while a cell runs the shell's count is already one past the cell's."""
        count = getattr(self.shell, "execution_count", None)
        return count if isinstance(count, int) else None

    def _continue_numbering(self, count: object) -> None:
        """Number the next cell ``count``: this process's memory is older (a
        restore) or new (a reset), but the notebook's numbers never repeat. Never
        below the process's own count: its history database (restored with it) has
        a line for each of its cells, and a number must not be used twice there."""
        if isinstance(count, int) and not isinstance(count, bool):
            self.shell.execution_count = max(count, self.shell.execution_count)

    def finish_restore(self, info: dict[str, Any]) -> None:
        """In a process restored from a snapshot, inside the cell that took it: complete
        what the runtime says happened (``info`` from its ``resume``).

        A restore: the frontend waits for the reply to the restore cell. Once the
        frontend has reconnected, this cell's output and reply go to the restore
        cell instead. A base start or a reset to the base: this process is a new
        kernel, numbered afresh, and a cell that asked for the reset gets the reply.
        """
        self.snapshot_ends()
        if info.get("kind") != "restore":
            self._arrive(info, in_cell=True)
            return
        self._reopen_history()
        self._redirect_cell(info)
        # Memory goes back, the numbering does not: this cell ends as the restore
        # cell's number, and the next one follows it.
        self._continue_numbering(info.get("count"))
        print(f"Restored to snapshot {info['name']} (live): files and memory are as they were.")

    def _redirect_cell(self, info: dict[str, Any]) -> None:
        """Once the frontend is back, send this cell's output and reply to the cell
        that asked (``info``'s ``parent`` and ``ident``)."""
        kernel = self.kernel
        self._wait_for_frontend(peers=info.get("peers"))
        old_id = kernel.get_parent("shell")["header"]["msg_id"]
        new_parent = info["parent"]
        new_ident = [bytes.fromhex(i) for i in info["ident"]]
        session = kernel.session
        send = session.send

        def send_once(
            stream: Any, msg_type: Any, content: Any = None, parent: Any = None,
            ident: Any = None, **kwargs: Any,
        ) -> Any:  # fmt: skip
            if (
                msg_type == "execute_reply"
                and (parent or {}).get("header", {}).get("msg_id") == old_id
            ):
                session.send = send
                parent, ident = new_parent, new_ident
            return send(stream, msg_type, content, parent, ident, **kwargs)

        session.send = send_once
        kernel.set_parent(new_ident, new_parent, "shell")

    # ---- a new kernel from a base, or a reset -----------------------------------------

    def _arrive(self, info: dict[str, Any], in_cell: bool) -> None:
        """This process was restored from a base (a new kernel, a restart, or a reset
        to the base) or was restored in place by a cell while idle: number its cells
        as ``info`` says and answer the cell that asked, if any."""
        kind = info.get("kind")
        count = info.get("count")
        numbered = threading.Event()
        if kind == "crash":
            self._arrive_after_crash(info)
            return
        if kind == "notice":
            # Brought back elsewhere (its node died): the next cell says what was lost.
            self._reopen_history()
            self._continue_numbering(count)
            self._notice = str(info.get("text") or "")
            return
        if kind == "restore" and info.get("undo"):
            text = f"Undone: back to the state before cell {info['undo']} (memory and files).\n"
        elif kind == "restore":
            text = (
                f"Restored to snapshot {info['name']} (live): files and memory are as they were.\n"
            )
        else:
            text = _RESET_TEXT.get(info.get("to", ""), _RESET_TEXT["image"])
        if info.get("parent") and not in_cell:
            # The frontend reconnects meanwhile: the reply waits for both.
            number = count - 1 if isinstance(count, int) else None
            threading.Thread(
                target=self._reply_when_back, args=(info, text, number, numbered), daemon=True
            ).start()
        if kind == "restore":
            self._reopen_history()
            self._continue_numbering(count)
        else:
            self._move_in(info)
            # A new kernel: its own history session (the base's has lines of these
            # numbers already), and cells numbered from 1, or after the asking cell.
            self._new_session(count if isinstance(count, int) and count > 0 else 1)
            for hook in self.new_kernel_hooks:
                hook()
        numbered.set()
        if info.get("parent") and in_cell:
            self._redirect_cell(info)
            print(text, end="")

    def _arrive_after_crash(self, info: dict[str, Any]) -> None:
        """This process is the kernel's last checkpoint, restored after the process
        died in a cell (out of memory, a signal): that cell ends with an error
        saying so, and the next cell follows its number."""
        count = info.get("count")
        if isinstance(count, int) and not isinstance(count, bool):
            self._continue_numbering(count + 1)
        if not info.get("parent"):
            return

        def when_back() -> None:
            self._wait_for_frontend(peers=info.get("peers"))
            parent = info["parent"]
            ident = [bytes.fromhex(i) for i in info["ident"]]
            self.kernel.io_loop.add_callback(
                self._send_error, parent, ident, str(info.get("ename") or "Error"),
                str(info.get("evalue") or ""), count if isinstance(count, int) else None,
            )  # fmt: skip

        threading.Thread(target=when_back, daemon=True).start()

    def _send_error(
        self, parent: dict[str, Any], ident: list[bytes], ename: str, evalue: str,
        count: int | None,
    ) -> None:  # fmt: skip
        """End the cell ``parent`` with error ``ename: evalue``: the error output, its
        ``execute_reply`` and an idle status. Runs on the kernel's io loop."""
        error = {"ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"]}
        self._end_cell(parent, ident, "error", error, {"status": "error", **error}, count)

    def _move_in(self, info: dict[str, Any]) -> None:
        """A process from a pristine base (see ``runtime/pristine.py``): take this
        kernel's working folder and launch environment, where ``info`` names them.

        The runtime has mounted the folder at the kernel's path, and the process's
        working directory is there already; what Python and IPython remembered of
        the template's folder (``sys.path``'s entry, ``_dh``, ``PWD``) and its
        environment are brought up to date.
        """
        cwd, was = info.get("cwd"), info.get("was_cwd")
        if isinstance(cwd, str) and isinstance(was, str) and cwd != was:
            with contextlib.suppress(OSError):
                os.chdir(cwd)
            sys.path[:] = [cwd if entry == was else entry for entry in sys.path]
            user_ns = getattr(self.shell, "user_ns", {})
            if isinstance(user_ns.get("_dh"), list):
                dirs = user_ns["_dh"]
                dirs[:] = [type(d)(cwd) if str(d) == was else d for d in dirs]
            os.environ["PWD"] = cwd
        env = info.get("env")
        if isinstance(env, dict):
            launched = _launch_environment()
            for name, value in launched.items():
                if name not in env and os.environ.get(name) == value:
                    del os.environ[name]  # the template's, not this kernel's
            os.environ.update({k: v for k, v in env.items() if isinstance(v, str)})
            session = env.get("JPY_SESSION_NAME")
            user_ns = getattr(self.shell, "user_ns", {})
            if session:
                user_ns["__session__"] = session
            else:
                user_ns.pop("__session__", None)

    def _reopen_history(self) -> None:
        """Connect to IPython's history database again, after a restore.

        A snapshot imported from a file (``snapshot import``) has its files at new
        inode numbers. sqlite remembers the inode it opened, takes the database for
        moved, and refuses to write ("attempt to write a readonly database"); the
        history saving thread would stop with that error on the next cell."""
        history = getattr(self.shell, "history_manager", None)
        if history is None or not getattr(history, "enabled", False):
            return
        with self._history_lock:
            # Once per process life: the watcher's arrival and the next cell's
            # pre_execute hook both ask, whichever comes first reconnects.
            started = _start_time()
            if started == self._history_start:
                return
            self._history_start = started
            self._connect_history(history)

    def _connect_history(self, history: Any) -> None:
        try:
            import sqlite3

            history.init_db()
            thread = getattr(history, "save_thread", None)
            if thread is not None and getattr(thread, "db", None) is not None:
                options = dict(getattr(history, "connection_options", None) or {})
                thread.db = sqlite3.connect(str(history.hist_file), **options)
        except Exception as err:  # the history is IPython's; the kernel goes on
            print(f"%container: could not reopen the history database ({err})",
                  file=sys.__stderr__)  # fmt: skip

    def _new_session(self, count: int) -> None:
        """Start a new IPython history session; the next cell is number ``count``."""
        history = getattr(self.shell, "history_manager", None)
        if history is not None:
            try:
                with self._history_lock:  # not while the next cell's hook reconnects it
                    history.reset(new_session=True)
            except Exception as err:  # the history is IPython's; the kernel goes on
                print(f"%container: could not start a new history session ({err})",
                      file=sys.__stderr__)  # fmt: skip
        self.shell.execution_count = count

    def _reply_when_back(
        self, info: dict[str, Any], text: str, number: int | None, numbered: threading.Event
    ) -> None:
        """Once the frontend has reconnected, answer the cell ``info`` names (a
        restored process: the frontend's handshakes need no more than a restore's)."""
        self._wait_for_frontend(peers=info.get("peers"))
        numbered.wait(RECONNECT_WAIT)  # the next cell's number is set before the reply
        parent = info["parent"]
        ident = [bytes.fromhex(i) for i in info["ident"]]
        from .progress import finish_handed_over  # here: progress.py imports this module

        finish_handed_over(self.kernel, info)  # the restore's progress bar, before the reply
        self.kernel.io_loop.add_callback(self._send_reply, parent, ident, text, number)

    def _arrive_idle(self) -> None:
        """After a restore found by the watcher in an idle process: ask the runtime
        what it was (its control server may not listen yet: retry a while)."""
        deadline = time.monotonic() + RECONNECT_WAIT
        while True:
            try:
                info = self.channel.request("resume")
                break
            except ChannelError:
                if time.monotonic() > deadline:
                    return
                self._pause.wait(0.005)
        if info and info.get("kind") == "pool":
            info = self._wait_to_be_claimed()
        if info:
            self._arrive(info, in_cell=False)
        else:
            self._reopen_history()  # a restore by the CLI: no cell asked

    def _wait_to_be_claimed(self) -> dict[str, Any] | None:
        """In a kernel of a warm pool (restored from its pristine base before anyone
        asked for it): wait until a start claims it, then take the claiming kernel's
        key (written before the answer) and return what to arrive as."""
        while True:
            try:
                info = self.channel.request("claimed", timeout=None)
                break
            except ChannelError:
                # The runtime went away: a new one removes this kernel (gc).
                self._pause.wait(1.0)
        with self._identity_lock:
            self._take_identity()
            self._identity_start = _start_time()
        return info if isinstance(info, dict) else None

    def after_restore(self) -> None:
        """Before a cell runs in a restored process: let the frontend reconnect first,
        or the cell's output would be published to nobody. The ``pre_execute`` hook."""
        # Before the cell writes its history: the restore's own reconnection (the
        # watcher's) may not have run yet.
        self._reopen_history()
        now = _start_time()
        with self._handled:
            # A cell can come before the watcher has handled the restore (its notice).
            if not self._handled.wait_for(lambda: self._handled_life == now, RECONNECT_WAIT):
                self._handled_life = now  # the watcher is gone: not waited for again
        if self._restored.is_set():
            self._restored.clear()
            self._wait_for_frontend()
        notice, self._notice = self._notice, ""
        if notice:
            print(f"%container: {notice}", file=sys.stderr)

    # ---- the frontend's reconnection ------------------------------------------------

    def _watch_subscriptions(self) -> None:
        """Note each iopub subscription (a frontend (re)connecting), and count them
        since the last restore. Every subscriber's is passed up (``XPUB_VERBOSE``),
        not only the first of a topic: a Jupyter server subscribes twice."""
        thread: Any = getattr(self.kernel, "iopub_thread", None)
        stream = getattr(thread, "_xpub_stream", None)
        if thread is None or stream is None:
            return
        original = thread._handle_subscription

        def handle(frames: list[bytes]) -> None:
            new = sum(1 for frame in frames if frame[:1] == b"\x01")
            if new:
                epoch = _start_time()
                with self._subscriptions_lock:
                    seen, count = self._subscriptions
                    self._subscriptions = (epoch, (count if seen == epoch else 0) + new)
                self._news.set()
                release()
            original(frames)

        # Output sent by a process restored while a cell ran (``sandbox-kernel
        # restore``, a kernel moved to another node) would go to nobody until the
        # frontend has subscribed again: it is held until then (at most
        # RECONNECT_WAIT seconds), in order. All of it runs on the iopub thread.
        really_send = thread._really_send
        held: list[tuple[Any, Any]] = []
        state: dict[str, Any] = {"epoch": _start_time(), "holding": False}

        def release() -> None:
            state["holding"] = False
            while held:
                args, kwargs = held.pop(0)
                really_send(*args, **kwargs)

        def send(*args: Any, **kwargs: Any) -> None:
            # The life this message was signed in: one signed before the restore
            # and sent again by the restored process went out already from the
            # process that took the snapshot, and is not held (that would send it
            # twice, and the frontend refuses a duplicate signature).
            epoch = self._signed_life(args[0] if args else kwargs.get("msg"))
            if epoch != self._identity_start:
                really_send(*args, **kwargs)
                return
            if epoch != state["epoch"]:
                state["epoch"] = epoch
                with self._subscriptions_lock:
                    back = self._subscriptions[0] == epoch
                if not back:
                    state["holding"] = True
                    thread.io_loop.call_later(RECONNECT_WAIT, release)
            if state["holding"]:
                held.append((args, kwargs))
                return
            really_send(*args, **kwargs)

        def on_its_thread() -> None:
            with contextlib.suppress(Exception):  # an older libzmq: one per topic, as before
                stream.socket.setsockopt(XPUB_VERBOSE, 1)
            stream.on_recv(handle)
            thread._really_send = send

        thread.io_loop.add_callback(on_its_thread)

    def _watch_handshakes(self) -> None:
        """Note each ZeroMQ handshake the shell socket completes with a peer from
        outside (a frontend (re)connecting), with a socket monitor.

        A TCP connection can be established (the kernel's network stack accepts it
        into the listen backlog) well before ZeroMQ has accepted it and exchanged its
        handshake, above all in a process just restored, under load. Until then the
        shell ROUTER does not know the peer and drops a reply to it. The kernel's own
        debug socket connects over loopback and is not counted.
        """
        stream = getattr(self.kernel, "shell_stream", None)
        loop = getattr(stream, "io_loop", None)
        if stream is None or loop is None:
            return

        def on_its_thread() -> None:  # a ZeroMQ socket is used from its own thread
            try:
                monitor = stream.socket.get_monitor_socket(EVENT_HANDSHAKE_SUCCEEDED)
            except Exception as err:  # pyzmq's; the wait falls back on TCP's age
                print(f"%container: cannot watch the shell's handshakes ({err})",
                      file=sys.__stderr__)  # fmt: skip
                return
            self._handshakes_watched_since = _start_time()
            threading.Thread(
                target=self._count_handshakes, args=(monitor,), daemon=True,
                name="sandbox-handshakes",
            ).start()  # fmt: skip

        loop.add_callback(on_its_thread)

    def _count_handshakes(self, monitor: Any) -> None:
        """Read the shell socket's monitor (see :meth:`_watch_handshakes`)."""
        while True:
            try:
                frames = monitor.recv_multipart()
            except Exception:  # the context is being closed: the kernel is ending
                # Closed here, or the context's close waits for it forever: the
                # kernel's process outlived its shutdown reply until jupyter_client
                # sent SIGTERM (2.5 s later).
                with contextlib.suppress(Exception):
                    monitor.close(linger=0)
                return
            if len(frames) < 2 or frames[1].startswith(b"tcp://127."):
                continue
            if int.from_bytes(frames[0][:2], sys.byteorder) != EVENT_HANDSHAKE_SUCCEEDED:
                continue
            epoch, now = _start_time(), time.monotonic()
            with self._subscriptions_lock:
                seen, times = self._handshakes
                self._handshakes = (epoch, [*(times if seen == epoch else []), now][-16:])
            self._news.set()

    def _shell_handshakes(self) -> list[float] | None:
        """When the shell's handshakes since this process last started were done, or
        None where they are not known: the watch began in this very process, maybe
        after the frontend connected (a fresh process, not a restored one)."""
        since = self._handshakes_watched_since
        if not since or since == _start_time():
            return None
        with self._subscriptions_lock:
            seen, times = self._handshakes
        return times if seen == _start_time() else []

    def _subscribers(self) -> int:
        """iopub subscriptions since this process last started (or was restored)."""
        with self._subscriptions_lock:
            seen, count = self._subscriptions
        return count if seen == _start_time() else 0

    def _connections(self) -> set[tuple[str, str]]:
        """The live TCP connections to the kernel's shell and iopub ports from outside
        (over the kernel's veth; the kernel's own processes, over loopback, do not
        count), as (channel, remote address)."""
        try:
            connection = json.loads(CONNECTION_FILE.read_text())
            text = Path("/proc/net/tcp").read_text()
        except (OSError, ValueError):
            return {("shell", "?"), ("iopub", "?")}
        ports = {int(connection[f"{c}_port"]): c for c in ("shell", "iopub")}
        return connections_from_outside(text, ports)

    def frontend_peers(self) -> dict[str, int]:
        """How many connections shell and iopub have now: what a process that replaces
        this one waits for (a Jupyter server holds two on iopub: the browser's
        channel and its own activity watcher)."""
        counts = {"shell": 0, "iopub": 0}
        for channel, _ in self._connections():
            counts[channel] += 1
        return counts

    def _wait_for_frontend(self, grace: float = HANDSHAKE_GRACE, peers: object = None) -> None:
        """Wait (bounded) until the frontend has reconnected its shell and iopub.

        After a restore every TCP connection is closed and the frontend reconnects
        by itself. A message sent before its sockets are back is lost: iopub drops
        it, and shell cannot route a reply to a peer it does not know yet. So wait
        until the frontend's peers are back: iopub's subscriptions, and shell's
        ZeroMQ handshakes (or, in a fresh process, connections up for ``grace``
        seconds). As many as ``peers`` (the replaced process's
        :meth:`frontend_peers`) where the request said, or as the runtime counted
        before a restore (``PEERS_FILE``), else one each.
        """
        want = {"shell": 1, "iopub": 1}
        if peers is None:  # a restore no cell asked for: the runtime counted them
            try:
                peers = json.loads(PEERS_FILE.read_text())
            except (OSError, ValueError):
                peers = None
        if isinstance(peers, dict):
            for channel in want:
                count = peers.get(channel)
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    want[channel] = min(count, 16)
        deadline = time.monotonic() + RECONNECT_WAIT
        first_seen: dict[tuple[str, str], float] = {}
        while time.monotonic() < deadline:
            self._news.clear()
            now = time.monotonic()
            # iopub is back when its subscribers are (they subscribe once their
            # handshake is done). Shell is, once the shell thread knows its peers:
            # a reply to a peer the ROUTER does not know yet is dropped.
            handshakes = self._shell_handshakes()
            iopub_back = self._subscribers() >= want["iopub"]
            if handshakes is not None:
                # A restored process: its watches were set up before the dump, so
                # only what ZeroMQ has taken in counts (an accepted TCP connection
                # may still wait in the backlog; output sent then was lost), a
                # while after each handshake.
                done = [t for t in handshakes if now - t >= AFTER_HANDSHAKE]
                shell_back = len(done) >= want["shell"]
            else:
                # A fresh process, whose watches may have missed the frontend's
                # first connections: TCP connections ``grace`` old count too.
                first_seen = {c: first_seen.get(c, now) for c in self._connections()}
                settled = {"shell": 0, "iopub": 0}
                for (channel, _), seen in first_seen.items():
                    settled[channel] += now - seen >= grace
                shell_back = settled["shell"] >= want["shell"]
                iopub_back = iopub_back or settled["iopub"] >= want["iopub"]
            if shell_back and iopub_back:
                return
            self._news.wait(0.01)

    # ---- restores no cell asked for, and the key ------------------------------------

    def _watch_restores(self) -> None:
        """Notice a restore that no cell asked for (``sandbox-kernel restore``, or a
        new kernel started from a base snapshot).

        A control connection is held open; when it breaks and this process's start
        time has changed, CRIU has restored it. The process then takes its kernel's
        current key (see :meth:`_take_identity`), and the next cell waits for the
        frontend to be back before it runs (see :meth:`after_restore`).
        """
        started = _start_time()
        failures = 0
        retry_until = 0.0
        while failures < 5:
            try:
                self.channel.request("watch", timeout=None)
            except Interrupted:
                if _start_time() != started:
                    started = _start_time()
                    self._check_identity()
                    self._restored.set()
                    if not self._in_snapshot:
                        # Before the watch is heard again: a new kernel's launch
                        # waits for it, and its first cell must be numbered 1.
                        self._arrive_idle()
                    with self._handled:
                        self._handled_life = started
                        self._handled.notify_all()
                    failures = 0
                    # A new kernel's control server may not listen yet: retry fast.
                    retry_until = time.monotonic() + RECONNECT_WAIT
                    continue
            except ChannelError:
                pass
            if time.monotonic() < retry_until:
                self._pause.wait(0.005)
                continue
            failures += 1  # the runtime went away: try a few times, then stop
            self._pause.wait(1.0)

    def _sign_with_current_key(self) -> None:
        """Make every message this process signs or checks use its kernel's current key.

        A process restored from another kernel's snapshot (a base, or a snapshot of
        an earlier kernel of the same owner and folder) wakes up holding that
        kernel's key, and any thread may send first: the iopub thread flushing
        output, a status, the restored cell's reply. So the session's ``sign`` (which
        also checks incoming messages) first notices a restore, by this process's
        start time, and takes the new key before it signs anything.
        """
        session = getattr(self.kernel, "session", None)
        if session is None:
            return
        sign = session.sign

        def sign_with_current_key(msg_list: list[bytes]) -> bytes:
            self._check_identity()
            signed: bytes = sign(msg_list)
            with self._signed_lock:
                self._signed_in[signed] = self._identity_start
                while len(self._signed_in) > SIGNED_KEPT:
                    self._signed_in.popitem(last=False)
            return signed

        session.sign = sign_with_current_key

    def _signed_life(self, frames: Any) -> str:
        """The life (start time) the message in ``frames`` was signed in, forgotten
        once asked; the latest life signed in for one this process does not remember."""
        try:
            at = next(i for i, frame in enumerate(frames) if isinstance(frame, bytes)
                      and frame == _DELIM)  # fmt: skip
            signature = bytes(frames[at + 1])
        except (StopIteration, IndexError, TypeError):
            return self._identity_start
        with self._signed_lock:
            life = self._signed_in.pop(signature, None)
        return life if life is not None else self._identity_start

    def _check_identity(self) -> None:
        """Take the kernel's current key if this process was restored since it last
        looked (see :meth:`_sign_with_current_key`). Costs one small /proc read."""
        now = _start_time()
        if now == self._identity_start:
            return
        with self._identity_lock:
            if now != self._identity_start:
                self._take_identity()
                self._identity_start = now

    def _take_identity(self) -> None:
        """After a restore: sign with the kernel's current connection key.

        A restore in place keeps the key. A process restored from a base snapshot
        was dumped in another kernel, whose key it still holds; the new kernel's
        connection file has the key its clients use.
        """
        kernel = self.kernel
        try:
            key = json.loads(CONNECTION_FILE.read_text())["key"].encode()
        except (OSError, ValueError, KeyError) as err:
            print(f"%container: cannot read the connection key ({err})", file=sys.__stderr__)
            return
        if kernel is not None and key and kernel.session.key != key:
            kernel.session.key = key
        os.environ["HOSTNAME"] = socket.gethostname()

    # ---- a reset, or a restore of the files only -------------------------------------

    def _answer_pending(self) -> None:
        """Reply to the cell that reset this kernel or restored its files (in the
        new process, which has no such cell of its own)."""
        info = None
        for attempt in range(3):
            try:
                info = self.channel.request("resume")
                break
            except ChannelError as err:
                print(f"%container: asking the runtime failed ({err})", file=sys.__stderr__)
                self._restored.wait(0.2 * (attempt + 1))
        if not info or not info.get("parent"):
            return  # a cold start of a new kernel (or a reset no cell asked for)
        # A new process under load: give the frontend's handshakes more room.
        self._wait_for_frontend(grace=2 * HANDSHAKE_GRACE, peers=info.get("peers"))
        kernel = self.kernel
        deadline = time.monotonic() + RECONNECT_WAIT
        while getattr(kernel, "io_loop", None) is None and time.monotonic() < deadline:
            self._pause.wait(0.01)
        if info["kind"] == "reset":
            to = "files" if info.get("to") == "base" else "image"
            text = _RESET_TEXT[to]
        else:
            text = (
                f"Restored the files of snapshot {info['name']}; the kernel restarted "
                "(its memory could not be restored).\n"
            )
        parent = info["parent"]
        ident = [bytes.fromhex(i) for i in info["ident"]]
        count = info.get("count")
        self._continue_numbering(count)  # a fresh process would count from 1
        # The asking cell's own number is one before the next one's.
        number = count - 1 if isinstance(count, int) else None
        from .progress import finish_handed_over  # here: progress.py imports this module

        finish_handed_over(kernel, info)  # the restore's progress bar, before the reply
        kernel.io_loop.add_callback(self._send_reply, parent, ident, text, number)

    def _send_reply(
        self, parent: dict[str, Any], ident: list[bytes], text: str, count: int | None = None
    ) -> None:
        """Send ``text`` as the output of the cell ``parent`` (routed by ``ident``),
        then its ``execute_reply`` and an idle status. Runs on the kernel's io loop."""
        output = {"name": "stdout", "text": text}
        reply = {"status": "ok", "user_expressions": {}, "payload": []}
        self._end_cell(parent, ident, "stream", output, reply, count)

    def _end_cell(
        self, parent: dict[str, Any], ident: list[bytes], output_type: str,
        output: dict[str, Any], reply: dict[str, Any], count: int | None,
    ) -> None:  # fmt: skip
        """Answer the cell ``parent`` of another process (routed by ``ident``): one
        output on iopub, its ``execute_reply`` numbered ``count`` (else the kernel's
        count), and an idle status. Runs on the kernel's io loop."""
        kernel = self.kernel
        session = kernel.session
        # As ipykernel's own dispatch_shell picks the socket for the main shell.
        if getattr(kernel, "_supports_kernel_subshells", False):
            stream = kernel.shell_channel_thread.manager.get_subshell_to_shell_channel_socket(None)
        else:
            stream = kernel.shell_stream
        session.send(kernel.iopub_socket, output_type, output, parent=parent,
                     ident=kernel._topic(output_type))  # fmt: skip
        number = count if count is not None else kernel.execution_count
        content = {**reply, "execution_count": number}
        session.send(stream, "execute_reply", content, parent=parent, ident=ident)
        kernel._publish_status("idle", "shell", parent=parent)


#: What a cell that reset the kernel shows, by where the kernel went.
_RESET_TEXT = {
    "base": "The kernel was reset to its base: files and memory as the class starts.\n",
    "files": "The kernel was reset to its base's files; its memory could not be restored, "
    "so it started afresh (the kernel's log says why).\n",
    "image": "The kernel was reset: a fresh kernel on the image's pristine files.\n",
}
