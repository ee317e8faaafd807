"""A bounded soak: twenty kernels receive random cells, snapshots, restores and limit
changes at once, from their notebooks (the ``%container`` magic), for a fixed number
of operations with a fixed seed.

Each kernel keeps a counter; the test keeps what the counter must be (a cell adds
one, a restore brings back the snapshot's value) and checks it after every restore.
Afterwards every snapshot taken is listed and passes its checksums, every kernel
answers, and, once they are shut down, nothing is left (the autouse check).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from sandbox_kernel.runtime import saving, snapshots

from ..integration.conftest import Kernels
from ..integration.probe import run_cell

pytestmark = [pytest.mark.integration, pytest.mark.soak]

KERNELS = 20
OPERATIONS = 8  # per kernel: 160 in all
SEED = 20261129
OWNER = "65534"


async def _drive(index: int, kc: Any, rng: random.Random, taken: dict[str, int]) -> list[str]:
    """Run one kernel's random operations; return what happened, for the report."""
    counter = 0
    mine: dict[str, int] = {}
    done: list[str] = []
    (await run_cell(kc, "counter = 0")).check()
    for step in range(OPERATIONS):
        op = rng.choice(["execute", "execute", "snapshot", "restore", "limits"])
        if op == "restore" and not mine:
            op = "snapshot"
        if op == "execute":
            (await run_cell(kc, "counter += 1")).check()
            counter += 1
        elif op == "snapshot":
            name = f"soak-{SEED}-{index}-{step}"
            cell = await run_cell(kc, f"%container snapshot {name}", timeout=120)
            assert f"Snapshot {name}: live" in cell.check(), cell
            mine[name] = taken[name] = counter
        elif op == "restore":
            name = rng.choice(sorted(mine))
            cell = await run_cell(kc, f"%container restore {name}", timeout=120)
            assert f"Restored to snapshot {name} (live)" in cell.check(), cell
            counter = mine[name]
            out = (await run_cell(kc, "print(counter)")).check().strip()
            assert out == str(counter), f"kernel {index} after restoring {name}: {out}"
        else:
            cpus = rng.choice(["0.5", "0.75", "1"])  # at most the kernelspec's 1
            pids = rng.choice(["256", "512"])
            cell = await run_cell(kc, f"%container limits --cpus {cpus} --pids {pids}")
            assert pids in cell.check(), cell
        done.append(op)
    assert (await run_cell(kc, "print(counter)")).check().strip() == str(counter)
    return done


async def test_twenty_kernels_under_random_operations(kernels: Kernels, make_spec) -> None:
    spec = make_spec(memory="512M", cpus="1", pids="512")
    started = await asyncio.gather(*(kernels.start(spec) for _ in range(KERNELS)))
    taken: dict[str, int] = {}
    try:
        rngs = [random.Random(SEED + i) for i in range(KERNELS)]
        # A task group cancels the other kernels' cells when one fails.
        async with asyncio.TaskGroup() as group:
            drives = [
                group.create_task(_drive(i, kc, rngs[i], taken))
                for i, (_, kc) in enumerate(started)
            ]
        assert sum(len(d.result()) for d in drives) == KERNELS * OPERATIONS
        listed = set(snapshots.names(OWNER))
        lost = sorted(set(taken) - listed)
        assert not lost, f"snapshots lost: {lost}"
        for name in taken:
            assert snapshots.verify(OWNER, name)["mode"] == "live"
        for _, kc in started:
            assert (await run_cell(kc, "print('alive')")).check().strip() == "alive"
    finally:
        # A failure cancels the other kernels' cells, not what the runtime does for
        # them: their kernels go first, so no snapshot is still being taken or
        # restored below.
        await kernels.close()
        assert await asyncio.to_thread(saving.wait_all, 300), "a snapshot was still saving"
        # Every snapshot of this test's names, taken or not (one cut short by a
        # failure, or left by an earlier run that was killed).
        for name in snapshots.names(OWNER):
            if name.startswith(f"soak-{SEED}-"):
                snapshots.delete(OWNER, name)
