"""Memory, pids and CPU limits hold, and can be changed on a running kernel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager

from sandbox_kernel.runtime import Runtime, cgroups, snapshots

from .conftest import OWNER, Kernels, fresh, run_cli, wait_until
from .probe import run_cell

pytestmark = pytest.mark.integration


async def test_memory_bomb_is_oom_killed_and_the_kernel_comes_back(
    kernels: Kernels, make_spec
) -> None:
    km, kc = await kernels.start(make_spec(memory="256M"))
    await _dies_and_restarts(km, kc, "hog = []\nwhile True:\n    hog.append(b'x' * (16 << 20))")
    cell = await run_cell(kc, "print('back'); 'hog' in globals()")
    assert cell.check().strip() == "back"
    assert cell.outputs[-1]["content"]["data"]["text/plain"] == "False"
    log = Runtime().log_path(km.kernel_id).read_text()
    assert "ran out of memory" in log, f"the kernel's log does not say why it died:\n{log}"
    assert "256M" in log and "%container limits --memory" in log
    # The notebook is told too: before the first cell's output, once.
    assert cell.stderr.startswith("Warning: the previous kernel process ended: The kernel ran out")
    assert "(256M)" in cell.stderr and "%container limits --memory" in cell.stderr
    assert (await run_cell(kc, "print(1)")).stderr == ""
    status = (await run_cell(kc, "%container status")).check()
    assert "Last end: out of memory (limit 256M)" in status


async def test_a_kernel_killed_by_a_signal_says_which(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec())
    await _dies_and_restarts(km, kc, "import os, signal; os.kill(os.getpid(), signal.SIGBUS)")
    cell = await run_cell(kc, "print('back')")
    assert cell.check() == "back\n"
    assert "killed by signal SIGBUS (Bus error)" in cell.stderr, cell.stderr
    assert "killed by signal SIGBUS" in Runtime().log_path(km.kernel_id).read_text()


async def _dies_and_restarts(km: AsyncIOLoopKernelManager, kc: Any, code: str) -> None:
    """Run ``code``, which kills the kernel; return once jupyter_client's restarter
    has started it again and it answers."""
    assert isinstance(km, AsyncIOLoopKernelManager)
    restarted = asyncio.Event()
    km.add_restart_callback(restarted.set, "restart")
    kc.execute(code)
    await asyncio.wait_for(restarted.wait(), 60)
    await kc.wait_for_ready(timeout=60)


async def test_fork_bomb_stops_at_the_pids_limit(kernels: Kernels, make_spec) -> None:
    _, bomb = await kernels.start(make_spec(pids="64"))
    _, other = await kernels.start(make_spec())
    # Children live 15 s and are reaped automatically (SIGCHLD ignored), so the
    # bomb's kernel recovers by itself.
    out = (
        await run_cell(
            bomb,
            "import os, errno, signal, time\n"
            "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
            "children, error = 0, None\n"
            "for _ in range(10_000):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError as err:\n"
            "        error = err.errno\n"
            "        break\n"
            "    if pid == 0:\n"
            "        time.sleep(15)\n"
            "        os._exit(0)\n"
            "    children += 1\n"
            "print(children, errno.errorcode.get(error))",
        )
    ).check()
    count, error = out.split()
    assert error == "EAGAIN", f"the fork bomb was not stopped: {out}"
    assert int(count) < 64
    # While the bomb's children hold every pid, the other kernel still answers.
    assert (await run_cell(other, "print(1 + 1)", timeout=30)).check().strip() == "2"

    async def recovered() -> bool:
        cell = await run_cell(bomb, "signal.signal(signal.SIGCHLD, signal.SIG_DFL)")
        return cell.status == "ok"

    await wait_until(recovered, 60, "the bomb's children to exit", interval=1)


async def test_busy_loop_is_held_to_the_cpu_quota(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec(cpus="0.5"))
    out = (
        await run_cell(
            kc,
            "import time\n"
            "wall0, cpu0 = time.monotonic(), time.process_time()\n"
            "while time.monotonic() - wall0 < 3:\n"
            "    pass\n"
            "print((time.process_time() - cpu0) / (time.monotonic() - wall0))",
        )
    ).check()
    share = float(out)
    assert share < 0.65, f"a busy loop got {share:.2f} of a core with a quota of 0.5"
    assert share > 0.2, f"a busy loop got only {share:.2f} of a core"
    use = Runtime().usage(km.kernel_id)
    assert use is not None and use.cpu_limit == pytest.approx(0.5)


async def test_limits_change_on_a_running_kernel(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec(memory="512M", pids="128"))
    done = await run_cli(
        "limits", km.kernel_id, "--memory", "768M", "--pids", "200", "--cpus", "0.75"
    )
    assert done.returncode == 0, done.stderr
    assert "memory 768M" in done.stdout
    out = (
        await run_cell(
            kc,
            "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())\n"
            "print(open('/sys/fs/cgroup/pids/pids.max').read().strip())",
        )
    ).check()
    assert out.split() == [str(768 << 20), "200"]
    use = Runtime().usage(km.kernel_id)
    assert use is not None and use.cpu_limit == pytest.approx(0.75)
    # Below what the kernel uses now: refused with a message, nothing changed.
    (await run_cell(kc, "blob = b'x' * (200 << 20)")).check()
    done = await run_cli("limits", km.kernel_id, "--memory", "100M")
    assert done.returncode == 2
    assert "memory limit '100M' is below what the kernel uses now" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    use = Runtime().usage(km.kernel_id)
    assert use is not None and use.memory_limit == 768 << 20


async def test_limits_changed_during_a_snapshot_hold_after_a_restart(
    kernels: Kernels, make_spec, names
) -> None:
    """The lost update: a snapshot used to write back the whole record it read at its
    start, so a limit changed meanwhile was applied by runc, then dropped from the
    record, and the next restart brought the old limit back."""
    km, kc = await kernels.start(make_spec(memory="1G"))
    (
        await run_cell(
            kc,
            "import numpy as np\n"
            "big = np.random.default_rng(0).integers(0, 256, 300_000_000, dtype=np.uint8)",
        )
    ).check()
    name = fresh(names)
    snap = asyncio.create_task(run_cli("snapshot", km.kernel_id, name))
    group = f"sandbox-kernel/sk-{km.kernel_id}"
    await wait_until(lambda: cgroups.frozen(group), 60, "the snapshot to freeze the kernel", 0.005)
    changed = await run_cli("limits", km.kernel_id, "--memory", "900M")
    assert changed.returncode == 0, changed.stderr
    assert not snap.done(), "the snapshot ended before the limit changed: no race was tested"
    done = await snap
    assert done.returncode == 0, done.stderr
    assert name in snapshots.names(OWNER)
    assert Runtime().record(km.kernel_id).limits.memory == 900 << 20

    await km.restart_kernel()
    await kc.wait_for_ready(timeout=60)
    use = Runtime().usage(km.kernel_id)
    assert use is not None and use.memory_limit == 900 << 20, use
    shown = await run_cli("limits", km.kernel_id)
    assert "memory 900M" in shown.stdout, shown.stdout
