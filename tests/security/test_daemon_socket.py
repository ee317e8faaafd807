"""The daemon's socket under attack from a local user: garbage, oversized and
truncated requests, a flood of connections, slow clients. The daemon stays up, and
another user's kernel and requests are unaffected."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path

from sandbox_kernel.runtime.daemon import MAX_PER_USER, MAX_REQUEST, READ_TIMEOUT
from tests.integration.conftest import wait_until
from tests.integration.daemon import SOCKET, USER_PYTHON, Daemon, User, UserServer

#: Run as the attacking user: reads a JSON list of requests on stdin, each sent on a
#: connection of its own (text, or with a "raw:" prefix hex bytes); prints each
#: reply line, or "<closed>".
ATTACK = r"""
import json, socket, sys
out = []
for arg in json.load(sys.stdin):
    s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])
    data = bytes.fromhex(arg[4:]) if arg.startswith("raw:") else arg.encode()
    try:
        s.sendall(data); s.shutdown(socket.SHUT_WR)
        line = s.makefile("rb").readline().decode()
    except OSError as err:
        line = f"<{err.strerror}>"
    out.append(line.strip() or "<closed>")
    s.close()
print(json.dumps(out))
"""


def attack(user: User, *requests: str) -> list[str]:
    done = subprocess.run(
        user.argv(str(USER_PYTHON), "-c", ATTACK, SOCKET), input=json.dumps(requests).encode(),
        capture_output=True, timeout=120, check=True, cwd="/",
    )  # fmt: skip
    replies: list[str] = json.loads(done.stdout)
    return replies


def error_of(line: str) -> str:
    reply = json.loads(line)
    assert reply["ok"] is False, reply
    return str(reply["error"]["message"])


async def test_malformed_requests_get_one_clear_error(daemon: Daemon, users) -> None:
    _, mallory = users
    replies = attack(
        mallory,
        "not json\n", "[1, 2]\n", '{"args": {}}\n', '{"op": 5}\n', '{"op": "nope"}\n',
        '{"op": "snapshot", "args": []}\n', '{"op": "snapshot", "args": {}}\n',
        '{"op": "limits", "args": {"kernel_id": 5}}\n',
        '{"op": "prepare", "args": {"kernel_id": "../../etc", "config": {}}}\n',
        '{"op": "logs", "args": {"kernel_id": "x", "tail": "many"}}\n',
        "raw:" + bytes(range(256)).hex(), "raw:" + ("ff" * 100) + "0a",
    )  # fmt: skip
    messages = [error_of(line) for line in replies]
    assert 'a request is {"op": NAME, "args": {...}}' in messages[0]
    assert "operation 'nope' is not known" in messages[4]
    assert "arguments of 'snapshot' must be an object" in messages[5]
    assert "argument 'kernel_id' is missing" in messages[6]
    assert "kernel id 5 is not a kernel id" in messages[7]
    assert "kernel id '../../etc'" in messages[8]
    assert all(len(m.splitlines()) == 1 for m in messages), messages
    assert (await daemon.client.call("whoami"))["uid"] == 0  # still up


async def test_an_oversized_request_is_refused_unread(daemon: Daemon, users) -> None:
    _, mallory = users
    big = '{"op": "whoami", "args": {"pad": "' + "x" * (MAX_REQUEST + 10) + '"}}\n'
    (reply,) = attack(mallory, big)
    assert reply == "<closed>" or f"at most {MAX_REQUEST} bytes" in error_of(reply)
    assert (await daemon.client.call("whoami"))["uid"] == 0


async def test_a_flood_of_connections_leaves_others_served(daemon: Daemon, users) -> None:
    """One user holds more connections than allowed, silent ones that never send a
    request: past the cap they are refused, the daemon's descriptors come back when
    they go, and another user's kernel starts and answers meanwhile."""
    alice, mallory = users
    pid = daemon.proc.pid if daemon.proc else 0
    fds_before = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    holder = await asyncio.to_thread(_flood, mallory, MAX_PER_USER + 50)
    try:
        assert holder.stdout is not None
        first = json.loads(await asyncio.to_thread(holder.stdout.readline))
        assert first["refused"] >= 50 and first["held"] <= MAX_PER_USER, first
        async with UserServer(alice) as server:
            kid = (await server.start())["kernel_id"]
            assert await server.run(kid, "print(6 * 7)") == "42\n"
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()

    def settled() -> bool:
        return len(list(Path(f"/proc/{pid}/fd").iterdir())) <= fds_before + 2

    await wait_until(settled, READ_TIMEOUT + 30, "the flood's descriptors to be closed")


def _flood(user: User, connections: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        user.argv(str(USER_PYTHON), "-c", FLOOD, SOCKET, str(connections)),
        stdout=subprocess.PIPE, cwd="/",
    )  # fmt: skip


#: Opens N connections and keeps them open without a word; prints how many the
#: daemon let stay and how many it refused at once, then waits to be killed.
FLOOD = r"""
import json, socket, sys, time, select
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); conns.append(s)
time.sleep(1.0)
refused = 0
for s in conns:
    r, _, _ = select.select([s], [], [], 0)
    if r and s.recv(4096):
        refused += 1
print(json.dumps({"held": len(conns) - refused, "refused": refused}), flush=True)
time.sleep(600)
"""


async def test_a_slow_client_is_cut_off(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(SOCKET)
        sock.sendall(b'{"op": "whoa')  # and never the rest
        sock.settimeout(READ_TIMEOUT + 20)
        assert sock.recv(4096) == b""  # closed by the daemon
