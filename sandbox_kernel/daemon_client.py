"""The daemon's clients: the provisioner (async) and the ``sandbox-kernel`` command.

See ``runtime/daemon.py`` for the wire format. Errors come back as the same
exception classes the runtime raises in-process, with the daemon's message, so a
caller cannot tell the modes apart but by speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from . import errors
from .runtime.ports import DEFAULT_SOCKET

#: Bytes of one reply line the client accepts (a long ``diff`` or listing).
MAX_REPLY = 64 << 20
#: Seconds a call waits for a daemon that is restarting (its socket missing or
#: refusing) before it fails.
RECONNECT_TIMEOUT = 30.0
#: Operations that change nothing: asked again if the daemon died while answering.
IDEMPOTENT = frozenset({"pid", "tend", "ended", "kernels", "logs", "snapshots", "bases",
                        "whoami", "diff"})  # fmt: skip
#: What starts a daemon, for messages.
START_HINT = "sudo sandbox-kernel daemon --detach (or: sudo systemctl start sandbox-kernel)"

_ERRORS: dict[str, type[Exception]] = {}


def _error_classes() -> dict[str, type[Exception]]:
    """The errors a reply may name, by name (made at the first error: the snapshot
    store's module is not needed before)."""
    if not _ERRORS:
        from .runtime import snapshots

        _ERRORS.update({
            cls.__name__: cls
            for cls in (
                errors.SandboxError, errors.ConfigError, errors.CommandError,
                errors.KernelNotFound, errors.KernelStateError, errors.ImageNotFound,
                errors.RequirementMissing, errors.QuotaError, errors.DaemonError,
                snapshots.QuotaExceeded, snapshots.SnapshotNotFound, snapshots.SnapshotCorrupt,
                snapshots.StoreFull,
            )
        })  # fmt: skip
    return _ERRORS


def socket_path() -> str:
    """The daemon's socket: ``$SANDBOX_KERNEL_SOCKET``, else the default."""
    return os.environ.get("SANDBOX_KERNEL_SOCKET") or DEFAULT_SOCKET


def daemon_running(path: str | None = None) -> bool:
    """Whether a daemon's socket is there (it may still refuse a connection)."""
    return os.path.exists(path or socket_path())


def _error(data: object) -> Exception:
    """The exception a reply's ``error`` describes, as the runtime would raise it."""
    if not isinstance(data, dict):
        return errors.DaemonError(f"the daemon sent a malformed error: {data!r:.200}")
    cls = _error_classes().get(str(data.get("type")), errors.SandboxError)
    err = cls.__new__(cls)
    Exception.__init__(err, str(data.get("message", "")))
    return err


def _unreachable(path: str, err: OSError) -> errors.DaemonError:
    return errors.DaemonError(
        f"the sandbox-kernel daemon at {path} cannot be reached ({err.strerror or err}); "
        f"start it: {START_HINT}"
    )


class _Broken(errors.DaemonError):
    """The connection ended before a reply: the daemon died or restarted."""


class _Retry(Exception):
    """A call that may be made again; ``error`` is what to raise if not."""

    def __init__(self, error: errors.DaemonError) -> None:
        self.error = error


class DaemonClient:
    """Calls the daemon at ``path`` (default :func:`socket_path`)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or socket_path()

    def _request(self, op: str, args: dict[str, Any]) -> bytes:
        return json.dumps({"op": op, "args": args}).encode() + b"\n"

    @staticmethod
    def _reply(line: bytes, progress: Callable[[str], None] | None) -> tuple[bool, Any]:
        """(done, result) of one reply line; raises the error it carries."""
        if not line:
            raise _Broken("the daemon closed the connection without a reply")
        try:
            reply = json.loads(line)
        except ValueError:
            raise errors.DaemonError(f"the daemon sent no JSON: {line[:200]!r}") from None
        if "progress" in reply:
            if progress is not None:
                progress(str(reply["progress"]))
            return False, None
        if reply.get("ok"):
            return True, reply.get("result")
        raise _error(reply.get("error"))

    async def call(
        self, op: str, progress: Callable[[str], None] | None = None, **args: Any
    ) -> Any:
        """Carry out ``op`` in the daemon; its result, or the error it raised.

        A daemon that is restarting is waited for up to :data:`RECONNECT_TIMEOUT`
        seconds; an operation that changes nothing is asked again if the daemon
        died while answering it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_TIMEOUT
        delay = 0.02
        while True:
            try:
                return await self._call_once(op, progress, args)
            except _Retry as retry:
                if loop.time() + delay > deadline:
                    raise retry.error from None
            await asyncio.sleep(delay)  # the daemon is restarting: back off, then ask again
            delay = min(delay * 2, 1.0)

    async def _call_once(
        self, op: str, progress: Callable[[str], None] | None, args: dict[str, Any]
    ) -> Any:
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)
        except OSError as err:
            raise _Retry(_unreachable(self.path, err)) from None
        try:
            writer.write(self._request(op, args))
            await writer.drain()
            while True:
                try:
                    line = await reader.readline()
                except ValueError as err:  # a line past MAX_REPLY
                    raise errors.DaemonError(f"the daemon's reply is too long: {err}") from None
                done, result = self._reply(line, progress)
                if done:
                    return result
        except (ConnectionError, _Broken) as err:
            # Only the transport's failures: an error the daemon sent goes to the
            # caller as it is.
            broke = errors.DaemonError(f"the daemon's connection broke during {op}: {err}")
            if op in IDEMPOTENT:
                raise _Retry(broke) from None
            raise broke from None
        finally:
            writer.close()

    def call_sync(
        self,
        op: str,
        progress: Callable[[str], None] | None = None,
        timeout: float | None = None,
        **args: Any,
    ) -> Any:
        """:meth:`call`, blocking (for the command line); ``timeout`` bounds each
        step on the socket, in seconds."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except OSError as err:
                raise _unreachable(self.path, err) from None
            sock.sendall(self._request(op, args))
            with sock.makefile("rb") as replies:
                while True:
                    done, result = self._reply(replies.readline(MAX_REPLY), progress)
                    if done:
                        return result

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The caller's events as they happen, until the caller stops iterating."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)
        except OSError as err:
            raise _unreachable(self.path, err) from None
        try:
            writer.write(self._request("events", {}))
            await writer.drain()
            self._reply(await reader.readline(), None)
            while line := await reader.readline():
                yield json.loads(line)["event"]
        finally:
            writer.close()
