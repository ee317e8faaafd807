"""A sandboxed kernel starts, runs code, is isolated, interrupts, restarts and goes away."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from sandbox_kernel.runtime import Runtime, paths
from sandbox_kernel.runtime.rootfs import layer_dir

from .conftest import Kernels, unique, wait_until
from .leftovers import kernel_objects
from .probe import run_cell

pytestmark = pytest.mark.integration


async def test_kernel_starts_and_runs_code(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec())
    out = (await run_cell(kc, "print(6 * 7)")).check()
    assert out.strip() == "42"
    assert km.provisioner.__class__.__name__ == "SandboxProvisioner"
    # The client talks to the container's own address, not to the host's loopback.
    assert km.ip.startswith("10.")


async def test_own_hostname_and_processes(kernels: Kernels, make_spec) -> None:
    _, kc = await kernels.start(make_spec())
    out = (
        await run_cell(
            kc,
            "import os, socket\n"
            "print(socket.gethostname())\n"
            "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(open('/proc/1/cmdline').read().replace('\\0', ' '))\n"
            "print(os.getpid(), os.getppid())",
        )
    ).check()
    hostname, pids, cmdline, ids = out.splitlines()
    assert hostname != socket.gethostname()
    assert hostname.startswith("kernel-")
    # PID 1 is the container's init (tini), and the kernel is its only child.
    assert cmdline.startswith("/usr/bin/tini -v -- ") and "ipykernel" in cmdline
    mypid, parent = ids.split()
    assert parent == "1", "the kernel should be the init's child"
    assert pids == f"[1, {mypid}]", f"the kernel sees other processes: {pids}"


async def test_writes_stay_in_the_kernels_layer(kernels: Kernels, make_spec, workdir) -> None:
    km, kc = await kernels.start(make_spec())
    name = unique()
    (workdir / "input.txt").write_text("from the host")
    out = (
        await run_cell(
            kc,
            f"print(open('input.txt').read())\n"
            f"open('/tmp/{name}', 'w').write('x')\n"
            f"open('/var/tmp/{name}', 'w').write('x')\n"
            f"open('{name}.csv', 'w').write('x')\n"
            f"import os; print(sorted(os.listdir('/home')))",
        )
    ).check()
    assert out.splitlines()[0] == "from the host", "the working directory is not visible inside"
    assert not Path(f"/tmp/{name}").exists(), "a write to /tmp reached the host"
    assert not Path(f"/var/tmp/{name}").exists(), "a write to /var/tmp reached the host"
    assert not (workdir / f"{name}.csv").exists(), "a write to the working dir reached the host"
    layer = layer_dir(km.kernel_id)
    assert (layer / "root/tmp" / name).exists(), "the write did not land in the kernel's layer"
    assert (layer / "cwd" / f"{name}.csv").exists()
    assert out.splitlines()[1] == "['nobody']", "the host's home folders are visible"


async def test_interrupt_stops_a_busy_cell(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec())
    msg_id = kc.execute("while True:\n    pass")

    async def busy() -> bool:
        msg = await kc.get_iopub_msg(timeout=10)
        return msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input"

    await wait_until(busy, 30, "the cell to start")
    await km.interrupt_kernel()
    reply = await kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    # The kernel lives on. ipykernel aborts requests that reach it while it still
    # clears its queue after the error (stop_on_error): those are sent again.
    async def alive() -> bool:
        cell = await run_cell(kc, "print('alive')")
        return cell.status != "aborted" and cell.check().strip() == "alive"

    await wait_until(alive, 30, "the kernel to run a cell after the interrupt")


async def test_restart_gives_a_fresh_kernel_with_the_same_layer(
    kernels: Kernels, make_spec
) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "x = 1\nopen('/tmp/kept', 'w').write('yes')")).check()
    address = km.ip
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    cell = await run_cell(kc, "print(open('/tmp/kept').read())\nx")
    assert cell.ename == "NameError", "the restarted kernel kept its variables"
    assert cell.stdout.strip() == "yes", "the restarted kernel lost its writable layer"
    assert km.ip == address


async def test_shutdown_leaves_nothing(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec())
    kernel_id = km.kernel_id
    assert kernel_objects(kernel_id), "the kernel's container is not there while it runs"
    kc.stop_channels()
    await km.shutdown_kernel()
    assert kernel_objects(kernel_id) == []
    assert not (paths.kernels_dir() / kernel_id).exists()


async def test_ten_kernels_at_once(kernels: Kernels, make_spec) -> None:
    spec = make_spec(memory="512M")
    started = await asyncio.gather(*(kernels.start(spec) for _ in range(10)))
    names = await asyncio.gather(
        *(run_cell(kc, "import socket; print(socket.gethostname())") for _, kc in started)
    )
    hostnames = {cell.check().strip() for cell in names}
    assert len(hostnames) == 10
    assert len({km.ip for km, _ in started}) == 10


async def test_kernels_cannot_reach_each_other(kernels: Kernels, make_spec) -> None:
    km_a, _ = await kernels.start(make_spec())
    _, kc_b = await kernels.start(make_spec())
    cell = await run_cell(
        kc_b,
        "import socket\n"
        "s = socket.socket(); s.settimeout(2)\n"
        f"print(s.connect_ex(({km_a.ip!r}, {km_a.shell_port})))",
    )
    assert cell.check().strip() != "0", "kernel B reached kernel A's shell port"


async def test_logs_hold_the_kernels_stderr(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec())
    marker = unique("log-line")
    (await run_cell(kc, f"import sys; print({marker!r}, file=sys.__stderr__, flush=True)")).check()
    log = Runtime().log_path(km.kernel_id)
    await wait_until(lambda: marker in log.read_text(), 10, "the line in the kernel's log")


async def test_kernels_through_a_multikernelmanager_with_a_relative_connection_dir(
    ksm, make_spec, workdir: Path, tmp_path: Path
) -> None:
    """jupyter_client writes the connection file's realpath into the command; the
    container must still get its own copy (the kernels died at start, unable to
    write the host's path, when the manager's connection_dir was relative)."""
    folder = tmp_path / "connections"
    folder.mkdir()
    mkm = AsyncMultiKernelManager(kernel_spec_manager=ksm, connection_dir=os.path.relpath(folder))
    spec = make_spec()
    kernel_ids = await asyncio.gather(
        *(mkm.start_kernel(kernel_name=spec, cwd=str(workdir)) for _ in range(2))
    )
    clients = []
    try:
        for kernel_id in kernel_ids:
            kc = mkm.get_kernel(kernel_id).client()
            kc.start_channels()
            clients.append(kc)
            await kc.wait_for_ready(timeout=60)
            assert (await run_cell(kc, "print(6 * 7)")).check().strip() == "42"
    finally:
        for kc in clients:
            kc.stop_channels()
        await mkm.shutdown_all(now=True)


SHM_PROBE = """
import os
from multiprocessing import shared_memory
st = os.statvfs('/dev/shm')
print(st.f_blocks * st.f_frsize >> 20)
block = shared_memory.SharedMemory(create=True, size=200 << 20)
block.buf[:] = b'x' * (200 << 20)  # every page: SIGBUS past a 64M /dev/shm
print(bytes(block.buf[-3:]).decode())
block.close(); block.unlink()
"""


async def test_dev_shm_follows_the_memory_limit(kernels: Kernels, make_spec) -> None:
    """PyTorch's DataLoader, Ray and Arrow put 100s of MB in /dev/shm."""
    _, kc = await kernels.start(make_spec(memory="1G"))
    assert (await run_cell(kc, SHM_PROBE)).check().split() == ["1024", "xxx"]
    _, kc = await kernels.start(make_spec(memory="1G", shm="300M"))
    assert (await run_cell(kc, SHM_PROBE)).check().split() == ["300", "xxx"]
