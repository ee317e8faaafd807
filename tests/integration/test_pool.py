"""Warm pools: a kernelspec's ``pool`` keeps kernels restored and paused, and a start
claims one (see ``runtime/pool.py``). Kernels start through jupyter_client, in this
process, as a root notebook server's would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from sandbox_kernel.backends import local_service
from sandbox_kernel.runtime import Runtime, cgroups, paths
from sandbox_kernel.runtime.record import KernelRecord, Start

from .conftest import Kernels, run_cli, wait_until
from .leftovers import kernel_objects
from .probe import run_cell

pytestmark = pytest.mark.integration

PROBE = (
    "import os, socket\n"
    "ip = get_ipython()\n"
    "print(os.getcwd(), os.environ.get('JPY_SESSION_NAME'), os.environ['PWD'])\n"
    "before = ip.history_manager.get_tail(50, include_latest=False)\n"
    "print(socket.gethostname(), len(list(before)))\n"
    "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip(),\n"
    "      open('/sys/fs/cgroup/pids/pids.max').read().strip())"
)


def pool_of(key: str) -> list[KernelRecord]:
    """The kernels waiting in pool ``key``, ready to be claimed."""
    return [
        r for r in Runtime().records()
        if r.pooled and r.extra["pool"]["key"] == key and r.extra["pool"]["ready"]
    ]  # fmt: skip


async def ready_pool(key: str, size: int = 1) -> list[KernelRecord]:
    return await wait_until(
        lambda: len(pool_of(key)) >= size and pool_of(key), 120, f"{size} kernels in the pool"
    )


async def started_with_pool(kernels: Kernels, spec: str) -> tuple[Runtime, str, KernelRecord]:
    """Start a kernel of ``spec``; the runtime, its pool's key, and the pool kernel
    once ready."""
    km, _ = await kernels.start(spec)
    runtime = Runtime()
    key = runtime.record(km.kernel_id).extra["pool_of"]
    [waiting] = await ready_pool(key)
    return runtime, key, waiting


def frozen(record: KernelRecord) -> bool:
    return cgroups.frozen(paths.cgroup_of(record.container_id))


@pytest_asyncio.fixture
async def pools(kernels: Kernels) -> AsyncIterator[None]:
    """Empties this process's pools after the test (a server does at its exit)."""
    yield
    await kernels.close()
    await local_service().pools.drain()


async def test_a_start_takes_a_kernel_from_the_pool(
    kernels: Kernels, pools: None, make_spec, workdir: Path
) -> None:
    spec = make_spec(memory="650M", pids="310", pool=1, autosave=True)
    km1, _ = await kernels.start(spec)
    runtime = Runtime()
    first = runtime.record(km1.kernel_id)
    assert first.start is Start.BASE and first.kernel_id == km1.kernel_id, first.base_note
    key = first.extra["pool_of"]
    [waiting] = await ready_pool(key)
    assert frozen(waiting), "a pool kernel waits paused"
    assert waiting.belongs_to == first.belongs_to and waiting.base == first.base
    env = {**os.environ, "JPY_SESSION_NAME": str(workdir / "second.ipynb")}
    km2, kc2 = await kernels.start(spec, env=env)
    second = runtime.record(km2.kernel_id)
    # The pool's kernel, now known by the id Jupyter gave.
    assert second.kernel_id == waiting.kernel_id and second.public_id == km2.kernel_id
    assert not second.pooled and not frozen(second)
    assert km2.ip == waiting.kernel_ip
    assert km1.session.key != km2.session.key
    cell = await run_cell(kc2, PROBE)
    assert cell.count == 1, cell  # a new kernel's first cell
    lines = cell.check().splitlines()
    # Its folder and launch environment, its own name, no history, the limits.
    assert lines[0] == f"{workdir} {workdir / 'second.ipynb'} {workdir}", cell
    assert lines[1] == f"{second.hostname} 0", cell
    assert lines[2] == f"{650 << 20} 310", cell
    assert (await run_cell(kc2, "x = 41\nprint(x + 1)")).check().strip() == "42"
    # The kernelspec's autosave holds for the pool's kernel too.
    await wait_until(
        lambda: runtime.record(km2.kernel_id).extra.get("checkpoints"), 60, "a checkpoint"
    )
    # The pool fills again, with another kernel.
    [again] = await ready_pool(key)
    assert again.kernel_id not in (first.kernel_id, second.kernel_id)
    # The CLI knows the kernel by Jupyter's id.
    done = await run_cli("ps")
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert rows[km2.kernel_id][2] == "running", done.stdout
    assert rows[again.kernel_id][2] == "pooled", done.stdout
    assert second.kernel_id not in rows, done.stdout
    # A restart keeps the kernel and its id; it comes back from its base.
    await km2.restart_kernel(now=True)
    await kc2.wait_for_ready(timeout=60)
    restarted = runtime.record(km2.kernel_id)
    assert restarted.kernel_id == second.kernel_id and restarted.start is Start.BASE
    assert (await run_cell(kc2, "print('back')")).check().strip() == "back"
    # A shutdown removes it whole, its alias too; the pool stays.
    await km2.shutdown_kernel(now=True)
    assert kernel_objects(second.kernel_id) == []
    assert not runtime.store.exists(km2.kernel_id)
    assert [r.kernel_id for r in pool_of(key)] == [again.kernel_id]


