"""Fixtures for the integration tier: real runc containers, real kernels.

Kernelspecs are installed by the product's own ``install`` into a temporary prefix,
and kernels are started through jupyter_client's KernelManager with that spec.
Every test is checked afterwards: it must leave no container, netns, veth, mount,
cgroup or address reservation behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, saving, snapshots

from .leftovers import snapshot

if os.geteuid() != 0:
    raise RuntimeError("the integration tests need root: run them through `make test`")


@pytest.fixture(scope="session")
def spec_prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernelspecs")


@pytest.fixture(scope="session")
def ksm(spec_prefix: Path) -> KernelSpecManager:
    return KernelSpecManager(kernel_dirs=[str(spec_prefix / "share/jupyter/kernels")])


@pytest.fixture(scope="session")
def make_spec(spec_prefix: Path) -> Callable[..., str]:
    """Install a sandbox kernelspec with these limits; return its name. Its kernels
    run in the test's own process (``daemon: off``) even where a daemon runs: the
    daemon's own tests start one of their own."""
    made: dict[tuple[Any, ...], str] = {}

    def make(
        memory: str = "1G", cpus: str = "1", pids: str = "256", network: str = "none",
        disk: str = "1G", shm: str = "", pristine_base: bool = True, **more: Any,
    ) -> str:  # fmt: skip
        key = (memory, cpus, pids, network, disk, shm, pristine_base, *sorted(more.items()))
        if key not in made:
            name = f"sbx-{len(made)}"
            limits = Limits.parse(memory=memory, cpus=cpus, pids=pids, disk=disk)
            config = {**provisioner_config("host", limits, network), "daemon": "off"}
            if shm:
                config["shm"] = shm
            if not pristine_base:
                config["pristine_base"] = False
            config.update(more)  # e.g. pool, kernel_uid
            install(name, name, config, prefix=str(spec_prefix))
            made[key] = name
        return made[key]

    return make


#: The kernels' user in these tests (the folders are root's, so uid 65534).
OWNER = "65534"


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Unique snapshot names for one test; every one is deleted afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        if name in snapshots.names(OWNER):
            snapshots.delete(OWNER, name)


def fresh(names: list[str]) -> str:
    """A new snapshot name, deleted after the test (see :func:`names`)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    names.append(name)
    return name


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A notebook folder for the kernel, readable by the kernel's unprivileged user."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    reachable_by_all(folder)
    return folder


def reachable_by_all(folder: Path) -> None:
    """Let every user read and enter ``folder`` and the folders above it (a kernel
    runs as another user than the test)."""
    for part in [folder, *folder.parents]:
        if part == Path("/"):
            break
        part.chmod(part.stat().st_mode | 0o005)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves a container, netns, veth, mount, cgroup or reservation."""
    before = snapshot()
    yield
    assert saving.wait_all(300), "a snapshot was still being saved 300 s after the test"
    after = snapshot()
    new = {kind: sorted(after[kind] - before[kind]) for kind in after}
    leaked = {kind: items for kind, items in new.items() if items}
    assert not leaked, f"the test left these behind: {leaked}"


class Kernels:
    """Starts kernels for one test and shuts every one of them down at the end."""

    def __init__(self, ksm: KernelSpecManager, cwd: Path) -> None:
        self.ksm = ksm
        self.cwd = cwd
        self.managers: list[AsyncIOLoopKernelManager] = []
        self.clients: list[Any] = []

    async def start(self, spec: str, **kwargs: Any) -> tuple[AsyncIOLoopKernelManager, Any]:
        km = AsyncIOLoopKernelManager(kernel_name=spec, kernel_spec_manager=self.ksm)
        self.managers.append(km)
        await km.start_kernel(cwd=str(kwargs.pop("cwd", self.cwd)), **kwargs)
        kc = km.client()
        self.clients.append(kc)
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        return km, kc

    async def close(self) -> None:
        for kc in self.clients:
            kc.stop_channels()
        for km in self.managers:
            with contextlib.suppress(Exception):
                if km.has_kernel:
                    await km.shutdown_kernel(now=True)
        self.clients.clear()
        self.managers.clear()


@pytest_asyncio.fixture
async def kernels(ksm: KernelSpecManager, workdir: Path) -> AsyncIterator[Kernels]:
    pool = Kernels(ksm, workdir)
    try:
        yield pool
    finally:
        await pool.close()


async def execute_notebook(nb: Any, ksm: KernelSpecManager, spec: str, cwd: Path) -> list[str]:
    """Run ``nb`` with nbclient in a kernel of ``spec``; return each cell's text output."""
    km = AsyncKernelManager(kernel_name=spec, kernel_spec_manager=ksm)
    client = NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(cwd)}})
    try:
        await client.async_execute()
    finally:
        # nbclient closes and shuts down only the client and kernel it made itself.
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    return [
        "".join(
            o.get("text") or o.get("data", {}).get("text/plain", "")
            for o in cell.get("outputs", [])
        )
        for cell in nb.cells
    ]


@dataclass
class Done:
    """A finished command: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


async def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Done:
    """Run ``sandbox-kernel ARGS`` as an operator would, without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox_kernel.cli", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # timed out: it must not act after the test
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def unique(prefix: str = "sk-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Wait until ``predicate()`` is truthy (it may be async); fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


# The daemon's fixtures (they use the helpers above).
from .daemon import daemon, users  # noqa: E402, F401
from .hub import hub  # noqa: E402, F401
