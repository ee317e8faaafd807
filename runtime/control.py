"""The control channel: the runtime's side of ``%container`` in a kernel.

Each kernel gets a small TCP server on the host end of its own veth. Only that
kernel can reach it (the firewall admits a kernel's packets to the control port of
its own veth's address alone), and every request carries an HMAC made with a token
that only that kernel's container can read, a fresh nonce and the time; a forged,
replayed or stale request is refused. The wire format and its checks are in
:mod:`sandbox_kernel.protocol`, shared with the magic.

Requests are one JSON object per line; each gets one JSON reply line.

Everything a kernel sends is hostile, and every kernel's server runs in the one
host process, so a kernel must not be able to starve it: a server holds at most
:data:`MAX_CONNECTIONS` connections, reads lines of at most :data:`MAX_LINE` bytes
within a read timeout, and logs its problems at most once per :data:`LOG_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from sandbox_kernel import protocol
from sandbox_kernel.errors import ConfigError, SandboxError
from sandbox_kernel.protocol import CLASS_ACTIONS, MAX_LINE, MAX_NONCE, MAX_SKEW, sign

from . import snapshots
from .cgroups import Usage
from .fsutil import write_json
from .limits import Limits
from .network import CONTROL_PORT
from .record import KernelRecord

#: Connections one kernel's server holds at once; more are closed unread. The kernel
#: needs one long-lived ``watch`` and a request or two (the firewall's own per-kernel
#: cap, in :func:`~sandbox_kernel.runtime.network.firewall_rules`, is set above this).
MAX_CONNECTIONS = 8
#: Seconds a connection may take to send a whole request line (or to take a reply)
#: before it is closed; a ``watch`` is held open past it.
READ_TIMEOUT = 10.0
#: Seconds between two log lines about one kernel's bad requests; those in between
#: are counted, and the count goes with the next line.
LOG_INTERVAL = 60.0
#: Bytes a ``watch`` reads at a time, to drop whatever the kernel sends on it.
WATCH_CHUNK = 4096
#: Remembered nonces, newest kept.
_MAX_NONCES = 4096
#: Characters of a problem put in the log: it may quote what a kernel sent.
_MAX_LOGGED = 300

__all__ = [
    "LOG_INTERVAL",
    "MAX_CONNECTIONS",
    "MAX_LINE",
    "MAX_NONCE",
    "MAX_SKEW",
    "READ_TIMEOUT",
    "ControlServer",
    "ControlledRuntime",
    "sign",
    "write_credentials",
]

Progress = Callable[[str], None]


class ControlledRuntime(Protocol):
    """What the control server asks of the runtime (the real one is
    :class:`~sandbox_kernel.runtime.Runtime`); each call names the kernel first.
    Failures the kernel may be told of are :class:`SandboxError`; any other
    exception is logged, and the kernel learns only its type."""

    async def snapshot(
        self, kernel_id: str, name: str, message: str = "", /, *, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Snapshot the kernel as ``name``; the snapshot's meta."""
        ...

    async def restore(self, kernel_id: str, name: str, /) -> dict[str, Any]:
        """Restore snapshot ``name`` in place: ``{"pid", "mode", "reason", "name"}``."""
        ...

    async def reset(self, kernel_id: str, pristine: bool = False, /) -> dict[str, Any]:
        """Restart on the base (a class kernel) or, ``pristine``, the image's files:
        ``{"pid", "to", "note"}``."""
        ...

    def snapshot_listing(self, kernel_id: str, /) -> dict[str, Any]:
        """``{"snapshots": [meta, ...], "store": {...}}``; may block on the disk."""
        ...

    def delete_snapshot(self, kernel_id: str, name: str, /) -> None:
        """Delete a snapshot the kernel may see; may block on a page server."""
        ...

    def diff(self, kernel_id: str, name: str | None = None, /) -> dict[str, Any]:
        """Files added, changed and deleted since a snapshot; may block on the disk."""
        ...

    async def update_limits(
        self, kernel_id: str, limits: Limits, /, operator: bool = False
    ) -> Limits:
        """Change the limits ``limits`` sets, within the ceiling unless ``operator``."""
        ...

    def usage(self, kernel_id: str, /) -> Usage | None:
        """What the kernel uses now; None if its container is gone."""
        ...

    def record(self, kernel_id: str, /) -> KernelRecord:
        """The kernel's record."""
        ...

    async def checkpoint(self, kernel_id: str, cell: int, next_count: int, line: str, /) -> Any:
        """Checkpoint the idle kernel after cell ``cell`` (see ``timetravel.py``)."""
        ...

    async def autosave(self, kernel_id: str, state: str | None, /) -> dict[str, Any]:
        """Turn autosave on or off (None: leave it); its state."""
        ...

    async def name_latest(
        self, kernel_id: str, name: str, message: str, next_count: int, /
    ) -> dict[str, Any] | None:
        """Keep the checkpoint just taken as snapshot ``name``, or None if the kernel
        may have changed since."""
        ...

    def history(self, kernel_id: str, /) -> dict[str, Any]:
        """The kernel's checkpoints; may block on the disk."""
        ...

    def undo_target(
        self, kernel_id: str, n: int | None, to: int | None, next_count: int | None, /
    ) -> tuple[str, int]:
        """The checkpoint an undo restores, and the cell it is the state before."""
        ...


