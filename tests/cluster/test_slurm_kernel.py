"""A sandboxed kernel as a Slurm job: started through jupyter_client with the
provisioner's ``backend = slurm``, on the node Slurm picks, through that node's
daemon; its ports forwarded from this machine."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from ..integration.conftest import wait_until
from ..integration.probe import run_cell
from ..integration.test_server_crash import orphan_kernel
from .kernels import SPEC, node_kernels, squeue, start

pytestmark = pytest.mark.integration


async def test_a_kernel_runs_as_a_job_on_its_node_and_ends_with_it(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    km, kc = await start(ksm, work)
    try:
        job = km.provisioner.kernel
        assert squeue(job.job_id) == f"RUNNING {job.node}"
        assert node_kernels()[job.node] == [km.kernel_id]
        assert km.connection_file and km.ip == "127.0.0.1"  # forwarded from here
        ps = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "sandbox_kernel.cli", "ps"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        row = next(line for line in ps.stdout.splitlines() if km.kernel_id in line)
        assert row.split()[2:] == ["running", job.node, str(job.job_id)], ps.stdout
        assert (await run_cell(kc, "print(6 * 7)")).check().strip() == "42"
        status = (await run_cell(kc, "%container status")).check()
        assert "512M" in status, status
        (await run_cell(kc, "open('made-on-the-node.txt', 'w').write('x')")).check()
        assert (work / "made-on-the-node.txt").exists() is False  # the layer, not the host
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert squeue(job.job_id) == ""
    assert all(not kernels for kernels in node_kernels().values())


async def test_scancel_ends_the_kernel_and_the_restarters_new_kernel_runs(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    km, kc = await start(ksm, work)
    restarts: list[bool] = []
    km.add_restart_callback(lambda: restarts.append(True), "restart")
    try:
        (await run_cell(kc, "x = 1")).check()
        job = km.provisioner.kernel.job_id
        await asyncio.to_thread(subprocess.run, ["scancel", str(job)], check=True, timeout=30)
        # The provisioner reports it dead; the restarter starts a new kernel as a job.
        await wait_until(lambda: restarts, 60, "the restarter to see the kernel dead")
        await wait_until(lambda: km.provisioner.kernel.job_id not in (None, job), 120,
                         "the new kernel's job")  # fmt: skip
        await kc.wait_for_ready(timeout=120)
        cell = await run_cell(kc, "print('x' in dir())")
        assert cell.check().strip() == "False"  # a new kernel, on the same connection file
        assert squeue(job) == ""
        assert list(node_kernels().values()).count([km.kernel_id]) == 1
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert all(not kernels for kernels in node_kernels().values())


async def test_a_restarted_server_adopts_its_slurm_kernel_again(
    up: None, slurm_kernels: Any, tmp_path: Path
) -> None:
    ksm, work = slurm_kernels
    info = await orphan_kernel(ksm, SPEC, work, tmp_path)  # its server was SIGKILLed
    job = int(info["job"])
    assert squeue(job) == f"RUNNING {info['node']}", "the kernel's job outlives its server"
    km = AsyncIOLoopKernelManager(kernel_name=SPEC, kernel_spec_manager=ksm)
    km.kernel_id = info["kernel_id"]
    km.load_connection_info(info["connection_info"])
    km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        km.kernel_id, km.kernel_spec, parent=km
    )
    await km.provisioner.load_provisioner_info(info)
    kc = km.client()
    kc.start_channels()
    try:
        assert await km.is_alive()
        await kc.wait_for_ready(timeout=60)
        assert (await run_cell(kc, "print(survivor)")).check().strip() == "still here"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert squeue(job) == ""
    assert all(not kernels for kernels in node_kernels().values())


async def test_a_restart_keeps_the_kernels_files_in_the_same_job(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    km, kc = await start(ksm, work)
    try:
        job, node = km.provisioner.kernel.job_id, km.provisioner.kernel.node
        (await run_cell(kc, "x = 1; open('/tmp/kept.txt', 'w').write('mine')")).check()
        await km.restart_kernel()  # as the notebook's Restart does (not now=True)
        await kc.wait_for_ready(timeout=60)
        cell = await run_cell(kc, "print('x' in dir(), open('/tmp/kept.txt').read())")
        assert cell.check().split() == ["False", "mine"]  # a new process, the same files
        assert (km.provisioner.kernel.job_id, km.provisioner.kernel.node) == (job, node)
        assert squeue(job) == f"RUNNING {node}"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert squeue(job) == ""
    assert all(not kernels for kernels in node_kernels().values())
