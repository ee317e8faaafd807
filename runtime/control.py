"""The control channel: the runtime's side of ``%container`` in a kernel.

Each kernel gets a small TCP server on the host end of its own veth. Only that
kernel can reach it (the firewall admits a kernel's packets to the control port of
its own veth's address alone), and every request carries an HMAC made with a token
that only that kernel's container can read, a fresh nonce and the time; a forged,
replayed or stale request is refused.

Requests are one JSON object per line; each gets one JSON reply line.

Everything a kernel sends is hostile, and every kernel's server runs in the one
host process, so a kernel must not be able to starve it: a server holds at most
:data:`MAX_CONNECTIONS` connections, reads lines of at most :data:`MAX_LINE` bytes
within a read timeout, and logs its problems at most once per :data:`LOG_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import SandboxError

from .fsutil import write_json
from .limits import Limits
from .network import CONTROL_PORT

#: Requests older or newer than this many seconds are refused.
MAX_SKEW = 120.0
#: Connections one kernel's server holds at once; more are closed unread. The kernel
#: needs one long-lived ``watch`` and a request or two (the firewall's own per-kernel
#: cap, in :func:`~sandbox_kernel.runtime.network.firewall_rules`, is set above this).
MAX_CONNECTIONS = 8
#: Bytes in a request line, newline not counted; a longer line closes the connection.
#: ``magics/channel.py`` refuses to send a longer one (its ``MAX_REQUEST``).
MAX_LINE = 64 * 1024
#: Seconds a connection may take to send a whole request line (or to take a reply)
#: before it is closed; a ``watch`` is held open past it.
READ_TIMEOUT = 10.0
#: Seconds between two log lines about one kernel's bad requests; those in between
#: are counted, and the count goes with the next line.
LOG_INTERVAL = 60.0
#: Bytes a ``watch`` reads at a time, to drop whatever the kernel sends on it.
WATCH_CHUNK = 4096
#: Characters of a nonce; the kernel's are 32.
MAX_NONCE = 128
#: Remembered nonces, newest kept.
_MAX_NONCES = 4096
#: Characters of a problem put in the log: it may quote what a kernel sent.
_MAX_LOGGED = 300


def sign(token: str, request: dict[str, Any]) -> str:
    """The HMAC-SHA256 of a request (all its fields but ``mac``) under ``token``."""
    body = json.dumps({k: v for k, v in request.items() if k != "mac"}, sort_keys=True)
    return hmac.new(bytes.fromhex(token), body.encode(), hashlib.sha256).hexdigest()


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


def _is_recent(sent: Any) -> bool:
    """Whether ``sent`` is a time (seconds since the epoch) within :data:`MAX_SKEW` of now.

    NaN must be refused by name: every comparison with it is false, so it would
    never look stale. Infinity and ints too large for a float are no times either.
    """
    if isinstance(sent, bool) or not isinstance(sent, int | float):
        return False
    try:
        seconds = float(sent)
    except OverflowError:
        return False
    return math.isfinite(seconds) and abs(time.time() - seconds) <= MAX_SKEW


def _refusal(problem: str) -> dict[str, Any]:
    """The reply to a request refused for ``problem``."""
    return {"ok": False, "error": f"refused: {problem}"}


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
        runtime: Any,
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
        self.pending: dict[str, Any] | None = None
        #: Set at the first request that passes the checks: the kernel process holds
        #: this server's credentials (a kernel restored from a base learns them
        #: after its restore; see ``bases.py``).
        self.heard = asyncio.Event()
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._quiet_until = 0.0  # time.monotonic() before which problems are only counted
        self._unlogged = 0

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

    def check(self, request: dict[str, Any], peer: str) -> str | None:
        """Why ``request`` from ``peer`` must be refused, or None if it is good."""
        if peer != self.peer:
            return f"requests are only taken from this kernel ({self.peer}), not {peer}"
        mac = request.get("mac")
        # compare_digest raises TypeError on a str that is not ASCII.
        if (
            not isinstance(mac, str)
            or not mac.isascii()
            or not hmac.compare_digest(mac, sign(self.token, request))
        ):
            return "the request's signature is wrong"
        if request.get("kernel_id") != self.kernel_id:
            return "the request names another kernel"
        if not _is_recent(request.get("time")):
            return "the request is stale"
        if not isinstance(request.get("op"), str):
            kind = type(request.get("op")).__name__
            return f'the request\'s op must be a string such as "list", not {kind}'
        if not isinstance(request.get("args", {}), dict):
            return "the request's args must be a JSON object"
        nonce = request.get("nonce")
        if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE:
            return f"the request's nonce must be a string of 1-{MAX_NONCE} characters"
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
                    reply = {
                        "ok": False,
                        "error": f"the runtime failed on this request ({type(err).__name__}); "
                        "the Jupyter server's log has the details",
                    }
                if reply is None:
                    break  # a watch, held until the kernel closed it
                writer.write(json.dumps(reply).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the kernel was restored or killed mid-request
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
        problem: str | None
        try:
            request = json.loads(line)
        except RecursionError:
            problem = "the request is nested too deeply"
        except ValueError as err:  # UnicodeDecodeError too
            problem = f"the request is not JSON ({err})"
        else:
            problem = (
                self.check(request, peer)
                if isinstance(request, dict)
                else f"a request is a JSON object, not {type(request).__name__}"
            )
        if problem:
            self._complain(f"refused a request: {problem}")
            return _refusal(problem)
        self.heard.set()
        op: str = request["op"]
        if op == "watch":
            # Held open and never answered: the kernel learns it was restored when
            # CRIU closes this connection in its image. What the kernel sends on it
            # meanwhile is dropped, a chunk at a time, so that it is never buffered.
            while await reader.read(WATCH_CHUNK):
                pass
            return None

        def progress(text: str) -> None:
            writer.write(json.dumps({"progress": text}).encode() + b"\n")

        try:
            result = await self.handle(op, request.get("args", {}), progress)
        except SandboxError as err:
            return {"ok": False, "error": str(err)}
        except (ValueError, KeyError, TypeError) as err:
            self._complain(f"a bad {op!r} request: {err!r}")
            return {"ok": False, "error": str(err)}
        return {"ok": True, "result": result}

    async def handle(
        self, op: str, args: dict[str, Any], progress: Callable[[str], None] | None = None
    ) -> Any:
        """Carry out one checked request; ``progress`` gets lines for the user."""
        runtime, kid = self.runtime, self.kernel_id
        if op == "snapshot":
            return await runtime.snapshot(
                kid, args["name"], args.get("message", ""), progress=progress
            )
        if op == "restore":
            # Set before the restore: the restored process asks for it at once.
            info = {"kind": "restore", **args}
            self.pending = info
            try:
                done = await runtime.restore(kid, args["name"])
            except BaseException:
                if self.pending is info:
                    self.pending = None
                raise
            await self.on_new_process(done["pid"])
            return done
        if op == "reset":
            self.pending = {"kind": "reset", **args}
            done = await runtime.reset(kid)
            await self.on_new_process(done["pid"])
            return done
        if op == "resume":
            pending, self.pending = self.pending, None
            return pending
        # A kernel sees and acts on the snapshots it may restore, no others: the same
        # owner, image and working folder (snapshots.visible_to).
        if op == "list":
            return await asyncio.to_thread(runtime.snapshot_listing, kid)
        if op == "delete":
            # It may wait for a lazy restore's page server: not on the server's loop.
            await asyncio.to_thread(runtime.delete_snapshot, kid, args["name"])
            return None
        if op == "diff":
            return await asyncio.to_thread(runtime.diff, kid, args.get("name"))
        if op == "limits":
            change = Limits.parse(**{k: args.get(k) for k in ("memory", "cpus", "pids")})
            if change != Limits():
                # Never above the kernelspec's ceiling: the kernel is no operator.
                await runtime.update_limits(kid, change, operator=False)
            return runtime.record(kid)["limits"]
        if op == "status":
            use = runtime.usage(kid)
            listed = await asyncio.to_thread(runtime.snapshot_listing, kid)
            return {
                "usage": None if use is None else use.__dict__,
                "limits": runtime.record(kid)["limits"],
                "snapshots": len(listed["snapshots"]),
                "snapshot_bytes": sum(
                    m["memory_bytes"] + m["file_bytes"] for m in listed["snapshots"]
                ),
                "store": listed["store"],
                "current": runtime.record(kid).get("snapshot"),
            }
        raise ValueError(f"unknown operation {op!r}")
