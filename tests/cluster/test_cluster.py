"""The test cluster of ``make cluster``: three real Slurm nodes, each in its own
network namespace with its own sandbox-kernel daemon and local state, that run
jobs where Slurm says; ``make cluster-down`` leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.doctor import run_checks
from sandbox_kernel.runtime import cluster

pytestmark = pytest.mark.integration


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


def test_each_node_runs_jobs_as_itself_at_its_own_address(up: None) -> None:
    assert cluster.states() == {n.name: "idle" for n in cluster.nodes()}
    for node in cluster.nodes():
        out = run("srun", "-w", node.name, "sh", "-c", "hostname; ip -4 -o addr show eth0")
        name, addr = out.splitlines()
        assert name == node.name
        assert f"inet {node.address}/" in addr
    spread = run("srun", "-N", str(cluster.NODES), "hostname").split()
    assert sorted(spread) == [n.name for n in cluster.nodes()]


def test_a_job_gets_the_memory_it_asked_for_as_a_ceiling(up: None) -> None:
    # The job's own cgroup and those above it: the lowest limit holds.
    script = (
        'p=$(awk -F: "/memory/ {print \\$3}" /proc/self/cgroup); '
        'while [ "$p" != / ]; do cat /sys/fs/cgroup/memory$p/memory.limit_in_bytes; '
        "p=$(dirname $p); done"
    )
    out = run("srun", "-w", "node1", "--mem=300M", "sh", "-c", script)
    assert min(int(line) for line in out.split()) == 300 << 20, out


def test_doctor_checks_the_cluster(up: None) -> None:
    found = {c.name: c for c in run_checks()}["slurm cluster"]
    assert found.ok and "node1 idle" in found.detail, found


def test_each_node_has_its_own_daemon_and_a_job_finds_it(up: None) -> None:
    served = set()
    for node in cluster.nodes():
        me = DaemonClient(str(node.socket)).call_sync("whoami")
        assert me["uid"] == 0 and me["admin"] is True
        served.add(me["served_by"])
        assert DaemonClient(str(node.socket)).call_sync("kernels") == []
    assert len(served) == cluster.NODES  # three daemons, not one
    # A job on node2 reaches node2's daemon at the usual socket.
    script = (
        "from sandbox_kernel.daemon_client import DaemonClient; "
        "print(DaemonClient().call_sync('whoami')['served_by'])"
    )
    out = run("srun", "-w", "node2", sys.executable, "-c", script)
    node2 = DaemonClient(str(cluster.Node(2).socket)).call_sync("whoami")["served_by"]
    assert int(out) == node2
