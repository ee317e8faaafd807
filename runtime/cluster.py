"""A real Slurm cluster on this one machine: ``make cluster`` and ``make cluster-down``.

Three compute nodes, each a network namespace (``slnode1`` to ``slnode3``) with
its own address on one host bridge, its own hostname and its own ``/etc/hosts``
(bound in a mount namespace of its own), running Debian's ``slurmd``. The
controller, ``slurmctld``, runs on the host at the bridge's address; ``munged``
authenticates them. The configuration is written to ``/etc/slurm`` (where the
Slurm commands look), marked as this module's, and removed by :func:`down`.

Every node also runs the sandbox-kernel daemon, as a real node would, with the
node's own local state: in the node's mount namespace, ``/var/lib/sandbox-kernel``
(its kernels, layers and snapshot volume), ``/run/runc`` and
``/run/sandbox-kernel`` (the daemon's socket) are bound from
``/var/lib/sandbox-kernel-cluster/nodeN/``, and its kernels' cgroups are made
under ``sandbox-kernel-nodeN``. slurmd is started in the same namespaces, so a
job on the node finds that node's daemon at the usual socket.

For tests and benchmarks, and as a worked example of a site's setup (README,
"Clusters"). The facts it rests on (what works here, the pitfalls) are in the
shared SLURM notes: ``nsenter --net`` rather than ``ip netns exec``, which hides
the cgroup mounts; a hosts file naming the nodes, else every lookup waits on DNS;
``DefMemPerCPU``, else one job takes a node's memory.

    python -m sandbox_kernel.runtime.cluster up|down|status
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox_kernel.errors import ConfigError, SandboxError

BRIDGE = "slbr0"
BRIDGE_ADDRESS = "10.77.0.254"
PREFIX_LENGTH = 24
NODES = 3
#: The marker of the files this module writes; only those are removed.
MARK = "# written by sandbox-kernel's cluster module (make cluster); make cluster-down removes it"
CONF_DIR = Path("/etc/slurm")
STATE = Path("/run/sandbox-kernel-cluster")
SPOOL = Path("/var/spool/slurm")
LOGS = Path("/var/log/slurm")
PIDS = Path("/run/slurm")
#: Each node's local state (see the module's docstring).
NODES_ROOT = Path("/var/lib/sandbox-kernel-cluster")
#: The host paths a node sees its own folders at: (inside, folder of NODES_ROOT/nodeN).
NODE_LOCAL = (
    (Path("/var/lib/sandbox-kernel"), "state"),
    (Path("/run/runc"), "runc"),
    (Path("/run/sandbox-kernel"), "run"),
)
MUNGE_RUN = Path("/run/munge")
#: What a node offers Slurm: more CPUs than the machine has (config_overrides), so
#: that a few kernels fit on each.
NODE_CPUS, NODE_MEMORY_MB = 8, 8000
PARTITION = "kernels"
READY_TIMEOUT = 90.0


@dataclass(frozen=True)
class Node:
    index: int

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def netns(self) -> str:
        return f"slnode{self.index}"

    @property
    def address(self) -> str:
        return f"10.77.0.{10 + self.index}"

    @property
    def veth(self) -> str:
        return f"slv{self.index}"

    @property
    def root(self) -> Path:
        """Where this node's local folders are on the host."""
        return NODES_ROOT / self.name

    @property
    def socket(self) -> Path:
        """Its daemon's socket, as the host sees it (``/run/sandbox-kernel/daemon.sock``
        on the node)."""
        return self.root / "run" / "daemon.sock"

    @property
    def cgroup_parent(self) -> str:
        return f"sandbox-kernel-{self.name}"

    @property
    def subnet(self) -> str:
        """Its kernels' addresses: apart from every other node's."""
        return f"10.{210 + self.index}.0.0/16"


def nodes() -> list[Node]:
    return [Node(i) for i in range(1, NODES + 1)]


class ClusterError(SandboxError):
    """The cluster could not be brought up or down; the message says what to do."""


def _run(*argv: str, check: bool = True, timeout: float = 30.0) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _controller() -> str:
    return socket.gethostname()


