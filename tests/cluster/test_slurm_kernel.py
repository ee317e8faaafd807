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
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, cluster

from ..integration.conftest import reachable_by_all, wait_until
from ..integration.probe import run_cell

pytestmark = pytest.mark.integration
SPEC = "sk-slurm-test"


@pytest.fixture
def slurm_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SANDBOX_KERNEL_SLURM_DIR", str(tmp_path / "jobs"))
    limits = Limits.parse(memory="512M", cpus="1", pids="256", disk="2G")
    config = {**provisioner_config("host", limits, "none"), "backend": "slurm",
              "pristine_base": False}  # fmt: skip
    install(SPEC, "slurm test", config, prefix=str(tmp_path))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share/jupyter/kernels")])
    work = tmp_path / "work"
    work.mkdir()
    reachable_by_all(work)
    return ksm, work


def node_kernels() -> dict[str, list[str]]:
    return {
        n.name: [k["kernel_id"] for k in DaemonClient(str(n.socket)).call_sync("kernels")]
        for n in cluster.nodes()
    }


def squeue(job: int) -> str:
    done = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T %N"], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    return done.stdout.strip()


async def start(ksm: KernelSpecManager, work: Path) -> tuple[AsyncKernelManager, Any]:
    km = AsyncKernelManager(kernel_name=SPEC, kernel_spec_manager=ksm)
    await km.start_kernel(cwd=str(work))
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=120)
    return km, kc


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


async def test_scancel_ends_the_kernel_and_the_provisioner_says_so(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    km, kc = await start(ksm, work)
    try:
        job = km.provisioner.kernel.job_id
        await asyncio.to_thread(subprocess.run, ["scancel", str(job)], check=True, timeout=30)

        async def dead() -> bool:
            return not await km.is_alive()

        await wait_until(dead, 60, "the provisioner to see the job's end")
        assert all(not kernels for kernels in node_kernels().values())
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
