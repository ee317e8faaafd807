"""A kernel whose server was killed is re-adopted by the next server, or removed by gc."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from .conftest import Kernels, run_cli
from .leftovers import kernel_objects
from .probe import run_cell

pytestmark = pytest.mark.integration


async def orphan_kernel(ksm, spec: str, workdir: Path, tmp_path: Path) -> dict:
    """Start a kernel from a separate server process, SIGKILL that server, return its info."""
    info_path = tmp_path / "provisioner-info.json"
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("server.py")),
        ksm.kernel_dirs[0], spec, str(workdir), str(info_path),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert server.stdout is not None
    try:
        line = await asyncio.wait_for(server.stdout.readline(), 90)
        assert line.strip() == b"ready", "the stand-in server did not start its kernel"
    finally:
        server.kill()
        await server.wait()
    return json.loads(info_path.read_text())


async def test_restarted_server_re_adopts_its_kernel(
    kernels: Kernels, ksm, make_spec, workdir: Path, tmp_path: Path
) -> None:
    spec = make_spec()
    info = await orphan_kernel(ksm, spec, workdir, tmp_path)
    kernel_id = info["kernel_id"]
    assert kernel_objects(kernel_id), "the kernel died with its server"

    km = AsyncIOLoopKernelManager(kernel_name=spec, kernel_spec_manager=ksm)
    kernels.managers.append(km)
    km.kernel_id = kernel_id
    km.load_connection_info(info["connection_info"])
    km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        kernel_id, km.kernel_spec, parent=km
    )
    await km.provisioner.load_provisioner_info(info)
    assert await km.is_alive()
    kc = km.client()
    kernels.clients.append(kc)
    kc.start_channels()
    await kc.wait_for_ready(timeout=30)
    assert (await run_cell(kc, "print(survivor)")).check().strip() == "still here"

    await km.shutdown_kernel(now=True)
    assert kernel_objects(kernel_id) == []


async def test_gc_removes_a_kernel_whose_server_died(
    ksm, make_spec, workdir: Path, tmp_path: Path
) -> None:
    info = await orphan_kernel(ksm, make_spec(), workdir, tmp_path)
    kernel_id = info["kernel_id"]
    assert kernel_objects(kernel_id)
    done = await run_cli("gc")
    assert done.returncode == 0, done.stderr
    assert f"removed kernel {kernel_id}" in done.stdout
    assert kernel_objects(kernel_id) == []
