"""The operator's CLI against real kernels: ps, logs, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_kernel.runtime import snapshots

from .conftest import OWNER, Kernels, fresh, run_cli
from .probe import run_cell

pytestmark = pytest.mark.integration


async def test_ps_lists_use_against_limits(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec(memory="768M", pids="100"))
    (await run_cell(kc, "x = 1")).check()
    done = await run_cli("ps")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:4] == ["KERNEL", "ID", "USER", "STATUS"]
    row = next(r for r in rows if r.startswith(km.kernel_id))
    assert "running" in row
    assert "/ 768M" in row
    assert "/ 100" in row


async def test_logs_of_a_kernel(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "import sys; print('to the log', file=sys.__stderr__, flush=True)")).check()
    done = await run_cli("logs", km.kernel_id)
    assert done.returncode == 0, done.stderr
    assert "to the log" in done.stdout


async def test_logs_of_an_unknown_kernel() -> None:
    done = await run_cli("logs", "no-such-kernel")
    assert done.returncode == 2
    assert "no sandboxed kernel with id 'no-such-kernel'" in done.stderr


async def test_a_snapshot_is_deleted_after_its_kernel_is_gone(
    kernels: Kernels, make_spec, names
) -> None:
    km, kc = await kernels.start(make_spec())
    name = fresh(names)
    done = await run_cli("snapshot", km.kernel_id, name, "--files-only")
    assert done.returncode == 0, done.stderr
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    assert name in snapshots.names(OWNER)
    done = await run_cli("snapshots", "--delete", name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Deleted snapshot {name} of user {OWNER}"
    assert name not in snapshots.names(OWNER)


async def test_install_warns_of_a_twin_display_name(tmp_path: Path) -> None:
    env = {"JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_PATH": "",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}  # fmt: skip
    first = await run_cli(
        "install", "--name", "twin-a", "--display-name", "Twin", "--user", env=env
    )
    assert first.returncode == 0 and "warning" not in first.stderr, first.stderr
    second = await run_cli(
        "install", "--name", "twin-b", "--display-name", "Twin", "--user", env=env
    )
    assert second.returncode == 0
    assert "kernelspecs twin-a have the same display name 'Twin'" in second.stderr
