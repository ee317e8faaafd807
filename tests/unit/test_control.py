"""The control channel: forged, replayed, stale, misaddressed and malformed requests,
floods, idle and overlong connections, and the names a kernel may give."""

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import kernelspec, protocol
from sandbox_kernel.errors import ConfigError
from sandbox_kernel.magics.channel import MAX_REQUEST, Channel, ChannelError, Interrupted
from sandbox_kernel.protocol import MAX_LINE, sign
from sandbox_kernel.runtime import bases, layers, snapshots
from sandbox_kernel.runtime.cgroups import Usage
from sandbox_kernel.runtime.control import MAX_CONNECTIONS, ControlledRuntime, ControlServer
from sandbox_kernel.runtime.hostpath import Identity
from sandbox_kernel.runtime.limits import Limits
from sandbox_kernel.runtime.network import firewall_rules
from sandbox_kernel.runtime.record import KernelRecord

TOKEN = "ab" * 32
LOCAL = "127.0.0.1"


async def nothing(pid: int) -> None:
    return None


class FakeRuntime:
    """The runtime as the control server sees it (:class:`ControlledRuntime`): it
    keeps limits and a pending restore's arguments, and ``fail`` breaks ``record``
    (and so every call that reads it)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.limits = Limits(memory=1 << 30, cpus=1.0, pids=512)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def snapshot(
        self, kernel_id: str, name: str, message: str = "", /, *,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        self.calls.append(("snapshot", (name, message)))
        if progress is not None:
            progress("dumping memory")
        return {"name": name, "message": message, "mode": "live"}

    async def restore(self, kernel_id: str, name: str, /) -> dict[str, Any]:
        self.calls.append(("restore", (name,)))
        return {"pid": 4242, "mode": "files", "reason": "a test", "name": name}

    async def reset(self, kernel_id: str, pristine: bool = False, /) -> dict[str, Any]:
        self.calls.append(("reset", (pristine,) if pristine else ()))
        return {"pid": 4343, "to": "image", "note": ""}

    def snapshot_listing(self, kernel_id: str, /) -> dict[str, Any]:
        self.record(kernel_id)
        metas = [{"name": "a", "memory_bytes": 5, "file_bytes": 7}]
        return {"snapshots": metas, "store": {"bytes": 12, "count": 1}}

    def delete_snapshot(self, kernel_id: str, name: str, /) -> None:
        self.calls.append(("delete", (name,)))

    def diff(self, kernel_id: str, name: str | None = None, /) -> dict[str, Any]:
        return {"since": name, "added": [], "changed": [], "deleted": []}

    async def update_limits(
        self, kernel_id: str, limits: Limits, /, operator: bool = False
    ) -> Limits:
        self.calls.append(("update_limits", (limits, operator)))
        self.limits = self.limits.merged(limits)
        return self.limits

    def usage(self, kernel_id: str, /) -> Usage | None:
        self.record(kernel_id)
        return None

    def record(self, kernel_id: str, /) -> KernelRecord:
        if self.fail:
            raise RuntimeError("/var/lib/sandbox-kernel/secret is broken")
        here = Identity(1, 2, 1000)
        return KernelRecord(
            kernel_id=kernel_id, container_id="c", hostname="h", image="host", layers=[],
            executable="/usr/bin/python3", python_prefixes=[], prefix_identities=[],
            cwd="/w", cwd_identity=here, cwd_inside="/w", limits=self.limits,
            ceiling=self.limits, network="none", index=0, kernel_ip=LOCAL, uid=1000,
            gid=1000, user="u", home="/home/u", created=0.0, owner={}, snapshot="a",
        )  # fmt: skip


_: ControlledRuntime = FakeRuntime()  # mypy checks that the fake fits the protocol


def server() -> ControlServer:
    return ControlServer(FakeRuntime(), "kernel-1", "10.213.0.5", "10.213.0.6", TOKEN, nothing)


def request(**changes: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "op": "list", "args": {}, "kernel_id": "kernel-1",
        "nonce": f"n-{time.monotonic_ns()}", "time": time.time(),
    }  # fmt: skip
    req.update(changes)
    req["mac"] = sign(TOKEN, req)
    return req


def test_a_good_request_passes_once() -> None:
    s, req = server(), request()
    assert s.check(req, "10.213.0.6") is None
    assert s.check(req, "10.213.0.6") == "the request was replayed"


def test_a_forged_signature_is_refused() -> None:
    req = request()
    req["mac"] = sign("cd" * 32, req)
    assert server().check(req, "10.213.0.6") == "the request's signature is wrong"


def test_a_changed_request_is_refused() -> None:
    req = request()
    req["op"] = "restore"
    assert server().check(req, "10.213.0.6") == "the request's signature is wrong"


def test_another_kernels_id_is_refused() -> None:
    assert server().check(request(kernel_id="kernel-2"), "10.213.0.6") == (
        "the request names another kernel"
    )


def test_a_stale_request_is_refused() -> None:
    assert server().check(request(time=time.time() - 3600), "10.213.0.6") == (
        "the request is stale"
    )


def test_only_the_kernels_own_address_is_served() -> None:
    problem = server().check(request(), "10.213.0.10")
    assert problem is not None and "only taken from this kernel" in problem


def test_a_time_that_is_no_number_is_stale() -> None:
    # NaN compares false with everything, so it never looked stale.
    for sent in (float("nan"), float("inf"), -float("inf"), 10**400, True, "now", None):
        assert server().check(request(time=sent), "10.213.0.6") == "the request is stale"


def test_a_signature_that_is_not_ascii_is_wrong() -> None:
    # hmac.compare_digest raises TypeError on a str that is not ASCII.
    for mac in ("é" * 64, "\ud800"):
        req = request()
        req["mac"] = mac
        assert server().check(req, "10.213.0.6") == "the request's signature is wrong"


def test_op_args_and_nonce_must_have_their_types() -> None:
    s = server()
    assert "unknown operation 'frobnicate'" in str(s.check(request(op="frobnicate"), "10.213.0.6"))
    assert "op must be a string" in str(s.check(request(op=5), "10.213.0.6"))
    assert "op must be a string" in str(s.check(request(op=None), "10.213.0.6"))
    assert "args must be a JSON object" in str(s.check(request(args=[1]), "10.213.0.6"))
    assert "nonce must be a string" in str(s.check(request(nonce="n" * 1000), "10.213.0.6"))
    assert "nonce must be a string" in str(s.check(request(nonce=""), "10.213.0.6"))


# ---- the server over TCP, with a fake runtime -----------------------------------------


def live_server(
    kernel_id: str = "kernel-1", runtime: FakeRuntime | None = None, **options: Any
) -> ControlServer:
    return ControlServer(
        runtime or FakeRuntime(), kernel_id, LOCAL, LOCAL, TOKEN, nothing, port=0, **options
    )


@pytest.fixture
async def served() -> AsyncIterator[ControlServer]:
    s = live_server()
    await s.start()
    yield s
    await s.close()


def line(**changes: Any) -> bytes:
    """A signed ``resume`` request, as the kernel sends it (but for the newline)."""
    return json.dumps(request(**{"op": "resume", **changes})).encode()


async def connect(s: ControlServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LOCAL, s.port)


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def exchange(s: ControlServer, *lines: bytes) -> list[dict[str, Any]]:
    """Send ``lines`` on one connection, each after the reply to the one before."""
    reader, writer = await connect(s)
    replies = []
    try:
        for text in lines:
            writer.write(text + b"\n")
            replies.append(json.loads(await asyncio.wait_for(reader.readline(), 5)))
    finally:
        await hang_up(writer)
    return replies


async def ask(
    s: ControlServer,
    op: str = "resume",
    on_progress: Callable[[str], None] | None = None,
    **args: Any,
) -> Any:
    """Send ``op`` with ``args`` as the kernel's magic does, through :class:`Channel`."""
    creds = {"host": LOCAL, "port": s.port, "token": TOKEN, "kernel_id": s.kernel_id}
    channel = Channel(creds)
    return await asyncio.to_thread(
        functools.partial(channel.request, op, timeout=5, on_progress=on_progress, **args)
    )


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> None:
    """Return once the server closed the connection; TimeoutError after ``within`` s."""
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(reader.read(1 << 16), within):
            pass


