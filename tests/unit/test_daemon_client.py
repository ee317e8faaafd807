"""The daemon's client against a fake daemon on a unix socket: replies, progress,
errors as the runtime's own exceptions, reconnecting, ``call_sync`` and ``events``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import daemon_client, errors
from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.runtime import snapshots

DONE = {"ok": True, "result": {"uid": 1000}}


def encode(reply: Any) -> bytes:
    """One reply line: bytes as they are, anything else as JSON."""
    return reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\n"


class FakeDaemon:
    """Answers its n-th connection with the n-th script of replies, then closes it."""

    def __init__(self, path: Path, *scripts: list[Any]) -> None:
        self.path = str(path)
        self.scripts = list(scripts)
        self.requests: list[dict[str, Any]] = []
        self.handlers: list[asyncio.Task[Any]] = []
        self.server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        self.requests.append(json.loads(await reader.readline()))
        for reply in self.scripts[len(self.requests) - 1]:
            writer.write(encode(reply))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, self.path)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)
        await asyncio.wait_for(asyncio.gather(*self.handlers), 5)  # raises what they raised

    async def __aenter__(self) -> FakeDaemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@contextlib.contextmanager
def sync_daemon(path: Path, replies: list[Any]) -> Iterator[list[dict[str, Any]]]:
    """A one-connection daemon in a thread, for ``call_sync``; yields the requests it got."""
    requests: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(5)  # accept() gives up rather than hang

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            requests.append(json.loads(lines.readline()))
            conn.sendall(b"".join(map(encode, replies)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        thread.join(5)
        server.close()
        assert not thread.is_alive()


async def test_call_returns_the_result_and_sends_op_and_args(tmp_path: Path) -> None:
    """The request is one JSON line of the op and its keyword arguments."""
    async with FakeDaemon(tmp_path / "d.sock", [DONE]) as fake:
        result = await asyncio.wait_for(DaemonClient(fake.path).call("whoami", a=1, b="x"), 5)
    assert result == {"uid": 1000}
    assert fake.requests == [{"op": "whoami", "args": {"a": 1, "b": "x"}}]


async def test_progress_reaches_the_callback_in_order(tmp_path: Path) -> None:
    """Progress lines go to the callback, one by one, before the result returns."""
    seen: list[str] = []
    script = [{"progress": "one"}, {"progress": "two"}, {"progress": "three"}, DONE]
    async with FakeDaemon(tmp_path / "d.sock", script) as fake:
        call = DaemonClient(fake.path).call("snapshot", progress=seen.append, name="s")
        assert await asyncio.wait_for(call, 5) == {"uid": 1000}
    assert seen == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ConfigError", errors.ConfigError),
        ("KernelNotFound", errors.KernelNotFound),
        ("QuotaError", errors.QuotaError),
        ("QuotaExceeded", snapshots.QuotaExceeded),
        ("NoSuchErrorType", errors.SandboxError),
    ],
)
async def test_error_reply_raises_its_class(tmp_path: Path, name: str, cls: type) -> None:
    """An error comes back as the runtime's class, with exactly the daemon's message."""
    message = f"{name}: something went wrong, fix it"
    error = {"ok": False, "error": {"type": name, "message": message}}
    async with FakeDaemon(tmp_path / "d.sock", [error]) as fake:
        with pytest.raises(errors.SandboxError) as caught:
            await asyncio.wait_for(DaemonClient(fake.path).call("snapshot"), 5)
    assert type(caught.value) is cls
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "reply", [{"ok": False, "error": "not a dict"}, b"this is no JSON\n"], ids=["error", "json"]
)
async def test_malformed_reply_raises_daemon_error(tmp_path: Path, reply: Any) -> None:
    """An error that is not a dict, or a line that is not JSON, is a DaemonError."""
    async with FakeDaemon(tmp_path / "d.sock", [reply]) as fake:
        with pytest.raises(errors.DaemonError):
            await asyncio.wait_for(DaemonClient(fake.path).call("snapshot"), 5)
    assert len(fake.requests) == 1


async def test_no_reply_to_a_changing_op_fails_at_once(tmp_path: Path) -> None:
    """A daemon that dies during a snapshot is not asked again: it may have taken it."""
    async with FakeDaemon(tmp_path / "d.sock", []) as fake:
        with pytest.raises(errors.DaemonError, match="snapshot"):
            await asyncio.wait_for(DaemonClient(fake.path).call("snapshot", name="s"), 2)
    assert fake.requests == [{"op": "snapshot", "args": {"name": "s"}}]


async def test_no_reply_to_an_idempotent_op_is_asked_again(tmp_path: Path) -> None:
    """A daemon that dies while answering ``pid`` is asked again, and its answer used."""
    async with FakeDaemon(tmp_path / "d.sock", [], [{"ok": True, "result": 42}]) as fake:
        assert await asyncio.wait_for(DaemonClient(fake.path).call("pid", kernel="k"), 5) == 42
    assert fake.requests == [{"op": "pid", "args": {"kernel": "k"}}] * 2


async def test_missing_socket_is_waited_for_then_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No socket within the timeout: the error names it and how to start the daemon."""
    monkeypatch.setattr(daemon_client, "RECONNECT_TIMEOUT", 0.5)
    path = tmp_path / "absent.sock"
    with pytest.raises(errors.DaemonError) as caught:
        await asyncio.wait_for(DaemonClient(str(path)).call("whoami"), 5)
    assert str(path) in str(caught.value)
    assert "sudo sandbox-kernel daemon --detach" in str(caught.value)


