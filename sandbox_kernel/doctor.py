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
    nftables and CRIU."""
    root = os.geteuid() == 0
    yield Check("root", root, "running as root" if root else f"running as uid {os.geteuid()}",
                "run the Jupyter server (and this command) as root")  # fmt: skip

    runc = shutil.which("runc")
    version = _run([runc, "--version"]).stdout.splitlines()[0] if runc else "not found"
    yield Check("runc", bool(runc), version, "apt-get install -y runc")
    try:
        quotas = volume.quotas_enabled(volume.ensure_volume())
        detail = "btrfs simple quotas on the volume" if quotas else "not enforced"
    except SandboxError as err:
        quotas, detail = False, str(err)
    yield Check("disk size (quota)", quotas, detail, "needs Linux >= 6.7 (btrfs simple quotas)")
    tini = Path(paths.TINI).exists()
    yield Check("tini", tini, paths.TINI if tini else "not found", "apt-get install -y tini")

    overlay = "overlay" in Path("/proc/filesystems").read_text()
    yield Check("overlayfs", overlay, "supported" if overlay else "not in /proc/filesystems",
                "modprobe overlay")  # fmt: skip

    btrfs = "btrfs" in Path("/proc/filesystems").read_text()
    mkfs = shutil.which("mkfs.btrfs") or shutil.which("mkfs.btrfs", path="/usr/sbin:/sbin")
    yield Check(
        "btrfs (writable layers, snapshots)",
        btrfs and bool(mkfs),
        "supported, btrfs-progs installed"
        if btrfs and mkfs
        else ("btrfs-progs missing" if btrfs else "no btrfs in /proc/filesystems"),
        "apt-get install -y btrfs-progs" if btrfs else "modprobe btrfs",
    )

    want = {"memory", "cpu", "pids"}
    if cgroups.version() == 2:
        have = set((cgroups.ROOT / "cgroup.controllers").read_text().split())
    else:
        have = {p.name for p in cgroups.ROOT.iterdir() if p.is_dir()}
        have |= {part for name in list(have) for part in name.split(",")}
    missing = sorted(want - have)
    yield Check(
        f"cgroup v{cgroups.version()} controllers",
        not missing,
        "memory, cpu, pids" if not missing else f"missing: {', '.join(missing)}",
        "enable the memory, cpu and pids controllers (kernel command line or systemd)",
    )

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
    yield Check("user and network namespaces", ns_ok, ns_detail, ns_fix)

    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    nft_ok, nft_detail = False, "nft not found"
    if nft:
        listed = _run([nft, "list", "tables"])
        nft_ok = listed.returncode == 0
        nft_detail = "nf_tables works" if nft_ok else listed.stderr.strip()
    yield Check("nftables", nft_ok, nft_detail, "apt-get install -y nftables")

    criu = find_criu()
    want_version = ".".join(map(str, MIN_VERSION[:2]))
    if not criu:
        yield Check(f"CRIU >= {want_version}", False, "not found",
                    "sandbox-kernel install-criu")  # fmt: skip
        return
    found = criu_version(criu)
    shown = ".".join(map(str, found)) if found else "unknown version"
    if not found or found < MIN_VERSION:
        yield Check(f"CRIU >= {want_version}", False, f"{criu} is {shown}",
                    "sandbox-kernel install-criu")  # fmt: skip
        return
    dumped, detail = probe_dump(criu) if root else (False, "the dump probe needs root")
    yield Check(f"CRIU >= {want_version}", dumped, f"{shown} at {criu}: {detail}",
                "sandbox-kernel install-criu")  # fmt: skip
