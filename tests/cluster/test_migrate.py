"""Kernels across the cluster's nodes: spread by Slurm, snapshots shared between
nodes, live kernels moved (``migrate``, ``drain``) with their notebook connected,
and a dead node's kernels brought back elsewhere from their snapshots."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.runtime import cluster

from ..integration.conftest import wait_until
from ..integration.probe import run_cell
from .kernels import jobs, node_kernels, squeue, start, stop

pytestmark = pytest.mark.integration


def cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "sandbox_kernel.cli", *argv],
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def memory_ceiling(node: str, kernel_id: str) -> int:
    """The memory limit of the kernel's container, as its node's cgroup has it."""
    top = Path("/sys/fs/cgroup/memory") / cluster._node(node).cgroup_parent
    found = [p for p in top.rglob("memory.limit_in_bytes") if kernel_id in str(p)]
    assert found, f"no cgroup of {kernel_id} below {top}"
    return min(int(p.read_text()) for p in found)


async def test_six_kernels_spread_over_the_nodes_each_where_slurm_put_it_within_its_limits(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    started = await asyncio.gather(*(start(ksm, work) for _ in range(6)))
    try:
        where = {}
        for km, kc in started:
            job = km.provisioner.kernel
            assert squeue(job.job_id) == f"RUNNING {job.node}"
            where[km.kernel_id] = job.node
            host = (await run_cell(kc, "import socket; print(socket.gethostname())")).check()
            assert host.strip() == f"kernel-{km.kernel_id[:8]}"
            assert memory_ceiling(job.node, km.kernel_id) == 512 << 20
            refused = await run_cell(kc, "%container limits --memory 2G")
            assert refused.status == "error" and "512M" in refused.evalue, refused
        assert sorted(set(where.values())) == [n.name for n in cluster.nodes()], where
        listed = node_kernels()
        for kid, node in where.items():
            assert kid in listed[node]
    finally:
        await stop(*started)
    assert all(not kernels for kernels in node_kernels().values())


async def test_a_snapshot_taken_on_one_node_is_restored_into_a_kernel_on_another(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    one = await start(ksm, work)
    two = await start(ksm, work)
    try:
        nodes = one[0].provisioner.kernel.node, two[0].provisioner.kernel.node
        assert nodes[0] != nodes[1]  # the partition spreads them (LLN)
        (await run_cell(one[1], "y = 7; open('note.txt', 'w').write('from one')")).check()
        (await run_cell(one[1], "%container snapshot across")).check()
        store = Path(os.environ["SANDBOX_KERNEL_STORE"])
        await wait_until(lambda: (store / "across.json").exists(), 60, "its publication")
        restored = await run_cell(two[1], "%container restore across")
        assert restored.status == "ok", restored.evalue
        after = (await run_cell(two[1], "print(y, open('note.txt').read())")).check()
        assert after.strip() == "7 from one"
        assert two[0].provisioner.kernel.node == nodes[1]  # restored there, not moved
    finally:
        await stop(one, two)


async def test_migrate_moves_a_live_kernel_mid_cell_and_the_same_client_goes_on(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    km, kc = await start(ksm, work)
    try:
        job = km.provisioner.kernel
        source = job.node
        target = next(n.name for n in cluster.nodes() if n.name != source)
        setup = (
            "import threading, time\n"
            "x = 41\n"
            "f = open('held.txt', 'w+'); f.write('abc'); f.flush()\n"
            "ticks = [0]\n"
            "def tick():\n"
            "    while True:\n"
            "        ticks[0] += 1; time.sleep(0.01)\n"
            "t = threading.Thread(target=tick, daemon=True); t.start()"
        )
        (await run_cell(kc, setup)).check()
        # A move Slurm refuses leaves the kernel as it was, and nothing behind.
        refused = await asyncio.to_thread(cli, "migrate", km.kernel_id, "--to", "node9",
                                          check=False)  # fmt: skip
        assert refused.returncode != 0, refused.stdout
        said = "'node9' is not a node of this cluster; use one of node1, node2, node3"
        assert said in refused.stderr, refused.stderr
        assert jobs() == [str(job.job_id)] and job.node == source
        store = Path(os.environ["SANDBOX_KERNEL_STORE"])
        assert not list(store.glob(".move-*")) and not list(store.glob("*.moving"))
        # A cell that runs through the move: every line it prints arrives, once.
        counting = asyncio.ensure_future(run_cell(
            kc, "for i in range(60):\n    print(i, flush=True); time.sleep(0.1)", timeout=120
        ))  # fmt: skip
        await asyncio.sleep(1.0)  # the cell is under way (it prints for 6 s)
        moved = await asyncio.to_thread(cli, "migrate", km.kernel_id, "--to", target)
        assert f"to {target}" in moved.stdout and "kernel unavailable" in moved.stdout
        cell = await counting
        assert cell.check().split() == [str(i) for i in range(60)]
        assert (job.node, squeue(job.job_id)) == (target, f"RUNNING {target}")
        code = "f.seek(0); n = ticks[0]; time.sleep(0.2)\n"
        code += "print(x + 1, f.read(), t.is_alive(), ticks[0] > n)"
        after = await run_cell(kc, code)
        assert after.check().split() == ["42", "abc", "True", "True"]
        assert node_kernels()[source] == [] and node_kernels()[target] == [km.kernel_id]
        await wait_until(lambda: len(jobs()) == 1, 60, "the old job to end")
        again = cli("migrate", km.kernel_id, "--to", target, check=False)
        assert again.returncode != 0 and "runs already" in again.stderr
    finally:
        await stop((km, kc))
    assert all(not kernels for kernels in node_kernels().values())
    assert jobs() == []


async def test_drain_moves_every_kernel_off_a_node_and_the_notebooks_go_on(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    started = await asyncio.gather(*(start(ksm, work) for _ in range(4)))
    try:
        for n, (_, kc) in enumerate(started):
            (await run_cell(kc, f"v = {n}")).check()
        on_node2 = [km.kernel_id for km, _ in started if km.provisioner.kernel.node == "node2"]
        assert on_node2, "LLN puts one of four kernels on each node"
        drained = await asyncio.to_thread(cli, "drain", "node2")
        for kid in on_node2:
            assert f"{kid}" in drained.stdout and "moved" in drained.stdout
        assert cluster.states()["node2"] in ("drain", "drng")
        for n, (km, kc) in enumerate(started):
            assert km.provisioner.kernel.node != "node2"
            assert (await run_cell(kc, "print(v)")).check().strip() == str(n)
        assert node_kernels()["node2"] == []
    finally:
        await stop(*started)
        resume = ["scontrol", "update", "nodename=node2", "state=resume"]
        await asyncio.to_thread(subprocess.run, resume, check=True)
        await asyncio.to_thread(cluster.wait_idle)


async def test_a_dead_nodes_kernels_come_back_elsewhere_from_their_snapshots(
    up: None, slurm_kernels: Any
) -> None:
    ksm, work = slurm_kernels
    started = await asyncio.gather(*(start(ksm, work) for _ in range(6)))
    on_node3 = [(km, kc) for km, kc in started if km.provisioner.kernel.node == "node3"]
    assert len(on_node3) == 2, "LLN puts two of six kernels on each node"
    (_, saved_kc), (_, cold_kc) = on_node3
    try:
        (await run_cell(saved_kc, "x = 'before'")).check()
        (await run_cell(saved_kc, "%container snapshot lifeboat")).check()
        (await run_cell(saved_kc, "x = 'after'")).check()
        (await run_cell(cold_kc, "x = 'never saved'")).check()
        store = Path(os.environ["SANDBOX_KERNEL_STORE"])
        await wait_until(lambda: (store / "lifeboat.json").exists(), 60, "its publication")
        killed = time.monotonic()
        cluster.kill_node("node3")

        async def back() -> bool:
            return all(
                km.provisioner.kernel.node not in (None, "node3") and km.provisioner.kernel.running
                for km, _ in on_node3
            )

        await wait_until(back, 180, "node3's kernels to come back on other nodes")
        took = time.monotonic() - killed
        for _, kc in on_node3:
            await kc.wait_for_ready(timeout=60)
        print(f"\nnode3's 2 kernels came back in {took:.1f} s, answered in "
              f"{time.monotonic() - killed:.1f} s")  # fmt: skip
        cell = await run_cell(saved_kc, "print(x)")
        assert cell.check().strip() == "before"
        assert "node (node3) stopped" in cell.stderr and "lifeboat" in cell.stderr
        cold = await run_cell(cold_kc, "print('x' in dir())")
        assert cold.check().strip() == "False"  # no snapshot: a cold start, as a restarter's
        for _, kc in started:
            assert (await run_cell(kc, "print(1)")).check().strip() == "1"
    finally:
        await stop(*started)
        cluster.revive_node("node3")
    assert all(not kernels for kernels in node_kernels().values())
