"""Base snapshots: new kernels of a kernelspec start from a live snapshot.

The base is made by the operator's command (``sandbox-kernel install --base``), and
kernels start through jupyter_client with that kernelspec, from other folders too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from sandbox_kernel.runtime import Runtime, bases, snapshots
from sandbox_kernel.runtime.record import Start

from .conftest import Kernels, run_cli
from .probe import run_cell

pytestmark = pytest.mark.integration

OWNER = "65534"


@pytest.fixture
def base_specs(tmp_path: Path) -> Iterator[tuple[Path, KernelSpecManager]]:
    """A Jupyter data folder for kernelspecs installed with --user; bases and
    snapshots made in the test are deleted afterwards."""
    data = tmp_path / "jupyter-data"
    before = {b["id"] for b in bases.listing()}
    made = set(snapshots.names(OWNER))
    yield data, KernelSpecManager(kernel_dirs=[str(data / "kernels")])
    for meta in bases.listing():
        if meta["id"] not in before:
            bases.delete(meta["id"])
    for name in set(snapshots.names(OWNER)) - made:
        snapshots.delete(OWNER, name)


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def _install_base(kernels: Kernels, make_spec, data: Path) -> tuple[str, str]:
    """A kernel that imported numpy and wrote a file, snapshotted and installed as the
    base of a new kernelspec; returns (kernelspec, snapshot)."""
    km, kc = await kernels.start(make_spec())
    cell = await run_cell(
        kc,
        "import numpy as np\n"
        "marker = np.arange(5).sum()\n"
        "open('from-the-base.txt', 'w').write('base')\n"
        "print(open('/run/sandbox/connection.json').read())",
    )
    base_key = json.loads(cell.stdout)["key"]
    snap, spec = _name(), _name()
    done = await run_cli("snapshot", km.kernel_id, snap)
    assert done.returncode == 0, done.stderr
    done = await run_cli(
        "install", "--name", spec, "--base", snap, "--memory", "1G", "--user",
        env={"JUPYTER_DATA_DIR": str(data)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "new kernels start from base" in done.stdout
    listed = await run_cli("bases")
    assert listed.returncode == 0 and snap in listed.stdout, listed
    return spec, base_key


async def test_new_kernels_start_from_the_base_with_their_own_key_and_folder(
    kernels: Kernels, make_spec, base_specs, tmp_path: Path
) -> None:
    data, ksm = base_specs
    spec, base_key = await _install_base(kernels, make_spec, data)
    other = tmp_path / "elsewhere"
    other.mkdir(mode=0o755)
    (other / "own.txt").write_text("mine")
    kernels.ksm = ksm
    km1, kc1 = await kernels.start(spec, cwd=other)
    km2, kc2 = await kernels.start(spec)
    runtime = Runtime()
    for km in (km1, km2):
        record = runtime.record(km.kernel_id)
        assert record.start is Start.BASE, record.base_note
        assert km.session.key.decode() != base_key  # each kernel signs with its own key
    out = await run_cell(
        kc1,
        "import os, sys\nprint(marker, 'numpy' in sys.modules, sorted(os.listdir('.')))\nmine = 1",
    )
    assert out.stdout.split("\n")[0] == "10 True ['from-the-base.txt', 'own.txt']", out
    out = await run_cell(kc2, "print(marker, 'mine' in globals())")
    assert out.stdout.strip() == "10 False"  # the two kernels share nothing
    # Each has its own hostname (the base's was another kernel's).
    for km, kc in ((km1, kc1), (km2, kc2)):
        out = await run_cell(kc, "import socket; print(socket.gethostname())")
        assert out.stdout.strip() == f"kernel-{km.kernel_id[:8]}"
    # A snapshot of a kernel started from the base shares the base's unchanged pages.
    snap = _name()
    done = await run_cli("snapshot", km1.kernel_id, snap)
    try:
        assert done.returncode == 0, done.stderr
        meta = snapshots.load(OWNER, snap)
        assert meta["mode"] == "live"
        assert meta["shared_bytes"] > meta["memory_bytes"] // 2, meta
    finally:
        if snap in snapshots.names(OWNER):
            snapshots.delete(OWNER, snap)


async def test_a_kernel_whose_base_is_gone_starts_cold_and_says_why(
    kernels: Kernels, make_spec, base_specs
) -> None:
    data, ksm = base_specs
    spec, _ = await _install_base(kernels, make_spec, data)
    spec_file = data / "kernels" / spec / "kernel.json"
    base_id = json.loads(spec_file.read_text())["metadata"]["kernel_provisioner"]["config"]["base"]
    bases.delete(base_id)
    kernels.ksm = ksm
    km, kc = await kernels.start(spec)
    record = Runtime().record(km.kernel_id)
    assert record.start is Start.COLD
    assert "does not exist on this machine" in record.base_note
    out = await run_cell(kc, "print('marker' in globals(), 1 + 1)")
    assert out.stdout.strip() == "False 2"


async def test_install_refuses_a_missing_base_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "jupyter-data"
    done = await run_cli(
        "install", "--name", "never", "--base", "no-such-snapshot", "--user",
        env={"JUPYTER_DATA_DIR": str(data)},
    )  # fmt: skip
    assert done.returncode == 2
    assert "no snapshot named 'no-such-snapshot'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (data / "kernels" / "never").exists()
