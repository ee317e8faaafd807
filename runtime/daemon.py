"""``sandbox-kernel daemon``: the one root process of a shared server.

It runs runc, CRIU, mounts, btrfs and nftables for every user, and serves the
:class:`~.service.KernelService` on a unix socket (``/run/sandbox-kernel/daemon.sock``
by default). Jupyter servers, running as their users, are its clients: the
provisioner and the ``sandbox-kernel`` command. Each connection's caller is known
from the kernel (``SO_PEERCRED``), never from what it sends.

The wire format: the client sends one JSON line ``{"op": NAME, "args": {...}}``
and gets ``{"progress": TEXT}`` lines while the work goes on, then one of
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message"}}``.
The ``events`` operation instead streams ``{"event": {...}}`` lines until the
client closes. One request per connection.

Everything a caller sends is hostile. A request line has at most
:data:`MAX_REQUEST` bytes and must arrive within :data:`READ_TIMEOUT` seconds; a
user holds at most :data:`MAX_PER_USER` connections and everyone together
:data:`MAX_CONNECTIONS`; more are answered with an error and closed. Work that
blocks runs in the daemon's own pool of threads, so a flood of slow requests does
not stop the event loop. A client that goes away does not cut an operation short:
a snapshot or restore it started runs to its end.

When the daemon stops, kernels keep running. When it starts, it takes up every
running kernel again (:meth:`~.service.KernelService.adopt_all`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import resource
import signal
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError, SandboxError

from . import saving, snapshots
from .callers import Caller
from .quotas import DaemonConfig
from .service import Event, KernelService

#: Bytes of one request line.
MAX_REQUEST = 1 << 20
#: Seconds a client may take to send its request line.
READ_TIMEOUT = 10.0
#: Connections one user may hold at once (a server starting 100 kernels at once
#: holds two per kernel at most, plus its ``events`` streams).
MAX_PER_USER = 256
#: Connections everyone may hold at once.
MAX_CONNECTIONS = 1024
#: Threads that carry out blocking work (file copies, runc, the kernel store).
WORKERS = 32
#: Events waiting for one slow ``events`` client; past it, the stream is closed.
MAX_QUEUED_EVENTS = 1000


#: The systemd unit ``sandbox-kernel daemon --unit`` prints, for this installation.
UNIT = """\
[Unit]
Description=sandbox-kernel daemon: sandboxed Jupyter kernels for every user
After=local-fs.target network.target