async def test_a_pool_kernel_goes_to_one_start_of_its_own_user(
    kernels: Kernels, pools: None, make_spec
) -> None:
    spec = make_spec(memory="640M", pool=1)
    runtime, key, waiting = await started_with_pool(kernels, spec)
    # Another user's kernelspec of the same limits does not take it.
    other = make_spec(memory="640M", pool=1, kernel_uid=1000)
    km_other, kc_other = await kernels.start(other)
    theirs = runtime.record(km_other.kernel_id)
    assert theirs.kernel_id == km_other.kernel_id and theirs.uid == 1000
    assert [r.kernel_id for r in pool_of(key)] == [waiting.kernel_id]
    # Two starts at once: one gets the pool kernel, the other a kernel of its own.
    (km2, kc2), (km3, kc3) = await asyncio.gather(kernels.start(spec), kernels.start(spec))
    records = [runtime.record(km.kernel_id) for km in (km2, km3)]
    claimed = [r for r in records if r.kernel_id == waiting.kernel_id]
    assert len(claimed) == 1, records
    assert len({r.kernel_ip for r in records}) == 2
    for kc, tag in ((kc2, "two"), (kc3, "three"), (kc_other, "other")):
        assert (await run_cell(kc, f"print({tag!r})")).check().strip() == tag
    # A pool kernel is nobody's kernel: its own id reaches nothing.
    [later] = await ready_pool(key)
    done = await run_cli("logs", later.kernel_id)
    assert done.returncode != 0 and "no sandboxed kernel" in done.stderr, done


SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from sandbox_kernel.runtime import Runtime

    async def main():
        ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
        km = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=ksm)
        await km.start_kernel(cwd=sys.argv[3])
        key = Runtime().record(km.kernel_id).extra["pool_of"]
        for _ in range(1200):
            if any(r.pooled and r.extra["pool"]["key"] == key and r.extra["pool"]["ready"]
                   for r in Runtime().records()):
                break
            await asyncio.sleep(0.1)
        else:
            sys.exit("the pool was not filled")
        print(key, flush=True)
        if sys.argv[4] == "exit":
            await km.shutdown_kernel(now=True)
        else:
            await asyncio.sleep(3600)  # killed meanwhile

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", ["exit", "killed"])
async def test_a_servers_pool_goes_with_it(
    make_spec, ksm, workdir: Path, tmp_path: Path, how: str
) -> None:
    spec = make_spec(memory="630M", pool=2)
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(script), ksm.kernel_dirs[0], spec, str(workdir), how,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), 180)
        key = line.decode().strip()
        assert key, (await server.stderr.read()).decode() if server.stderr else ""
        members = [
            r.kernel_id for r in Runtime().records() if r.extra.get("pool", {}).get("key") == key
        ]
        assert members
        if how == "killed":
            server.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(server.wait(), 120) == (0 if how == "exit" else -9)
        if how == "killed":
            # The server could not clean up: gc removes what it left.
            done = await run_cli("gc")
            assert done.returncode == 0, done
        for kid in members:
            assert kernel_objects(kid) == [], kid
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
        await run_cli("gc")


async def test_a_pool_kernel_that_died_while_waiting_still_gives_a_kernel(
    kernels: Kernels, pools: None, make_spec
) -> None:
    spec = make_spec(memory="620M", pool=1)
    runtime, _, waiting = await started_with_pool(kernels, spec)
    # Killed as the OOM killer or an operator would, thawed so that it ends now.
    state = await runtime.drivers.runc.state(waiting.container_id)
    assert state is not None and state["status"] == "paused", state
    os.kill(int(state["pid"]), signal.SIGKILL)
    await runtime.drivers.runc.resume(waiting.container_id)

    async def stopped() -> bool:
        now = await runtime.drivers.runc.state(waiting.container_id)
        return now is None or now["status"] == "stopped"

    await wait_until(stopped, 30, "the pool kernel to end")
    km2, kc2 = await kernels.start(spec)
    record = runtime.record(km2.kernel_id)
    assert record.kernel_id == waiting.kernel_id  # it was claimed, and started cold
    assert record.start is Start.COLD and "pool" in record.base_note, record
    assert (await run_cell(kc2, "print(6 * 7)")).check().strip() == "42"
