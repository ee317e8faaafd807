"""What the runtime can leave on a host: read straight from the system, not its records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sandbox_kernel.runtime import bases, cgroups, network, paths, saving, snapshots, volume
from sandbox_kernel.runtime.mounts import mounts_under
from sandbox_kernel.runtime.store import KernelStore


def snapshot() -> dict[str, set[str]]:
    """Every runtime-made object on the host now, by kind."""
    listed = subprocess.run(
        ["runc", "list", "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    containers = {c["id"] for c in json.loads(listed or "null") or [] if c["id"].startswith("sk-")}
    kernels = paths.kernels_dir()
    return {
        "containers": containers,
        "netns": set(network.leftover_namespaces()),
        "veths": set(network.leftover_veths()),
        "mounts": {str(p) for p in mounts_under(kernels)},
        "cgroups": {str(p) for p in cgroups.leftover_cgroups(paths.cgroup_parent())},
        "reservations": {str(i) for i in network.reservations()},
        "kernel folders": {p.name for p in kernels.iterdir()} if kernels.is_dir() else set(),
        "kernel aliases": set(KernelStore().aliases()),
        "unfinished snapshots": {str(p) for p in snapshots.leftovers()},
        # Any, even one a save still holds: a test waits for its saves to end.
        "staged images": {str(p) for p in saving.staging_root().glob(f"{saving.STAGING_PREFIX}*")},
        "writable layers": {p.name for p in (volume.ensure_volume() / "kernels").iterdir()},
        "run folders": {p.name for p in (volume.ensure_volume() / "run").iterdir()},
        "bases": {b["id"] for b in bases.listing()},
        "snapshots": {f"{o}/{n}" for o in snapshots.owners() for n in snapshots.names(o)},
    }


def kernel_objects(kernel_id: str) -> list[str]:
    """Everything on the host that still belongs to ``kernel_id``."""
    found = []
    for kind, items in snapshot().items():
        found += [f"{kind}: {item}" for item in items if kernel_id in item]
    if (Path(paths.kernels_dir()) / kernel_id).exists():
        found.append(f"folder {paths.kernels_dir() / kernel_id}")
    return found
