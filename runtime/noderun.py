"""A kernel's Slurm job, on its node: ``sandbox-kernel node-run SPEC``.

Run by the job as the submitting user. It asks the node's daemon (its usual
socket) to prepare and launch the kernel the spec file describes, forwards a port
of the node for each of the kernel's ports, writes where they are beside the spec
(``KERNEL_ID.ready``, for the provisioner), and holds the job until the kernel
ends. A SIGTERM (``scancel``, or the job's end) removes the kernel; a SIGINT
interrupts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.errors import ConfigError, SandboxError

from .fsutil import write_json
from .lifecycle import KERNEL_PORTS

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def read_spec(path: Path) -> dict[str, Any]:
    """The spec file: the caller's own, closed to others (it holds the kernel's key).

    Raises:
        ConfigError: not such a file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError("spec file", str(path), "must be yours and closed to others")
        spec: dict[str, Any] = json.load(handle)
    return spec


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy ``src`` to ``dst`` until it ends; then close ``dst``. One direction of a
    forwarded connection (here, and in the provisioner's forwarder)."""
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        dst.close()


async def forward(address: str, port: int) -> asyncio.Server:
    """A port of this node (any free one) forwarding to ``address:port``."""

    async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection(address, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, far_writer), pipe(far_reader, writer))

    return await asyncio.start_server(link, "0.0.0.0", 0)


async def run(spec_path: Path) -> int:
    spec = read_spec(spec_path)
    kid = str(spec["kernel_id"])
    client = DaemonClient()
    record = await client.call("prepare", kernel_id=kid, config=spec["config"])
    address = str(record["kernel_ip"])
    connection = {**spec["connection"], "ip": address, **KERNEL_PORTS}
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = await client.call(
        "launch", kernel_id=kid, argv=spec["argv"], env=spec["env"], connection=connection
    )
    del started  # the kernel's pid is asked for when needed: a restore changes it
    servers = {name: await forward(address, KERNEL_PORTS[name]) for name in PORT_NAMES}
    ports = {name: server.sockets[0].getsockname()[1] for name, server in servers.items()}
    node = socket.gethostname()
    write_json(spec_path.with_suffix(".ready"), {
        "node": node, "address": socket.gethostbyname(node), "ports": ports,
        "job": os.environ.get("SLURM_JOB_ID"),
    })  # fmt: skip
    loop.add_signal_handler(signal.SIGTERM, ended.set)

    async def interrupt() -> None:
        with contextlib.suppress(SandboxError, OSError):
            pid = await client.call("pid", kernel_id=kid)
            if pid:
                os.kill(int(pid), signal.SIGINT)

    pending: set[asyncio.Future[None]] = set()

    def interrupt_kernel() -> None:
        task = asyncio.ensure_future(interrupt())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGINT, interrupt_kernel)
    try:
        while not ended.is_set():
            try:
                pid = await client.call("pid", kernel_id=kid)
            except SandboxError:
                break  # removed
            if pid is None:
                print(f"kernel {kid} ended", file=sys.stderr, flush=True)
                break  # the kernel ended (a shutdown, or it died)
            with_timeout = asyncio.ensure_future(ended.wait())
            await asyncio.wait([with_timeout], timeout=1.0)
            with_timeout.cancel()
    finally:
        print(f"removing kernel {kid}", file=sys.stderr, flush=True)
        for server in servers.values():
            server.close()
        with contextlib.suppress(SandboxError):
            await client.call("remove", kernel_id=kid)
    return 0


def main(spec: str) -> int:
    return asyncio.run(run(Path(spec)))