def slurm_conf() -> str:
    """The cluster's slurm.conf."""
    node_lines = "\n".join(
        f"NodeName={n.name} NodeAddr={n.address} CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB}"
        for n in nodes()
    )
    return f"""{MARK}
ClusterName=sandbox
SlurmctldHost={_controller()}({BRIDGE_ADDRESS})
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=20
MailProg=/bin/true
StateSaveLocation={SPOOL}/ctld
SlurmdSpoolDir={SPOOL}/d-%n
SlurmctldPidFile={PIDS}/slurmctld.pid
SlurmdPidFile={PIDS}/slurmd-%n.pid
SlurmctldLogFile={LOGS}/slurmctld.log
SlurmdLogFile={LOGS}/slurmd-%n.log
{node_lines}
PartitionName={PARTITION} Nodes=node[1-{NODES}] Default=YES MaxTime=INFINITE State=UP LLN=YES
"""


CGROUP_CONF = f"""{MARK}
CgroupPlugin=cgroup/v1
ConstrainCores=yes
ConstrainRAMSpace=yes
"""


def hosts_file() -> str:
    lines = ["127.0.0.1 localhost", f"{BRIDGE_ADDRESS} {_controller()}"]
    lines += [f"{n.address} {n.name}" for n in nodes()]
    return "\n".join(lines) + "\n"


def _write_conf(name: str, text: str) -> None:
    path = CONF_DIR / name
    if path.exists() and MARK not in path.read_text(errors="replace"):
        raise ConfigError(
            "Slurm configuration", str(path),
            "is a site's own, not this module's; move it away to run the test cluster here",
        )  # fmt: skip
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ours(path: Path) -> bool:
    return path.exists() and MARK in path.read_text(errors="replace")


# ---- bringing it up ---------------------------------------------------------------------


def require() -> None:
    """The programs the cluster needs; what to install where one is missing."""
    missing = [p for p in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(p) is None]
    if missing:
        raise ClusterError(
            f"{', '.join(missing)} not found; install Debian's Slurm and munge: "
            "apt-get update && apt-get install -y slurm-wlm munge (make cluster does)"
        )


def _start_munge() -> None:
    if _alive(MUNGE_RUN / "munged.pid"):
        return
    MUNGE_RUN.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    (STATE / "munged.ours").touch()


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _network() -> None:
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "replace", f"{BRIDGE_ADDRESS}/{PREFIX_LENGTH}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    for node in nodes():
        if not Path(f"/run/netns/{node.netns}").exists():
            _run("ip", "netns", "add", node.netns)
        if not Path(f"/sys/class/net/{node.veth}").exists():
            _run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0",
                 "netns", node.netns)  # fmt: skip
        _run("ip", "link", "set", node.veth, "master", BRIDGE, "up")
        inside = ("ip", "-n", node.netns)
        _run(*inside, "addr", "replace", f"{node.address}/{PREFIX_LENGTH}", "dev", "eth0")
        _run(*inside, "link", "set", "eth0", "up")
        _run(*inside, "link", "set", "lo", "up")


def node_command(node: Node, *argv: str) -> list[str]:
    """``argv`` run as on ``node``: in its network namespace, with its hostname, its
    hosts file and its local folders (in a new mount namespace)."""
    binds = " && ".join(f"mount --bind {node.root / sub} {inside}" for inside, sub in NODE_LOCAL)
    script = (
        f'hostname {node.name} && mount --bind {STATE / "hosts"} /etc/hosts && {binds} && exec "$@"'
    )
    return ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount",
            "sh", "-c", script, "sh", *argv]  # fmt: skip


def node_env(node: Node) -> dict[str, str]:
    """The environment of the node's daemon (and of the runtime in its jobs)."""
    return {
        **os.environ, "SANDBOX_KERNEL_CGROUP_PARENT": node.cgroup_parent,
        "SANDBOX_KERNEL_SUBNET": node.subnet,
    }  # fmt: skip