[Service]
Type=simple
ExecStart={python} -m sandbox_kernel.cli daemon
# Stopping the daemon stops serving, not the kernels: they run on, and a new
# daemon takes them up again.
KillMode=process
Restart=on-failure
RestartSec=1
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"""


def default_pid_file(socket_path: str) -> Path:
    """The pid file beside the socket: ``/run/sandbox-kernel/daemon.pid``."""
    return Path(socket_path).with_name("daemon.pid")


class Daemon:
    """Serves the kernel service on a unix socket. ``start``, then ``serve_forever``
    or ``close``."""

    def __init__(self, config: DaemonConfig, service: KernelService | None = None) -> None:
        self.config = config
        self.log = logging.getLogger("sandbox_kernel.daemon")
        self.service = service or KernelService(config=config, log=self.log)
        self._server: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._connections: Counter[int] = Counter()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()

    @property
    def socket_path(self) -> str:
        return self.config.socket

    # ---- start and stop ----------------------------------------------------------------

    async def start(self, pid_file: Path | None = None) -> None:
        """Take the lock, listen, take up running kernels.

        Raises:
            ConfigError: another daemon runs, or the socket's folder is unsafe.
        """
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(WORKERS, thread_name_prefix="sk-worker"))
        _raise_file_limit()
        folder = Path(self.socket_path).parent
        _safe_folder(folder)
        self._lock(pid_file or default_pid_file(self.socket_path))
        snapshots.QUOTA_SOURCE = self.service.snapshot_quota
        taken = await self.service.adopt_all()
        if taken:
            self.log.info("took up %d running kernels: %s", len(taken), ", ".join(taken))
        # What a daemon killed mid-work left (an unfinished snapshot), and kernels
        # whose servers died meanwhile.
        for line in await self.service.runtime.gc():
            self.log.info("gc removed %s", line)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(
            self._serve, self.socket_path, limit=MAX_REQUEST
        )
        # Anyone may connect; what they may do depends on who the kernel says they are.
        os.chmod(self.socket_path, 0o666)
        if self.config.gc_interval > 0:
            self._spawn(self._sweep_forever())
        self.log.info("listening on %s", self.socket_path)

    def _lock(self, pid_file: Path) -> None:
        fd = os.open(pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(
                "daemon pid file", str(pid_file),
                f"is held by a daemon that runs already (pid {other or '?'}); stop it first",
            ) from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop`."""
        await self._stopped.wait()
        await self.close()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        """Stop listening and close the control channels. Kernels keep running."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        for task in list(self._tasks):
            task.cancel()
        await self.service.close()
        # Snapshots still being written to disk are finished first (quotas included).
        await asyncio.to_thread(saving.wait_all, snapshots.SAVE_WAIT)
        snapshots.QUOTA_SOURCE = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep_forever(self) -> None:
        """Remove what dead Jupyter servers left, every ``gc_interval`` seconds."""
        while True:
            await asyncio.sleep(self.config.gc_interval)
            try:
                removed = await self.service.runtime.gc()
                await self.service.close_gone_channels()
            except (SandboxError, OSError) as err:
                self.log.warning("the periodic gc failed: %s", err)
                continue
            for line in removed:
                self.log.info("gc removed %s", line)

    # ---- one connection --------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            caller = Caller.of_socket(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        self._connections[caller.uid] += 1
        self._writers.add(writer)
        try:
            if self._connections[caller.uid] > MAX_PER_USER or len(self._writers) > MAX_CONNECTIONS:
                await self._reply(writer, error=_refusal("too many connections; try again"))
                return
            await self._answer(caller, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections[caller.uid] -= 1
            if self._connections[caller.uid] <= 0:
                del self._connections[caller.uid]
            self._writers.discard(writer)
            writer.close()

    async def _answer(
        self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        except ValueError:  # longer than the limit
            await self._reply(writer, error=_refusal(f"a request has at most {MAX_REQUEST} bytes"))
            return
        if not line:
            return
        try:
            request = json.loads(line)
            op, args = request["op"], request.get("args", {})
            if not isinstance(op, str):
                raise TypeError(op)
        except (ValueError, KeyError, TypeError):
            await self._reply(writer, error=_refusal('a request is {"op": NAME, "args": {...}}'))
            return
        if op == "events":
            await self._stream_events(caller, reader, writer)
            return

        def progress(text: str) -> None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(_line({"progress": str(text)}))

        # The work goes on if the client leaves: it is not awaited in this task's
        # cancellation scope, and nothing is left half-done.
        work = asyncio.ensure_future(self.service.call(caller, op, args, progress))
        self._tasks.add(work)
        work.add_done_callback(self._tasks.discard)
        try:
            result = await asyncio.shield(work)
        except SandboxError as err:
            await self._reply(writer, error={"type": type(err).__name__, "message": str(err)})
            return
        except Exception as err:
            self.log.exception("%s by uid %d failed", op, caller.uid)
            message = f"the daemon failed ({type(err).__name__}); its log says more"
            await self._reply(writer, error={"type": "SandboxError", "message": message})
            return
        await self._reply(writer, result=result)

    async def _reply(
        self, writer: asyncio.StreamWriter, result: Any = None, error: dict[str, str] | None = None
    ) -> None:
        reply = {"ok": False, "error": error} if error else {"ok": True, "result": result}
        writer.write(_line(reply))
        await writer.drain()

    async def _stream_events(
        self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Send the caller the events of their kernels (all, for an admin) until they
        close the connection. What they send meanwhile is read and dropped."""
        queue: asyncio.Queue[Event] = asyncio.Queue(MAX_QUEUED_EVENTS)
        admin = self.config.is_admin(caller)

        def listener(event: Event) -> None:
            if admin or event.get("owner_uid") == caller.uid:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(event)

        unsubscribe = self.service.subscribe(listener)
        eof = asyncio.ensure_future(reader.read(4096))
        try:
            writer.write(_line({"ok": True, "result": "streaming"}))
            await writer.drain()
            while True:
                got = asyncio.ensure_future(queue.get())
                await asyncio.wait({got, eof}, return_when=asyncio.FIRST_COMPLETED)
                if eof.done():
                    got.cancel()
                    if not eof.result():
                        return  # the client closed
                    eof = asyncio.ensure_future(reader.read(4096))
                    continue
                writer.write(_line({"event": got.result()}))
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        finally:
            eof.cancel()
            unsubscribe()


def _line(data: Any) -> bytes:
    return json.dumps(data, default=str).encode() + b"\n"


def _refusal(message: str) -> dict[str, str]:
    return {"type": "ConfigError", "message": message}


def _raise_file_limit() -> None:
    """Descriptors for every kernel's control channel and every client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _safe_folder(folder: Path) -> None:
    """Make the socket's folder; refuse one another user could swap or write into.

    Raises:
        ConfigError: the folder is a symlink, not root's, or writable by others.
    """
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise ConfigError(
            "socket folder", str(folder),
            "must be a folder of root's that only root can write (e.g. /run/sandbox-kernel)",
        )  # fmt: skip


def run(config: DaemonConfig, pid_file: Path | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT. Returns the exit
    status. Kernels keep running after it stops."""
    if os.geteuid() != 0:
        raise ConfigError(
            "sandbox-kernel daemon", "", "needs root; run it with sudo or as a service"
        )

    async def main() -> None:
        daemon = Daemon(config)
        await daemon.start(pid_file)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, daemon.stop)
        await daemon.serve_forever()

    asyncio.run(main())
    return 0
