"""Fault injection: the faults of ../shared/SECURITY.md, caused for real.

Faults covered elsewhere: the server killed and restarted (test_server_crash.py),
the runtime killed mid-snapshot and a corrupted snapshot (test_snapshots.py), OOM
of the kernel (test_limits.py), OOM of a child process (test_probes.py, probe 20).
Numbers in test names are the faults' numbers in SECURITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager

from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, Runtime, network, runc, saving, snapshots, volume

from ..integration.conftest import OWNER, Kernels, run_cli, wait_until
from ..integration.probe import run_cell

pytestmark = pytest.mark.integration


async def _random_array(kc: Any, mib: int) -> None:
    """Give the kernel ``big``: ``mib`` MiB of random bytes (they do not compress)."""
    make = f"np.random.default_rng(1).integers(0, 255, {mib} << 20, np.uint8)"
    (await run_cell(kc, f"import numpy as np; big = {make}")).check()


@contextlib.contextmanager
def _volume_filled(leaving: int) -> Iterator[None]:
    """Fill the snapshot volume but ``leaving`` bytes, for the block."""
    filler = volume.volume_dir() / f"filler-{uuid.uuid4().hex[:8]}"
    free = os.statvfs(volume.volume_dir())
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, free.f_bavail * free.f_frsize - leaving)
        finally:
            os.close(fd)
        yield
    finally:
        filler.unlink(missing_ok=True)


def _kernel_process(runtime: Runtime, kernel_id: str, init: int) -> int:
    """The host pid of the kernel (the init's child)."""
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    assert len(children) == 1, f"the init has children {children}"
    return int(children[0])


async def test_f1_a_killed_kernel_is_brought_back_and_nothing_of_it_is_left(
    kernels: Kernels, make_spec
) -> None:
    km, kc = await kernels.start(make_spec())
    assert isinstance(km, AsyncIOLoopKernelManager)
    runtime = Runtime()
    init = await runtime.container_pid(km.kernel_id)
    assert init is not None
    restarted = asyncio.Event()
    km.add_restart_callback(restarted.set, "restart")
    (await run_cell(kc, "x = 'before'")).check()
    os.kill(_kernel_process(runtime, km.kernel_id, init), signal.SIGKILL)
    await asyncio.wait_for(restarted.wait(), 60)
    await kc.wait_for_ready(timeout=60)
    cell = await run_cell(kc, "print('x' in globals())")
    assert cell.check().strip() == "False"
    assert not Path(f"/proc/{init}").exists(), "the old container's init is still there"
    new = await runtime.container_pid(km.kernel_id)
    assert new is not None and new != init


async def test_f2_a_kernel_that_dies_at_every_start_is_given_up_with_its_log(
    kernels: Kernels, spec_prefix: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"broken-{uuid.uuid4().hex[:8]}"
    limits = Limits.parse(memory="512M", cpus="1", pids="64", disk="1G")
    folder = Path(install(name, name, provisioner_config("host", limits, "none"),
                          prefix=str(spec_prefix)))  # fmt: skip
    spec = json.loads((folder / "kernel.json").read_text())
    spec["argv"] = [
        spec["argv"][0], "-c",
        "import sys; sys.stderr.write('boom: this kernel cannot start\\n'); sys.exit(3)",
        "-f", "{connection_file}",
    ]  # fmt: skip
    (folder / "kernel.json").write_text(json.dumps(spec))
    km = AsyncIOLoopKernelManager(kernel_name=name, kernel_spec_manager=kernels.ksm)
    kernels.managers.append(km)
    caplog.set_level(logging.WARNING)
    await km.start_kernel(cwd=str(kernels.cwd))
    assert km._restarter is not None
    km._restarter.restart_limit = 2
    dead = asyncio.Event()
    km.add_restart_callback(dead.set, "dead")  # a restarter exists only after the start
    await asyncio.wait_for(dead.wait(), 60)
    assert "boom: this kernel cannot start" in caplog.text, caplog.text
    await km.shutdown_kernel(now=True)


async def test_f4_a_memory_limit_below_use_is_refused(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec(memory="1G"))
    (await run_cell(kc, "hog = bytearray(200 << 20)")).check()
    done = await run_cli("limits", km.kernel_id, "--memory", "64M")
    assert done.returncode == 2, done
    assert "64M" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (await run_cell(kc, "print(len(hog) >> 20)")).check().strip() == "200"


async def test_f6_the_runtime_killed_mid_restore_leaves_the_kernel_restored_whole(
    kernels: Kernels, make_spec, names
) -> None:
    km, kc = await kernels.start(make_spec(memory="1G"))
    (
        await run_cell(kc, "import numpy as np; big = np.ones(300 << 20, np.uint8); x = 'snap'")
    ).check()
    name = f"t-{uuid.uuid4().hex[:10]}"
    names.append(name)
    done = await run_cli("snapshot", km.kernel_id, name)
    assert done.returncode == 0, done.stderr
    (await run_cell(kc, "x = 'after'")).check()
    runtime = Runtime()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox_kernel.cli", "restore", km.kernel_id, name,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    # Once the old process is gone (the record notes the restore then), kill the
    # runtime with runc and CRIU under it.
    await wait_until(
        lambda: runtime.record(km.kernel_id).restoring is not None,
        30,
        "the old kernel to go",
        0.001,
    )
    os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
    # The provisioner's next look finishes the restore.
    assert await km.is_alive()
    await kc.wait_for_ready(timeout=60)
    out = await run_cell(kc, "print(x, int(big[:4].sum()))")
    assert out.check().strip() == "snap 4"
    assert runtime.record(km.kernel_id).restoring is None
    assert "finishing the restore" in runtime.log_path(km.kernel_id).read_text()
    state = await runc.state(f"sk-{km.kernel_id}")
    assert state is not None and state["status"] == "running"


async def test_f7_a_full_disk_during_a_snapshot_is_a_clear_error_and_leaves_nothing(
    kernels: Kernels, make_spec, names
) -> None:
    km, kc = await kernels.start(make_spec(memory="1G"))
    await _random_array(kc, 128)
    name = f"t-{uuid.uuid4().hex[:10]}"
    names.append(name)
    with _volume_filled(leaving=32 << 20):
        done = await run_cli("snapshot", km.kernel_id, name)
    assert done.returncode != 0, done.stdout
    assert "no space left on the snapshot volume" in done.stderr, done.stderr
    assert name not in snapshots.names(OWNER)
    assert not snapshots.leftovers()
    out = await run_cell(kc, "print(big.shape[0] >> 20)")
    assert out.check().strip() == "128"  # the kernel runs on, thawed


#: A runtime of its own that takes a snapshot, says whether it is being saved in the
#: background, and then (a normal exit) finishes that save: killed before it can.
_SNAPSHOT_THEN_SAVE = """
import asyncio, sys
from sandbox_kernel.runtime import Runtime

async def main():
    meta = await Runtime().snapshot(sys.argv[1], sys.argv[2])
    print("saving" if meta.get("saving") else "saved", flush=True)

asyncio.run(main())
"""


async def test_f10_the_runtime_killed_mid_save_lists_nothing_and_the_kernel_runs_on(
    kernels: Kernels, make_spec, names
) -> None:
    km, kc = await kernels.start(make_spec(memory="2G"))
    (
        await run_cell(
            kc,
            "import numpy as np; x = 'before'\n"
            "big = np.random.default_rng(2).integers(0, 255, 600 << 20, np.uint8)",
        )
    ).check()
    name = f"t-{uuid.uuid4().hex[:10]}"
    names.append(name)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SNAPSHOT_THEN_SAVE, km.kernel_id, name,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        said = await asyncio.wait_for(proc.stdout.readline(), 120)
    finally:
        # The notebook's cell would have returned here; the save is under way.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert said.strip() == b"saving", said
    # 600 MB take over a second to copy and sync: it was cut short.
    assert not snapshots.snapshot_dir(OWNER, name).exists()
    assert name not in snapshots.names(OWNER)
    # What it left is hidden and unlocked: gc removes it.
    assert snapshots.leftovers(), "no unfinished snapshot: was the save cut short?"
    assert saving.leftover_stagings(), "no staged images left: did the dump go to the volume?"
    done = await run_cli("gc")
    assert done.returncode == 0, done.stderr
    assert not snapshots.leftovers() and not saving.leftover_stagings()
    out = await run_cell(kc, "print(x, big.shape[0] >> 20)")
    assert out.check().strip() == "before 600"  # the kernel runs on, thawed
    # The name is free again, and a snapshot of it saves and restores.
    (await run_cell(kc, "x = 'second'")).check()
    done = await run_cli("snapshot", km.kernel_id, name)
    assert done.returncode == 0, done.stderr
    assert snapshots.load(OWNER, name)["mode"] == "live"


async def test_f11_a_full_volume_during_a_background_save_lists_nothing_and_says_so(
    kernels: Kernels, make_spec, names
) -> None:
    km, kc = await kernels.start(make_spec(memory="1G"))
    await _random_array(kc, 128)
    name = f"t-{uuid.uuid4().hex[:10]}"
    names.append(name)
    with _volume_filled(leaving=32 << 20):
        taken = await run_cell(kc, f"%container snapshot {name}")
        # The cell returns once the kernel runs again; the save fails after it.
        assert "writing it to disk in the background" in taken.check(), taken.stdout
        await asyncio.to_thread(saving.wait, OWNER, name, 300)
    assert name not in snapshots.names(OWNER)
    assert not snapshots.leftovers() and not saving.leftover_stagings()
    listed = (await run_cell(kc, "%container list")).check()
    assert f"Snapshot {name} was not saved: no space left on the snapshot volume" in listed
    assert Runtime().record(km.kernel_id).snapshot is None  # not the next one's parent
    out = await run_cell(kc, "print(big.shape[0] >> 20)")
    assert out.check().strip() == "128"  # the kernel runs on


async def test_f12_a_full_volume_turns_autosave_off_with_one_warning(
    kernels: Kernels, make_spec
) -> None:
    km, kc = await kernels.start(make_spec(memory="1G", autosave=True))
    (await run_cell(kc, "x = 'before'")).check()
    runtime = Runtime()

    def kept() -> list[dict[str, Any]]:
        return list(runtime.record(km.kernel_id).extra.get("checkpoints") or [])

    await wait_until(lambda: len(kept()) == 1, 60, "the first checkpoint")
    with _volume_filled(leaving=32 << 20):
        await _random_array(kc, 128)  # its checkpoint cannot be saved
        await wait_until(lambda: len(kept()) == 2, 60, "the checkpoint after the array")
        await asyncio.to_thread(saving.wait, OWNER, kept()[-1]["name"], 300)
        # At the next idle, autosave learns it and stops.
        (await run_cell(kc, "y = 1")).check()
        await wait_until(
            lambda: not runtime.record(km.kernel_id).extra.get("autosave"), 60, "autosave off"
        )
    warned = await run_cell(kc, "print(x, big.shape[0] >> 20)")
    assert warned.check().strip() == "before 128"  # the kernel runs on
    assert "autosave is off: a checkpoint could not be saved" in warned.stderr, warned
    again = await run_cell(kc, "print('once')")
    assert "autosave" not in again.stderr, again  # one warning
    status = (await run_cell(kc, "%container autosave")).check()
    assert "Autosave is off" in status and "could not be saved" in status, status
    assert [c["cell"] for c in kept()] == [1]  # the lost one is not offered to undo


async def test_f9_a_veth_left_by_a_crash_is_removed_not_reused(kernels: Kernels, make_spec) -> None:
    taken = set(network.reservations())
    index = next(i for i in range(1, 1 << 14) if i not in taken)
    stale = network.Addresses.of(index)
    await asyncio.to_thread(
        subprocess.run,
        ["ip", "link", "add", stale.veth, "type", "veth", "peer", "name", f"{stale.veth}x"],
        check=True,
    )
    try:
        before = Path(f"/sys/class/net/{stale.veth}/ifindex").read_text()
        km, kc = await kernels.start(make_spec())
        record = Runtime().record(km.kernel_id)
        assert record.index == index, "the test meant the kernel to get the stale address"
        assert not Path(f"/sys/class/net/{stale.veth}x").exists(), "the stale pair is still there"
        assert Path(f"/sys/class/net/{stale.veth}/ifindex").read_text() != before
        assert (await run_cell(kc, "print('reached')")).check().strip() == "reached"
    finally:
        await asyncio.to_thread(
            subprocess.run, ["ip", "link", "del", f"{stale.veth}x"], capture_output=True
        )


async def test_a_launch_failing_past_the_container_start_leaves_nothing(
    ksm, workdir: Path, make_spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container runs, then the next step fails (as the control server's socket
    did with "Too many open files" at ~84 kernels in one server): no container, veth,
    mount, cgroup, address or kernel folder may stay. The no_leftovers fixture
    checks the first ones."""
    from sandbox_kernel.runtime.service import ControlChannel

    async def out_of_descriptors(self: ControlChannel) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(ControlChannel, "listen", out_of_descriptors)
    km = AsyncIOLoopKernelManager(kernel_name=make_spec(), kernel_spec_manager=ksm)
    with pytest.raises(OSError, match="Too many open files"):
        await km.start_kernel(cwd=str(workdir))
    assert km.kernel_id is not None
    assert not Runtime().kernel_dir(km.kernel_id).exists()
    assert not any(info["id"].endswith(km.kernel_id) for info in await runc.list_containers())