def _start_node(node: Node) -> None:
    """The node's daemon, then its slurmd, in one set of namespaces."""
    for inside, sub in NODE_LOCAL:
        inside.mkdir(parents=True, exist_ok=True)  # the mount points, on the host
        (node.root / sub).mkdir(parents=True, exist_ok=True)
    log = LOGS / f"sandbox-kernel-{node.name}.log"
    daemon = (
        f"{sys.executable} -m sandbox_kernel.cli daemon --detach --log {log} >/dev/null && "
        f"exec /usr/sbin/slurmd -N {node.name}"
    )
    done = subprocess.run(node_command(node, "sh", "-c", daemon), capture_output=True,
                          text=True, timeout=120, env=node_env(node), check=False)  # fmt: skip
    if done.returncode != 0:
        raise ClusterError(
            f"{node.name} did not start: {(done.stderr or done.stdout).strip()[-800:]}; "
            f"see {log} and {LOGS}/slurmd-{node.name}.log"
        )


def up(say: object = print) -> None:
    """Bring the cluster up (what is up already is kept); wait until every node is idle.

    Raises:
        ClusterError: a program is missing or a daemon did not come up (its log is named).
        ConfigError: /etc/slurm holds a site's own configuration.
    """
    require()
    emit = say if callable(say) else print
    STATE.mkdir(mode=0o755, exist_ok=True)
    for folder in (SPOOL / "ctld", LOGS, PIDS):
        folder.mkdir(parents=True, exist_ok=True)
    _write_conf("slurm.conf", slurm_conf())
    _write_conf("cgroup.conf", CGROUP_CONF)
    (STATE / "hosts").write_text(hosts_file())
    emit("munge ...")
    _start_munge()
    emit("network: a bridge and three node namespaces ...")
    _network()
    if not _alive(PIDS / "slurmctld.pid"):
        emit("slurmctld ...")
        _run("slurmctld", "-c")
    for node in nodes():
        (SPOOL / f"d-{node.name}").mkdir(parents=True, exist_ok=True)
        if not _alive(PIDS / f"slurmd-{node.name}.pid"):
            emit(f"{node.name} ({node.address}): the sandbox-kernel daemon and slurmd ...")
            _start_node(node)
    wait_idle()
    emit(f"cluster up: {', '.join(n.name for n in nodes())} in partition {PARTITION}")


def kill_node(name: str) -> list[int]:
    """Stop node ``name`` as a power cut would: SIGKILL every process in its network
    namespace (slurmd, its daemon, its jobs) and every kernel container on it. Its
    state stays on disk, as a dead machine's disk would. The pids killed.

    Raises:
        ConfigError: no such node.
    """
    node = _node(name)
    inode = os.stat(f"/run/netns/{node.netns}").st_ino
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns/net").st_ino != inode:
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    runc_root = node.root / "runc"
    if runc_root.is_dir():
        for container in _run("runc", "--root", str(runc_root), "list", "-q", check=False).split():
            _run("runc", "--root", str(runc_root), "kill", "--all", container, "KILL", check=False)
            killed.append(0)
    return killed


def revive_node(name: str) -> None:
    """Start a node :func:`kill_node` stopped: its daemon (which removes the dead
    kernels' containers) and its slurmd; wait until Slurm has it back."""
    node = _node(name)
    if _alive(PIDS / f"slurmd-{node.name}.pid"):
        return  # it runs
    (PIDS / f"slurmd-{node.name}.pid").unlink(missing_ok=True)
    (node.root / "run" / "daemon.pid").unlink(missing_ok=True)
    _start_node(node)
    _run("scontrol", "update", f"nodename={name}", "state=resume", check=False)
    wait_idle()


def _node(name: str) -> Node:
    for node in nodes():
        if node.name == name:
            return node
    raise ConfigError("node", name, f"is not one of {', '.join(n.name for n in nodes())}")