async def test_socket_that_appears_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that starts while the call waits answers it."""
    monkeypatch.setattr(daemon_client, "RECONNECT_TIMEOUT", 5.0)
    fake = FakeDaemon(tmp_path / "d.sock", [DONE])

    async def start_later() -> None:
        await asyncio.sleep(0.1)
        await fake.start()

    starter = asyncio.create_task(start_later())
    try:
        assert await asyncio.wait_for(DaemonClient(fake.path).call("whoami"), 5) == DONE["result"]
    finally:
        await asyncio.wait_for(starter, 5)
        await fake.stop()
    assert fake.requests == [{"op": "whoami", "args": {}}]


def test_call_sync_result_and_progress(tmp_path: Path) -> None:
    """``call_sync`` sends the same request and reports progress before the result."""
    seen: list[str] = []
    path = tmp_path / "d.sock"
    with sync_daemon(path, [{"progress": "a"}, {"progress": "b"}, DONE]) as requests:
        result = DaemonClient(str(path)).call_sync("kernels", progress=seen.append, x=1)
    assert result == {"uid": 1000}
    assert seen == ["a", "b"]
    assert requests == [{"op": "kernels", "args": {"x": 1}}]


def test_call_sync_error(tmp_path: Path) -> None:
    """``call_sync`` raises the error's class with its message."""
    path = tmp_path / "d.sock"
    error = {"ok": False, "error": {"type": "KernelNotFound", "message": "no kernel k"}}
    with sync_daemon(path, [error]), pytest.raises(errors.KernelNotFound) as caught:
        DaemonClient(str(path)).call_sync("ended", kernel="k")
    assert str(caught.value) == "no kernel k"


async def test_events_stream_until_the_daemon_closes(tmp_path: Path) -> None:
    """The events after the ``streaming`` line come out in order; the end ends them."""
    events = [{"kind": "started", "n": 1}, {"kind": "ended", "n": 2}]
    script = [{"ok": True, "result": "streaming"}, *({"event": e} for e in events)]
    async with FakeDaemon(tmp_path / "d.sock", script) as fake:

        async def collect() -> list[dict[str, Any]]:
            return [event async for event in DaemonClient(fake.path).events()]

        assert await asyncio.wait_for(collect(), 5) == events
    assert fake.requests == [{"op": "events", "args": {}}]


def test_socket_path_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``$SANDBOX_KERNEL_SOCKET`` wins; without it, the default path."""
    monkeypatch.setenv("SANDBOX_KERNEL_SOCKET", "/tmp/elsewhere.sock")
    assert daemon_client.socket_path() == "/tmp/elsewhere.sock"
    assert DaemonClient().path == "/tmp/elsewhere.sock"
    monkeypatch.delenv("SANDBOX_KERNEL_SOCKET")
    assert daemon_client.socket_path() == "/run/sandbox-kernel/daemon.sock"