def write_credentials(run_dir: Path, host: str, kernel_id: str, uid: int, gid: int) -> str:
    """Write the kernel's control credentials (mode 0400, the kernel's user); return the token.

    The file appears inside the container as /run/sandbox/control.json.
    """
    token = secrets.token_hex(32)
    path = run_dir / "control.json"
    path.unlink(missing_ok=True)
    write_json(
        path,
        {"host": host, "port": CONTROL_PORT, "token": token, "kernel_id": kernel_id},
        mode=0o400,
    )
    os.chown(path, uid, gid)
    return token


#: A method that carries out one operation: (args, progress) -> result.
Handler = Callable[[dict[str, Any], Progress | None], Awaitable[Any]]


class ControlServer:
    """Serves one kernel's requests. Made and closed by the provisioner.

    ``runtime`` does the work; ``on_new_process`` is called with the pid of the
    kernel's new init after a restore or reset, so the provisioner follows it.
    ``port`` is where to listen on ``host`` (0 picks a free port, for tests; the
    port taken is in :attr:`port` after :meth:`start`); ``read_timeout`` is
    :data:`READ_TIMEOUT`, in seconds; ``log`` gets this kernel's problems, at most
    one line per :data:`LOG_INTERVAL`.
    """

    def __init__(
        self,
        runtime: ControlledRuntime,
        kernel_id: str,
        host: str,
        peer: str,
        token: str,
        on_new_process: Callable[[int], Awaitable[None]],
        *,
        port: int = CONTROL_PORT,
        read_timeout: float = READ_TIMEOUT,
        log: logging.Logger | None = None,
    ) -> None:
        self.runtime = runtime
        self.kernel_id = kernel_id
        self.host = host
        self.port = port
        self.peer = peer
        self.token = token
        self.on_new_process = on_new_process
        self.read_timeout = read_timeout
        self.log = log if log is not None else logging.getLogger("sandbox_kernel.control")
        #: The restore or reset the kernel's next process must finish (``resume``).
        self.pending: dict[str, Any] | None = None
        #: What every new process of this kernel (a start, restart or reset onto a
        #: pristine base) is told with its ``resume``: its folder and environment.
        self.arrival: dict[str, Any] = {}
        #: Set at the first ``watch`` that passes the checks: the kernel process holds
        #: this server's credentials (a kernel restored from a base learns them
        #: after its restore; see ``bases.py``), and has numbered its cells afresh
        #: (it asks ``resume`` first; see the magic's handoff).
        self.heard = asyncio.Event()
        #: A pool kernel's: set when a start claims it (see ``pool.py``); its process
        #: waits in ``claimed`` until then, and ``asked`` is set once it does.
        self.claim: asyncio.Future[None] | None = None
        self.asked = asyncio.Event()
        self._handlers = self._dispatch_table()
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._quiet_until = 0.0  # time.monotonic() before which problems are only counted
        self._unlogged = 0

    def _dispatch_table(self) -> dict[str, Handler]:
        """The handler of each answered operation of :data:`protocol.OPS`: the method
        ``_op_<name>``. Built from the protocol's table, so that an operation cannot
        be known to one side only; a missing method fails here, at once."""
        return {
            name: getattr(self, f"_op_{name}") for name, op in protocol.OPS.items() if op.answered
        }

    @property
    def listening(self) -> bool:
        """Whether :meth:`start` has run and :meth:`close` has not."""
        return self._server is not None

    @property
    def connections(self) -> int:
        """How many connections are open now (at most :data:`MAX_CONNECTIONS`)."""
        return len(self._writers)

    async def start(self) -> None:
        """Listen on ``host``:``port``, the host end of the kernel's veth.

        Raises:
            OSError: the address cannot be bound (the veth is gone, or the port taken).
        """
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self.claim is not None and not self.claim.done():
            self.claim.cancel()  # a pool kernel's wait ends
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None
        if self._unlogged:
            self.log.warning(
                "kernel %s: more problems on the control channel since the last one logged: %d",
                self.kernel_id, self._unlogged,
            )  # fmt: skip
            self._unlogged = 0

    def check(self, request: object, peer: str) -> str | None:
        """Why ``request`` (parsed JSON) from ``peer`` must be refused, or None if it
        is good (its nonce is then remembered: the same request is refused next time).
        See :func:`protocol.check_request` for the checks besides the peer and replay."""
        if peer != self.peer:
            return f"requests are only taken from this kernel ({self.peer}), not {peer}"
        problem = protocol.check_request(request, token=self.token, kernel_id=self.kernel_id)
        if problem is not None:
            return problem
        assert isinstance(request, dict)  # checked by check_request
        nonce: str = request["nonce"]
        if nonce in self._nonces:
            return "the request was replayed"
        self._nonces[nonce] = time.time()
        while len(self._nonces) > _MAX_NONCES:
            self._nonces.popitem(last=False)
        return None

    def _complain(self, problem: str, error: BaseException | None = None) -> None:
        """Log ``problem`` (with ``error``'s traceback), or only count it if this kernel's
        last problem was logged less than :data:`LOG_INTERVAL` seconds ago.

        Called for every bad, refused or failed request and every connection closed
        for misbehaving: a kernel can make one per request, so one line each would let
        it fill the host's log.
        """
        now = time.monotonic()
        if now < self._quiet_until:
            self._unlogged += 1
            return
        if len(problem) > _MAX_LOGGED:
            problem = problem[:_MAX_LOGGED] + "..."
        more = f" (and {self._unlogged} more since the last one logged)" if self._unlogged else ""
        level = logging.WARNING if error is None else logging.ERROR
        self.log.log(level, "kernel %s: %s%s", self.kernel_id, problem, more, exc_info=error)
        self._quiet_until = now + LOG_INTERVAL
        self._unlogged = 0

    # ---- connections ----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection, a request per line, until it closes, breaks, idles or
        misbehaves. Called by asyncio for each connection accepted; never raises."""
        if len(self._writers) >= MAX_CONNECTIONS:
            # Closed before a byte is read: each connection holds a file descriptor
            # and a buffer of the host process, which all kernels share.
            writer.close()
            self._complain(f"closed a new connection: {MAX_CONNECTIONS} are open already")
            return
        self._writers.add(writer)
        try:
            peername = writer.get_extra_info("peername")
            peer = str(peername[0]) if peername else "an unknown address"
            while line := await self._read_line(reader):
                try:
                    reply = await self._answer(line, peer, reader, writer)
                except (ConnectionError, asyncio.IncompleteReadError):
                    raise
                except Exception as err:
                    # The kernel learns only the kind of failure: the text may
                    # name host paths. The log has it all (or counts it).
                    self._complain("a request failed", err)
                    reply = protocol.error(
                        f"the runtime failed on this request ({type(err).__name__}); "
                        "the Jupyter server's log has the details"
                    )
                if reply is None:
                    break  # a watch, held until the kernel closed it
                writer.write(protocol.encode(reply))
                await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the kernel was restored or killed mid-request
        except asyncio.CancelledError:
            # The loop ends (a server's exit) under a request still waiting (a pool
            # kernel's ``claimed``): this connection's task ends here, quietly.
            pass
        except TimeoutError:
            self._complain(f"closed a connection that took no reply for {self.read_timeout:g} s")
        except Exception as err:
            self._complain("a connection failed", err)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes:
        """The next request line, or b"" if the connection is to be closed: at its
        end, after :attr:`read_timeout` without a whole line, or at a line longer
        than :data:`MAX_LINE` (whose bytes the reader has dropped)."""
        try:
            return await asyncio.wait_for(reader.readline(), self.read_timeout)
        except TimeoutError:
            self._complain(
                f"closed a connection that sent no whole request in {self.read_timeout:g} s"
            )
        except (ValueError, asyncio.LimitOverrunError):
            self._complain(f"closed a connection that sent a line over {MAX_LINE} bytes")
        return b""

    async def _answer(
        self,
        line: bytes,
        peer: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> dict[str, Any] | None:
        """The reply to request ``line`` from ``peer``, or None for a ``watch``, which
        is answered by holding the connection until the kernel closes it.

        Raises:
            ConnectionError: the connection broke. Anything else raised is a fault
                of the runtime's; :meth:`_serve` replies and logs it.
        """
        request, problem = protocol.parse_request(line)
        if problem is None:
            problem = self.check(request, peer)
        if problem:
            self._complain(f"refused a request: {problem}")
            return protocol.refusal(problem)
        op: str = request["op"]
        if not protocol.OPS[op].answered:
            self.heard.set()
            # Held open and never answered: the kernel learns it was restored when
            # CRIU closes this connection in its image. What the kernel sends on it
            # meanwhile is dropped, a chunk at a time, so that it is never buffered.
            while await reader.read(WATCH_CHUNK):
                pass
            return None

        def progress(text: str) -> None:
            writer.write(protocol.encode(protocol.progress(text)))

        try:
            result = await self.handle(op, request.get("args", {}), progress)
        except SandboxError as err:
            return protocol.error(str(err))
        except (ValueError, KeyError, TypeError) as err:
            self._complain(f"a bad {op!r} request: {err!r}")
            return protocol.error(str(err))
        return protocol.ok(result)

    # ---- operations ------------------------------------------------------------------

    async def handle(self, op: str, args: dict[str, Any], progress: Progress | None = None) -> Any:
        """Carry out one checked request (see :meth:`check`); ``progress`` gets lines
        for the user.

        Raises:
            ValueError: ``op`` is no operation this server carries out.
            SandboxError: the runtime refused (the message is for the kernel).
        """
        handler = self._handlers.get(op)
        if handler is None:
            raise ValueError(f"unknown operation {op!r}")
        return await handler(args, progress)

    async def _op_snapshot(self, args: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        snapshots.check_user_name(args["name"])
        if args.get("count") is not None:
            named = await self.runtime.name_latest(
                self.kernel_id, args["name"], args.get("message") or "", args["count"]
            )
            if named is not None:
                return named
        return await self.runtime.snapshot(
            self.kernel_id, args["name"], args.get("message") or "", progress=progress
        )

    async def _op_restore(self, args: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        # Set before the restore: the restored process asks for it at once.
        info = {**args, "kind": "restore"}
        self.pending = info
        try:
            done = await self.runtime.restore(self.kernel_id, args["name"])
        except BaseException:
            if self.pending is info:
                self.pending = None
            raise
        await self.on_new_process(done["pid"])
        return done

    async def _op_reset(self, args: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        self.pending = {**args, "kind": "reset"}
        done = await self.runtime.reset(self.kernel_id, bool(args.get("pristine")))
        await self.on_new_process(done["pid"])
        return done

    async def _op_resume(
        self, args: dict[str, Any], progress: Progress | None
    ) -> dict[str, Any] | None:
        if self.claim is not None and not self.claim.done():
            return {"kind": "pool"}  # it asks ``claimed`` next, and waits there
        pending, self.pending = self.pending, None
        if pending is not None and pending.get("kind") != "restore":
            pending = {**self.arrival, **pending}
        return pending

    async def _op_checkpoint(self, args: dict[str, Any], progress: Progress | None) -> Any:
        return await self.runtime.checkpoint(
            self.kernel_id, args["cell"], args["next"], args["line"]
        )

    async def _op_autosave(self, args: dict[str, Any], progress: Progress | None) -> Any:
        return await self.runtime.autosave(self.kernel_id, args.get("state"))

    async def _op_history(self, args: dict[str, Any], progress: Progress | None) -> Any:
        return await asyncio.to_thread(self.runtime.history, self.kernel_id)

    async def _op_undo(self, args: dict[str, Any], progress: Progress | None) -> Any:
        name, before = await asyncio.to_thread(
            self.runtime.undo_target, self.kernel_id, args.get("n"), args.get("to"),
            args.get("count"),
        )  # fmt: skip
        return await self._op_restore({**args, "name": name, "undo": before}, progress)

    async def _op_claimed(
        self, args: dict[str, Any], progress: Progress | None
    ) -> dict[str, Any] | None:
        """A pool kernel's wait: answered when a start claims it, with what its
        ``resume`` would have said (its new folder, environment and numbering)."""
        claim = self.claim
        if claim is None:
            return None
        self.asked.set()
        try:
            await asyncio.shield(claim)
        except asyncio.CancelledError:
            if claim.cancelled():  # the server closes: the kernel is being removed
                return None
            raise
        return await self._op_resume(args, progress)

    # A kernel sees and acts on the snapshots it may restore, no others: the same
    # owner, image and working folder (snapshots.visible_to).

    async def _op_list(self, args: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        return await asyncio.to_thread(self.runtime.snapshot_listing, self.kernel_id)

    async def _op_delete(self, args: dict[str, Any], progress: Progress | None) -> None:
        # It may wait for a lazy restore's page server: not on the server's loop.
        await asyncio.to_thread(self.runtime.delete_snapshot, self.kernel_id, args["name"])

    async def _op_diff(self, args: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        return await asyncio.to_thread(self.runtime.diff, self.kernel_id, args.get("name"))

    async def _op_limits(self, args: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        change = Limits.parse(**{k: args.get(k) for k in ("memory", "cpus", "pids")})
        if change != Limits():
            # Never above the kernelspec's ceiling: the kernel is no operator.
            await self.runtime.update_limits(self.kernel_id, change, operator=False)
        return self.runtime.record(self.kernel_id).limits.to_dict()

    async def _op_class(self, args: dict[str, Any], progress: Progress | None) -> Any:
        # As the kernel's owner, through the service's own checks (a runtime of a
        # process without one, e.g. a test's, has no classes).
        call = getattr(self.runtime, "class_call", None)
        if call is None:
            raise ConfigError("%container class", args["action"], "needs the kernel service")
        action = args["action"]
        if action not in CLASS_ACTIONS:
            raise ConfigError(
                "%container class", action, f"is not an action; use {', '.join(CLASS_ACTIONS)}"
            )
        fields = {k: args[k] for k in ("name", "snapshot") if args.get(k) is not None}
        return await call(self.kernel_id, f"class_{action}", fields)

    async def _op_status(self, args: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        use = self.runtime.usage(self.kernel_id)
        listed = await asyncio.to_thread(self.runtime.snapshot_listing, self.kernel_id)
        record = self.runtime.record(self.kernel_id)
        return {
            "usage": None if use is None else dataclasses.asdict(use),
            "limits": record.limits.to_dict(),
            "snapshots": len(listed["snapshots"]),
            "snapshot_bytes": sum(m["memory_bytes"] + m["file_bytes"] for m in listed["snapshots"]),
            "store": listed["store"],
            "current": record.snapshot,
            "last_exit": record.extra.get("last_exit"),
            # For the panel's timeline: whether its checkpoints changed.
            "autosave": bool(record.extra.get("autosave")),
            "checkpoints": [c["name"] for c in record.extra.get("checkpoints") or []],
        }