def states() -> dict[str, str]:
    """Each node's state as Slurm has it (``idle``, ``alloc``, ``down*``, ...)."""
    try:
        out = _run("sinfo", "-h", "-N", "-o", "%N %t", check=True, timeout=15)
    except (ClusterError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in out.splitlines():
        name, _, state = line.partition(" ")
        found[name] = state.strip()
    return found


def wait_idle(timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        seen = states()
        if all(seen.get(n.name) in ("idle", "mix", "alloc") for n in nodes()):
            return
        if time.monotonic() > deadline:
            shown = seen or "sinfo answers nothing"
            raise ClusterError(
                f"the nodes are not ready after {timeout:.0f} s ({shown}); "
                f"see {LOGS}/slurmctld.log and {LOGS}/slurmd-nodeN.log"
            )
        time.sleep(0.5)


# ---- taking it down ---------------------------------------------------------------------


def _stop(pid_file: Path, timeout: float = 15.0) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def down(say: object = print) -> None:
    """Cancel every job, stop the daemons this module started, remove the network,
    the configuration it wrote and Slurm's cgroups. Safe to run twice."""
    emit = say if callable(say) else print
    if shutil.which("scancel") and _ours(CONF_DIR / "slurm.conf"):
        with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
            jobs = _run("squeue", "-h", "-o", "%i", timeout=15).split()
            if jobs:
                emit(f"cancelling {len(jobs)} jobs ...")
                _run("scancel", *jobs, check=False, timeout=15)
    for node in nodes():
        _stop(PIDS / f"slurmd-{node.name}.pid")
        _stop_daemon(node)
    _stop(PIDS / "slurmctld.pid")
    if (STATE / "munged.ours").exists():
        _stop(MUNGE_RUN / "munged.pid")
    for node in nodes():
        _run("ip", "link", "del", node.veth, check=False)
        _run("ip", "netns", "del", node.netns, check=False)
    _run("ip", "link", "del", BRIDGE, check=False)
    for name in ("slurm.conf", "cgroup.conf"):
        if _ours(CONF_DIR / name):
            (CONF_DIR / name).unlink()
    _remove_cgroups()
    shutil.rmtree(SPOOL, ignore_errors=True)
    shutil.rmtree(STATE, ignore_errors=True)
    with contextlib.suppress(OSError):
        NODES_ROOT.rmdir()
    emit("cluster down")


def _stop_daemon(node: Node) -> None:
    """Stop the node's daemon; remove its kernels' containers that are left, its
    snapshot volume's loop device and its local folders."""
    _stop(node.root / "run" / "daemon.pid", timeout=60)
    runc_root = node.root / "runc"
    if runc_root.is_dir():
        listed = _run("runc", "--root", str(runc_root), "list", "-q", check=False).split()
        for container in listed:
            _run("runc", "--root", str(runc_root), "delete", "--force", container, check=False)
    image = node.root / "state" / "volume.img"
    if image.exists():
        for line in _run("losetup", "-j", str(image), check=False).splitlines():
            device = line.split(":", 1)[0]
            _run("umount", "-l", device, check=False)
            _run("losetup", "-d", device, check=False)
    shutil.rmtree(node.root, ignore_errors=True)


def _remove_cgroups() -> None:
    """Remove the (empty) cgroups slurmd made, deepest first."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for node in nodes():
            _rmdirs(hierarchy / node.cgroup_parent)
        top = hierarchy / "slurm"
        if not top.is_dir():
            for found in hierarchy.glob("slurm_node*"):
                _rmdirs(found)
            continue
        _rmdirs(top)


def _rmdirs(top: Path) -> None:
    for root, dirs, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        del dirs
        with contextlib.suppress(OSError):
            os.rmdir(root)


def leftovers() -> list[str]:
    """What a cluster left on this machine: its namespaces, links, daemons, files."""
    found = [f"netns {n.netns}" for n in nodes() if Path(f"/run/netns/{n.netns}").exists()]
    found += [f"link {n.veth}" for n in nodes() if Path(f"/sys/class/net/{n.veth}").exists()]
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"link {BRIDGE}")
    for pid_file in sorted(PIDS.glob("slurm*.pid")) if PIDS.is_dir() else []:
        if _alive(pid_file):
            found.append(f"daemon {pid_file.stem}")
    found += [f"file {CONF_DIR / n}" for n in ("slurm.conf", "cgroup.conf") if _ours(CONF_DIR / n)]
    found += [f"node folder {n.root}" for n in nodes() if n.root.exists()]
    for node in nodes():
        found += [f"cgroup {h.name}/{node.cgroup_parent}"
                  for h in Path("/sys/fs/cgroup").iterdir()
                  if (h / node.cgroup_parent).is_dir()]  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up()
        elif args.action == "down":
            down()
        else:
            seen = states()
            for node in nodes():
                print(f"{node.name} {node.address} {seen.get(node.name, 'not in Slurm')}")
            return 0 if all(seen.get(n.name) in ("idle", "mix", "alloc") for n in nodes()) else 1
    except SandboxError as err:
        print(f"cluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