async def no_connections(s: ControlServer) -> None:
    """Return once ``s`` has closed every connection (it notices a hang-up in its own time)."""

    async def wait() -> None:
        # The server has no event for this, and needs none outside tests.
        while s.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), 5)


def sockets_open() -> int:
    """This process's open sockets."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


async def test_the_kernels_channel_is_answered(served: ControlServer) -> None:
    assert await ask(served) is None
    # Heard only at the watch a kernel sends once it has taken its key and numbered
    # its cells (a process from a base asks resume first).
    assert not served.heard.is_set()


def test_every_answered_operation_has_a_handler() -> None:
    s = server()
    answered = {name for name, op in protocol.OPS.items() if op.answered}
    assert set(s._handlers) == answered == set(protocol.OPS) - {"watch"}


async def test_each_operation_reaches_the_runtime(served: ControlServer) -> None:
    fake = served.runtime
    assert isinstance(fake, FakeRuntime)
    lines: list[str] = []
    meta = await ask(served, "snapshot", name="s1", message="m", on_progress=lines.append)
    assert meta["name"] == "s1" and lines == ["dumping memory"]
    assert await ask(served, "list") == fake.snapshot_listing("kernel-1")
    assert await ask(served, "delete", name="s1") is None
    assert (await ask(served, "diff", name=None))["since"] is None
    limits = await ask(served, "limits", memory="600M", cpus=None, pids="300")
    assert limits == {"memory": 600 << 20, "cpus": 1.0, "pids": 300, "disk": None}
    assert ("update_limits", (Limits(memory=600 << 20, pids=300), False)) in fake.calls
    status = await ask(served, "status")
    assert status["limits"] == limits and status["usage"] is None
    assert (status["snapshots"], status["snapshot_bytes"], status["current"]) == (1, 12, "a")


async def test_a_restore_or_reset_leaves_its_cell_for_the_new_process() -> None:
    followed: list[int] = []

    async def follow(pid: int) -> None:
        followed.append(pid)

    s = ControlServer(FakeRuntime(), "kernel-1", LOCAL, LOCAL, TOKEN, follow, port=0)
    await s.start()
    try:
        parent, ident = {"header": {"msg_id": "m1"}}, ["00ff"]
        done = await ask(s, "restore", name="s1", parent=parent, ident=ident)
        assert done["pid"] == 4242 and followed == [4242]
        pending = await ask(s)
        assert pending == {"name": "s1", "parent": parent, "ident": ident, "kind": "restore"}
        assert await ask(s) is None  # handed over once
        await ask(s, "reset", parent=parent, ident=ident)
        assert followed == [4242, 4343]
        assert (await ask(s))["kind"] == "reset"
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("op", "args", "why"),
    [
        ("snapshot", {}, "needs its 'name' argument"),
        ("snapshot", {"name": 5}, "'name' must be a string, not int"),
        ("restore", {"name": "x", "parent": {}, "ident": "00"}, "'ident' must be a list"),
        ("limits", {"memory": True}, "'memory' must be a string or a number, not bool"),
        ("frobnicate", {}, "unknown operation 'frobnicate'"),
    ],
)
async def test_arguments_that_do_not_fit_the_op_are_refused(
    served: ControlServer, op: str, args: dict[str, Any], why: str
) -> None:
    with pytest.raises(ChannelError, match=f"^refused: .*{re.escape(why)}"):
        await ask(served, op, **args)
    assert isinstance(served.runtime, FakeRuntime) and not served.runtime.calls


MALFORMED: dict[str, tuple[bytes | dict[str, Any], str]] = {
    # what is sent (bytes as they are, a dict as changes to a signed request), and
    # what the refusal says
    "list": (b"[]", "a request is a JSON object, not list"),
    "null": (b"null", "not NoneType"),
    "string": (b'"x"', "not str"),
    "number": (b"1", "not int"),
    "broken": (b"{", "the request is not JSON"),
    "not-utf8": (b"\xff\xfe", "the request is not JSON"),
    "nested": (b"[" * 60_000, "nested too deeply"),  # RecursionError in json.loads
    "empty": (b"{}", "signature is wrong"),
    "mac-not-ascii": (b"", "signature is wrong"),  # made in the test: it needs a request
    "time-nan": ({"time": float("nan")}, "stale"),
    "time-inf": ({"time": float("inf")}, "stale"),
    "time-minus-inf": ({"time": -float("inf")}, "stale"),
    "args-list": ({"args": [1]}, "args must be a JSON object"),
    "args-string": ({"args": "x"}, "args must be a JSON object"),
    "op-number": ({"op": 5}, "op must be a string"),
    "op-null": ({"op": None}, "op must be a string"),
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_request_is_refused_and_the_connection_serves_on(
    served: ControlServer, case: str
) -> None:
    sent, why = MALFORMED[case]
    if case == "mac-not-ascii":
        sent = json.dumps({**request(), "mac": "\xe9" * 64}).encode()
    elif isinstance(sent, dict):
        sent = line(**sent)  # signed now, so it is not refused as stale instead
    refused, good = await exchange(served, sent, line())
    assert refused["ok"] is False
    assert refused["error"].startswith("refused: ") and why in refused["error"]
    assert good == {"ok": True, "result": None}


async def test_a_runtime_failure_is_replied_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.control.failure")
    s = live_server(runtime=FakeRuntime(fail=True), log=log)
    await s.start()
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            replies = await exchange(s, line(op="status"), line(op="status"), line(op="status"))
    finally:
        await s.close()
    for reply in replies:
        assert reply["ok"] is False
        assert "RuntimeError" in reply["error"] and "log has the details" in reply["error"]
        assert "/var/lib" not in reply["error"]  # host details stay in the host's log
    first, summary = caplog.records
    assert first.levelno == logging.ERROR and first.exc_info is not None
    assert "kernel-1" in first.getMessage()
    assert summary.getMessage().endswith("since the last one logged: 2")


async def test_bad_requests_are_logged_once_per_interval(
    served: ControlServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sandbox_kernel.control"):
        replies = await exchange(served, *[b"[]"] * 50)
        await exchange(served, *[line(mac="0" * 64)] * 50)
    assert all(not r["ok"] for r in replies)
    (record,) = caplog.records
    assert "kernel kernel-1: refused a request" in record.getMessage()


async def test_an_idle_connection_is_closed() -> None:
    s = live_server(read_timeout=0.2)
    await s.start()
    try:
        silent, silent_writer = await connect(s)
        slow, slow_writer = await connect(s)
        try:
            slow_writer.write(b'{"op": "res')  # a line begun and never ended
            await closed_by_server(silent, within=5)
            await closed_by_server(slow, within=5)
            await no_connections(s)
        finally:
            await hang_up(silent_writer)
            await hang_up(slow_writer)
    finally:
        await s.close()


async def test_a_watch_is_held_and_what_comes_on_it_is_dropped() -> None:
    s = live_server(read_timeout=0.2)
    await s.start()
    reader, writer = await connect(s)
    try:
        writer.write(line(op="watch") + b"\n")
        await writer.drain()
        tracemalloc.start()
        try:
            junk = b"x" * (1 << 16)
            for _ in range(512):  # 32 MiB, no newline
                writer.write(junk)
                await writer.drain()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, f"the server kept {peak} bytes of a watch's junk"
        # Open well past the read timeout, and never answered.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 1.0)
        assert s.heard.is_set() and s.connections == 1
    finally:
        await hang_up(writer)
        await no_connections(s)
        await s.close()


async def test_a_line_up_to_the_limit_is_read(served: ControlServer) -> None:
    padded = line(args={"pad": "x" * (MAX_LINE - 300)})
    assert len(padded) <= MAX_LINE
    assert await exchange(served, padded) == [{"ok": True, "result": None}]


async def test_a_longer_line_closes_the_connection_unbuffered(served: ControlServer) -> None:
    reader, writer = await connect(served)
    tracemalloc.start()
    try:
        chunk = b"x" * (1 << 14)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 1 MiB without a newline
                writer.write(chunk)
                await writer.drain()
        # The read timeout is 10 s: closing sooner is the line limit's doing.
        await closed_by_server(reader, within=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await hang_up(writer)
    assert peak < 768 << 10, f"the server buffered {peak} bytes of an overlong line"
    await no_connections(served)
    assert await ask(served) is None


FLOOD = """
import select, socket, sys
port, count, expected = map(int, sys.argv[1:])
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
for c in conns:
    c.send(b"x" * 1000)  # a line begun, never ended
