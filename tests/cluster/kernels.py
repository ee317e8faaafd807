"""Sandboxed kernels as Slurm jobs, started through jupyter_client as a Jupyter
server starts them (with the restarter), for the cluster's tests."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, cluster

from ..integration.conftest import reachable_by_all

SPEC = "sk-slurm-test"


@pytest.fixture
def slurm_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A kernelspec of the slurm backend (512M, 1 CPU), the jobs' folder and the
    shared snapshot store below ``tmp_path``; ``(ksm, work folder)``."""
    monkeypatch.setenv("SANDBOX_KERNEL_SLURM_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("SANDBOX_KERNEL_STORE", str(tmp_path / "store"))
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
    """Each node's kernels, as its own daemon lists them."""
    return {
        n.name: [k["kernel_id"] for k in DaemonClient(str(n.socket)).call_sync("kernels")]
        for n in cluster.nodes()
    }


def squeue(job: int) -> str:
    done = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T %N"], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    return done.stdout.strip()


def jobs() -> list[str]:
    done = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                          timeout=30, check=True)  # fmt: skip
    return done.stdout.split()


async def start(ksm: KernelSpecManager, work: Path) -> tuple[AsyncIOLoopKernelManager, Any]:
    """A kernel and a connected client; the manager's restarter runs, as in a server."""
    km = AsyncIOLoopKernelManager(kernel_name=SPEC, kernel_spec_manager=ksm)
    await km.start_kernel(cwd=str(work))
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=120)
    return km, kc


async def stop(*pairs: tuple[AsyncIOLoopKernelManager, Any]) -> None:
    """Shut the kernels down; none of their forwards on this machine may be left."""
    for km, kc in pairs:
        kc.stop_channels()
        ports = [km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port]
        await km.shutdown_kernel(now=True)
        for port in ports:
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still forwards"
