"""The control channel: the runtime's side of ``%container`` in a kernel.

Each kernel gets a small TCP server on the host end of its own veth. Only that
kernel can reach it (the firewall admits a kernel's packets to the control port of
its own veth's address alone), and every request carries an HMAC made with a token
that only that kernel's container can read, a fresh nonce and the time; a forged,
replayed or stale request is refused.

Requests are one JSON object per line; each gets one JSON reply line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import SandboxError

from . import snapshots
from .fsutil import write_json
from .limits import Limits
from .network import CONTROL_PORT

#: Requests older or newer than this many seconds are refused.
MAX_SKEW = 120.0
_MAX_LINE = 1 << 20


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


class ControlServer:
    """Serves one kernel's requests. Made and closed by the provisioner.

    ``runtime`` does the work; ``on_new_process`` is called with the pid of the
    kernel's new init after a restore or reset, so the provisioner follows it.
    """

    def __init__(
        self,
        runtime: Any,
        kernel_id: str,
        host: str,
        peer: str,
        token: str,
        on_new_process: Callable[[int], Awaitable[None]],
    ) -> None:
        self.runtime = runtime
        self.kernel_id = kernel_id
        self.host = host
        self.peer = peer
        self.token = token
        self.on_new_process = on_new_process
        self.pending: dict[str, Any] | None = None
        #: Set at the first request that passes the checks: the kernel process holds
        #: this server's credentials (a kernel restored from a base learns them
        #: after its restore; see ``bases.py``).
        self.heard = asyncio.Event()
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def listening(self) -> bool:
        """Whether :meth:`start` has run and :meth:`close` has not."""
        return self._server is not None

    async def start(self) -> None:
        """Listen on the host end of the kernel's veth."""
        self._server = await asyncio.start_server(
            self._serve, self.host, CONTROL_PORT, limit=_MAX_LINE
        )

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    def check(self, request: dict[str, Any], peer: str) -> str | None:
        """Why ``request`` from ``peer`` must be refused, or None if it is good."""
        if peer != self.peer:
            return f"requests are only taken from this kernel ({self.peer}), not {peer}"
        mac = request.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, sign(self.token, request)):
            return "the request's signature is wrong"
        if request.get("kernel_id") != self.kernel_id:
            return "the request names another kernel"
        sent = request.get("time")
        if not isinstance(sent, int | float) or abs(time.time() - sent) > MAX_SKEW:
            return "the request is stale"
        nonce = request.get("nonce")
        if not isinstance(nonce, str) or nonce in self._nonces:
            return "the request was replayed"
        self._nonces[nonce] = time.time()
        while len(self._nonces) > 4096:
            self._nonces.popitem(last=False)
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    problem = self.check(request, peer)
                    if not problem:
                        self.heard.set()
                    if problem:
                        reply: dict[str, Any] = {"ok": False, "error": f"refused: {problem}"}
                    elif request["op"] == "watch":
                        # Held open and never answered: the kernel learns it was
                        # restored when CRIU closes this connection in its image.
                        await reader.read()
                        break
                    else:

                        def progress(text: str, out: asyncio.StreamWriter = writer) -> None:
                            out.write(json.dumps({"progress": text}).encode() + b"\n")

                        result = await self.handle(request["op"], request.get("args", {}), progress)
                        reply = {"ok": True, "result": result}
                except (SandboxError, ValueError, KeyError, TypeError) as err:
                    reply = {"ok": False, "error": str(err)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the kernel was restored or killed mid-request
        finally:
            self._writers.discard(writer)
            writer.close()

    async def handle(
        self, op: str, args: dict[str, Any], progress: Callable[[str], None] | None = None
    ) -> Any:
        """Carry out one checked request; ``progress`` gets lines for the user."""
        runtime, kid = self.runtime, self.kernel_id
        owner = str(runtime.record(kid)["uid"])
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
        if op == "list":
            return snapshots.listing(owner)
        if op == "delete":
            # It may wait for a lazy restore's page server: not on the server's loop.
            await asyncio.to_thread(snapshots.delete, owner, args["name"])
            return None
        if op == "diff":
            return await asyncio.to_thread(runtime.diff, kid, args.get("name"))
        if op == "limits":
            change = Limits.parse(**{k: args.get(k) for k in ("memory", "cpus", "pids")})
            if change != Limits():
                await runtime.update_limits(kid, change)
            return runtime.record(kid)["limits"]
        if op == "status":
            use = runtime.usage(kid)
            metas = snapshots.listing(owner)
            return {
                "usage": None if use is None else use.__dict__,
                "limits": runtime.record(kid)["limits"],
                "snapshots": len(metas),
                "snapshot_bytes": sum(m["memory_bytes"] + m["file_bytes"] for m in metas),
                "current": runtime.record(kid).get("snapshot"),
            }
        raise ValueError(f"unknown operation {op!r}")