open_, closed = list(conns), 0
while closed < expected:
    ready, _, _ = select.select(open_, [], [], 10)
    if not ready:
        break
    for c in ready:
        try:
            gone = not c.recv(4096)
        except ConnectionResetError:
            gone = True
        if gone:
            open_.remove(c)
            closed += 1
print(closed, flush=True)
sys.stdin.readline()
"""


async def test_a_flood_is_capped_and_leaves_other_kernels_served() -> None:
    first = live_server("kernel-1", read_timeout=60)
    second = live_server("kernel-2", read_timeout=60)
    await first.start()
    await second.start()
    count = 200
    before = sockets_open()
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOD, str(first.port), str(count), str(count - MAX_CONNECTIONS),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert flood.stdin is not None and flood.stdout is not None
    try:
        closed = await asyncio.wait_for(flood.stdout.readline(), 60)
        # The server closed every connection past its cap, unread.
        assert int(closed) == count - MAX_CONNECTIONS
        assert first.connections == MAX_CONNECTIONS
        assert sockets_open() <= before + MAX_CONNECTIONS + 2
        # Another kernel's server is served; this kernel's own waits its turn.
        assert await ask(second) is None
        with pytest.raises(Interrupted):
            await ask(first)
    finally:
        flood.stdin.close()
        await asyncio.wait_for(flood.wait(), 30)
    await no_connections(first)
    assert await ask(first) is None
    await first.close()
    await second.close()


def test_the_firewall_caps_control_connections_above_the_server() -> None:
    rules = firewall_rules()
    cap = re.search(
        r"tcp dport \d+ ct state new add @ctl_conns \{ ip saddr ct count over (\d+) \}", rules
    )
    assert cap is not None
    assert int(cap.group(1)) > MAX_CONNECTIONS
    assert rules.index("ct count over") < rules.index("fib daddr . iif type local accept")


def test_the_channel_refuses_a_request_over_the_line_limit() -> None:
    assert MAX_REQUEST == MAX_LINE
    creds = {"host": LOCAL, "port": 1, "token": TOKEN, "kernel_id": "kernel-1"}
    with pytest.raises(ChannelError, match="over the control channel's 65536; shorten"):
        Channel(creds).request("snapshot", name="x", message="m" * MAX_REQUEST)


# ---- names a kernel or a user gives are checked whole ---------------------------------

BAD_NAMES = ["x\n", "x\r", "", "a/b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_snapshot_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="snapshot name"):
        snapshots.check_name(name)


@pytest.mark.parametrize("base_id", ["0123456789abcdef\n", "0123456789abcdef\r", "", "a/b"])
def test_a_bad_base_id_is_refused(base_id: str) -> None:
    with pytest.raises(ConfigError, match="is not a base id"):
        bases.base_dir(base_id)


@pytest.mark.parametrize("name", [*BAD_NAMES, "\uff58", "\xe9"])
def test_a_bad_image_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="image name"):
        layers.check_image_name(name)


@pytest.mark.parametrize("name", [*BAD_NAMES, "\u212a", "\u017f"])  # Kelvin sign, long s
def test_a_bad_kernelspec_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="kernel name"):
        kernelspec.install(name, None, {})


def test_good_names_pass() -> None:
    assert snapshots.check_name("before-training.2") == "before-training.2"


async def test_a_pool_kernel_waits_until_claimed_and_then_arrives() -> None:
    s = live_server()
    await s.start()
    try:
        s.claim = asyncio.get_running_loop().create_future()
        assert await ask(s) == {"kind": "pool"}  # it is told to wait
        creds = {"host": LOCAL, "port": s.port, "token": TOKEN, "kernel_id": s.kernel_id}
        waiting = asyncio.create_task(asyncio.to_thread(Channel(creds).request, "claimed", None))
        await asyncio.wait_for(s.asked.wait(), 5)
        await asyncio.sleep(0.05)
        assert not waiting.done()
        s.pending = {"kind": "base", "count": 1}
        s.arrival = {"cwd": "/home/u", "env": {"A": "1"}}
        s.claim.set_result(None)
        info = await asyncio.wait_for(waiting, 5)
        assert info == {"cwd": "/home/u", "env": {"A": "1"}, "kind": "base", "count": 1}
        assert await ask(s) is None  # handed over once
    finally:
        await s.close()


async def test_a_pool_kernels_wait_ends_when_it_is_removed() -> None:
    s = live_server()
    await s.start()
    creds = {"host": LOCAL, "port": s.port, "token": TOKEN, "kernel_id": s.kernel_id}
    s.claim = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(asyncio.to_thread(Channel(creds).request, "claimed", None))
    await asyncio.wait_for(s.asked.wait(), 5)
    await s.close()
    # Its wait ends with no arrival: the connection ends, or says nothing.
    try:
        result = await asyncio.wait_for(waiting, 5)
    except ChannelError:
        result = None
    assert result is None and s.claim.cancelled()
