"""``sandbox-kernel doctor``: each requirement, checked for real, with its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxError
from .runtime import cgroups, paths, volume
from .runtime.criu import MIN_VERSION, criu_version, find_criu, probe_dump


@dataclass(frozen=True)
class Check:
    """One requirement: whether it holds, what was seen, and the command that fixes it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def run_checks() -> Iterator[Check]:
    """Check root, runc, overlayfs, cgroup controllers, user and network namespaces,
    nftables and CRIU, one at a time (each is checked when the caller asks for it)."""
    root = os.geteuid() == 0
    yield _root(root)
    yield _runc()
    yield _disk_quota()
    yield _tini()
    yield _overlayfs()
    yield _btrfs()
    yield _cgroup_controllers()
    yield _namespaces(root)
    yield _nftables()
    yield _criu(root)
    cluster = _cluster()
    if cluster is not None:
        yield cluster


def _cluster() -> Check | None:
    """Where a Slurm configuration is in place: whether every node it names answers
    and takes jobs. Nothing where there is none (a machine without a cluster)."""
    conf = Path("/etc/slurm/slurm.conf")
    if not conf.exists():
        return None
    if shutil.which("sinfo") is None:
        return Check("slurm cluster", False, f"{conf} is there but sinfo is not",
                     "apt-get install -y slurm-client")  # fmt: skip
    done = _run(["sinfo", "-h", "-N", "-o", "%N %t"])
    if done.returncode != 0:
        return Check("slurm cluster", False, f"slurmctld does not answer: {done.stderr.strip()}",
                     "make cluster (the test cluster), or start slurmctld")  # fmt: skip
    states = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    bad = {n: s for n, s in states.items() if s.strip() not in ("idle", "mix", "alloc")}
    detail = ", ".join(f"{n} {s.strip()}" for n, s in sorted(states.items())) or "no nodes"
    fix = "start slurmd on the nodes shown down (make cluster, for the test cluster)"
    return Check("slurm cluster", bool(states) and not bad, detail, fix)


def _root(root: bool) -> Check:
    return Check("root", root, "running as root" if root else f"running as uid {os.geteuid()}",
                 "run the Jupyter server (and this command) as root")  # fmt: skip


def _runc() -> Check:
    runc = shutil.which("runc")
    version = _run([runc, "--version"]).stdout.splitlines()[0] if runc else "not found"
    return Check("runc", bool(runc), version, "apt-get install -y runc")


def _disk_quota() -> Check:
    try:
        quotas = volume.quotas_enabled(volume.ensure_volume())
        detail = "btrfs simple quotas on the volume" if quotas else "not enforced"
    except SandboxError as err:
        quotas, detail = False, str(err)
    return Check("disk size (quota)", quotas, detail, "needs Linux >= 6.7 (btrfs simple quotas)")


def _tini() -> Check:
    tini = Path(paths.TINI).exists()
    return Check("tini", tini, paths.TINI if tini else "not found", "apt-get install -y tini")


def _overlayfs() -> Check:
    overlay = "overlay" in Path("/proc/filesystems").read_text()
    return Check("overlayfs", overlay, "supported" if overlay else "not in /proc/filesystems",
                 "modprobe overlay")  # fmt: skip


def _btrfs() -> Check:
    btrfs = "btrfs" in Path("/proc/filesystems").read_text()
    mkfs = shutil.which("mkfs.btrfs") or shutil.which("mkfs.btrfs", path="/usr/sbin:/sbin")
    return Check(
        "btrfs (writable layers, snapshots)",
        btrfs and bool(mkfs),
        "supported, btrfs-progs installed"
        if btrfs and mkfs
        else ("btrfs-progs missing" if btrfs else "no btrfs in /proc/filesystems"),
        "apt-get install -y btrfs-progs" if btrfs else "modprobe btrfs",
    )


def _cgroup_controllers() -> Check:
    want = {"memory", "cpu", "pids"}
    if cgroups.version() == 2:
        have = set((cgroups.ROOT / "cgroup.controllers").read_text().split())
    else:
        have = {p.name for p in cgroups.ROOT.iterdir() if p.is_dir()}
        have |= {part for name in list(have) for part in name.split(",")}
    missing = sorted(want - have)
    return Check(
        f"cgroup v{cgroups.version()} controllers",
        not missing,
        "memory, cpu, pids" if not missing else f"missing: {', '.join(missing)}",
        "enable the memory, cpu and pids controllers (kernel command line or systemd)",
    )


def _namespaces(root: bool) -> Check:
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    ns_ok, ns_detail, ns_fix = False, "iproute2 not found", "apt-get install -y iproute2"
    if not (unshare and nsenter):
        ns_detail, ns_fix = "unshare or nsenter not found", "apt-get install -y util-linux"
    elif ip and root:
        # A user namespace that owns a network namespace: what runc makes per kernel.
        made = _run([unshare, "--user", "--map-root-user", "--net", ip, "link", "show", "lo"])
        ns_ok = made.returncode == 0
        ns_detail = (
            "a user namespace can own a network namespace"
            if ns_ok
            else (made.stderr.strip() or "unshare failed")
        )
        ns_fix = "sysctl user.max_user_namespaces=15000 (it is 0, or user namespaces are off)"
    elif ip:
        ns_detail = "needs root"
    return Check("user and network namespaces", ns_ok, ns_detail, ns_fix)


def _nftables() -> Check:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    nft_ok, nft_detail = False, "nft not found"
    if nft:
        listed = _run([nft, "list", "tables"])
        nft_ok = listed.returncode == 0
        nft_detail = "nf_tables works" if nft_ok else listed.stderr.strip()
    return Check("nftables", nft_ok, nft_detail, "apt-get install -y nftables")


def _criu(root: bool) -> Check:
    """CRIU: found, recent enough, and (as root) able to dump a throwaway process."""
    name = f"CRIU >= {'.'.join(map(str, MIN_VERSION[:2]))}"
    fix = "sandbox-kernel install-criu"
    criu = find_criu()
    if not criu:
        return Check(name, False, "not found", fix)
    found = criu_version(criu)
    shown = ".".join(map(str, found)) if found else "unknown version"
    if not found or found < MIN_VERSION:
        return Check(name, False, f"{criu} is {shown}", fix)
    dumped, detail = probe_dump(criu) if root else (False, "the dump probe needs root")
    return Check(name, dumped, f"{shown} at {criu}: {detail}", fix)
