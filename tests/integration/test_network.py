"""Network modes: `none` has no way out, `egress` goes out through NAT, and neither
reaches a service of the host.

"The outside" is a network namespace this test makes itself, joined to the host by
its own veth, with a TCP server in it: no packet leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from .conftest import Kernels
from .probe import run_cell

pytestmark = pytest.mark.integration

OUTSIDE_HOST, OUTSIDE_PEER = "10.214.0.1", "10.214.0.2"
SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 8080)); s.listen(); print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello from outside'); c.close()\n"
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest_asyncio.fixture
async def outside() -> AsyncIterator[str]:
    """A namespace with a TCP server on port 8080, routed from the host."""
    tag = uuid.uuid4().hex[:6]
    ns, veth = f"sbxtest-{tag}", f"sbxt{tag}"
    ip("netns", "add", ns)
    server = None
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{OUTSIDE_HOST}/30", "dev", veth)
        ip("link", "set", veth, "up")
        ip("-n", ns, "addr", "add", f"{OUTSIDE_PEER}/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        server = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-c", SERVER, stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        assert await asyncio.wait_for(server.stdout.readline(), 30) == b"listening\n"
        yield OUTSIDE_PEER
    finally:
        if server is not None:
            server.kill()
            await server.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", veth)
        ip("netns", "del", ns)


@pytest_asyncio.fixture
async def host_service() -> AsyncIterator[int]:
    """A TCP service on every address of the host; returns its port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"host secret")
        writer.close()

    server = await asyncio.start_server(answer, "0.0.0.0", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def connect(address: str, port: int) -> str:
    return (
        "import socket\n"
        "s = socket.socket(); s.settimeout(2)\n"
        "try:\n"
        f"    s.connect(({address!r}, {port})); print('reached', s.recv(100).decode())\n"
        "except OSError as err:\n"
        "    print('blocked', err.strerror or 'timed out')\n"
    )


async def test_egress_goes_out_and_none_does_not(kernels: Kernels, make_spec, outside) -> None:
    _, egress = await kernels.start(make_spec(network="egress"))
    _, closed = await kernels.start(make_spec())
    out = (await run_cell(egress, connect(outside, 8080))).check()
    assert out.strip() == "reached hello from outside"
    out = (await run_cell(closed, connect(outside, 8080))).check()
    assert out.startswith("blocked"), f"a network=none kernel got out: {out}"
    assert "unreachable" in out.lower()


async def test_no_kernel_reaches_a_host_service(
    kernels: Kernels, make_spec, host_service: int
) -> None:
    for network in ("none", "egress"):
        km, kc = await kernels.start(make_spec(network=network))
        gateway = km.ip.rsplit(".", 1)[0] + "." + str(int(km.ip.rsplit(".", 1)[1]) - 1)
        out = (await run_cell(kc, connect(gateway, host_service))).check()
        assert out.startswith("blocked"), f"a {network} kernel reached the host: {out}"
