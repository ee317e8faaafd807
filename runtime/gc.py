"""Garbage collection: what crashed servers and kernels left behind.

One sweep per kind of leftover. A kernel whose owning process is gone is removed
whole first; then each sweep removes what no live kernel's record claims. Each
sweep returns lines saying what it removed (or, dry, would remove).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import bases, classes, paths, pristine, saving, snapshots
from .drivers import Drivers
from .fsutil import lock_held, read_json
from .lifecycle import owner_alive
from .record import KernelRecord
from .rootfs import Rootfs
from .store import KernelStore


class Collector:
    """Runs the sweeps of :meth:`gc`."""

    def __init__(
        self,
        drivers: Drivers,
        store: KernelStore,
        rootfs: Rootfs,
        remove: Callable[[str], Awaitable[None]],
    ) -> None:
        self.drivers = drivers
        self.store = store
        self.rootfs = rootfs
        #: Removes one kernel whole (``Lifecycle.remove``).
        self.remove = remove

    async def gc(self, dry_run: bool = False) -> list[str]:
        """Remove what crashed servers and kernels left behind; return what was removed.

        A kernel whose owning process is gone is removed whole. Then containers,
        namespaces, veths, address reservations, mounts and cgroups that no kernel
        record claims, and layers that no image or kernel references.
        """
        records, unreadable = self.store.scan()
        removed, live = await self._orphan_kernels(records, dry_run)
        for kid in unreadable:
            live.add(kid)  # its container, address and files may well be in use
            removed.append(f"nothing of kernel {kid}: its record cannot be read; left alone")
        containers = {paths.container_id(k) for k in live}
        removed += await self._containers(containers, dry_run)
        removed += await self._broken_runc_state(dry_run)
        if not dry_run and self.drivers.criu.close_stale_window():
            removed.append("vm.unprivileged_userfaultfd, left at 1 by a lazy restore cut short")
        removed += await self._network(containers, live, dry_run)
        removed += await asyncio.to_thread(self._mounts, live, dry_run)
        removed += await asyncio.to_thread(self._cgroups, containers, dry_run)
        removed += await asyncio.to_thread(self._kernel_folders, live, dry_run)
        removed += await asyncio.to_thread(self._subvolumes, live, dry_run)
        removed += await asyncio.to_thread(self._drafts, dry_run)
        removed += await asyncio.to_thread(self._aliases, live, dry_run)
        removed += await asyncio.to_thread(self._layers, dry_run)
        records, unreadable = self.store.scan()
        if not unreadable:  # else a base may be in use by a record it cannot read
            used = {r.base for r in records if r.base}
            removed += await asyncio.to_thread(classes.retire_unused, used, dry_run)
            removed += await asyncio.to_thread(_stale_pristine_bases, used, dry_run)
        removed += await asyncio.to_thread(_pristine_snapshots, dry_run)
        return removed

    async def _orphan_kernels(
        self, records: list[KernelRecord], dry_run: bool
    ) -> tuple[list[str], set[str]]:
        """Kernels whose server is gone, removed whole; and the ids of those left."""
        removed: list[str] = []
        live: set[str] = set()
        for record in records:
            kid = record.kernel_id
            if owner_alive(record.owner):
                live.add(kid)
                continue
            removed.append(f"kernel {kid} (its server, pid {record.owner.get('pid')}, is gone)")
            if dry_run:
                live.add(kid)  # what removing it would take is not listed again below
            else:
                await self.remove(kid)
        return removed, live

    async def _containers(self, containers: set[str], dry_run: bool) -> list[str]:
        removed = []
        for info in await self.drivers.runc.list_containers():
            cid = info.get("id", "")
            if cid.startswith(paths.PREFIX) and cid not in containers:
                removed.append(f"container {cid}")
                if not dry_run:
                    await self.drivers.runc.delete(cid)
        return removed

    async def _broken_runc_state(self, dry_run: bool) -> list[str]:
        """runc's own state of a container whose checkpoint or restore was cut short
        (a CRIU mount left inside it), which makes runc list fail to load it."""
        root = self.drivers.runc.state_root()
        if not root.is_dir():
            return []
        removed = []
        listed = {info.get("id", "") for info in await self.drivers.runc.list_containers()}
        for entry in root.iterdir():
            if entry.name.startswith(paths.PREFIX) and entry.name not in listed:
                removed.append(f"broken runc state {entry}")
                if not dry_run:
                    for point in self.drivers.mounts.mounts_under(entry):
                        self.drivers.mounts.unmount(point)
                    shutil.rmtree(entry, ignore_errors=True)
        return removed

    async def _network(self, containers: set[str], live: set[str], dry_run: bool) -> list[str]:
        """Network namespaces, address reservations and veths of no live kernel."""
        network = self.drivers.network
        removed = []
        for ns in network.leftover_namespaces():
            if ns not in containers:
                removed.append(f"network namespace {ns}")
                if not dry_run:
                    await network.delete_netns(ns)
        held = network.reservations()
        for index, kid in held.items():
            if kid not in live:
                removed.append(f"address reservation {index}")
                if not dry_run:
                    network.release_index(index)
        for veth in network.leftover_veths():
            number = veth.removeprefix(network.VETH_PREFIX)
            if not number.isdigit() or held.get(int(number)) not in live:
                removed.append(f"veth {veth}")
                if not dry_run:
                    await network.delete_veth(veth)
        return removed

    def _mounts(self, live: set[str], dry_run: bool) -> list[str]:
        removed = []
        for point in self.drivers.mounts.mounts_under(paths.kernels_dir()):
            kid = point.relative_to(paths.kernels_dir()).parts[0]
            if kid not in live:
                removed.append(f"mount {point}")
                if not dry_run:
                    self.drivers.mounts.unmount(point)
        return removed

    def _cgroups(self, containers: set[str], dry_run: bool) -> list[str]:
        removed = []
        for group in self.drivers.cgroups.leftover_cgroups(paths.cgroup_parent()):
            if group.name not in containers:
                removed.append(f"cgroup {group}")
                if not dry_run:
                    try:
                        self.drivers.cgroups.remove_cgroup(group)
                    except OSError as err:
                        removed[-1] += f" (not removed: {err.strerror})"
        return removed

    def _kernel_folders(self, live: set[str], dry_run: bool) -> list[str]:
        """Kernel folders without a record (a prepare cut short)."""
        if not paths.kernels_dir().is_dir():
            return []
        removed = []
        for entry in paths.kernels_dir().iterdir():
            if entry.name not in live and not self.store.has_record(entry):
                removed.append(f"kernel folder {entry}")
                if not dry_run:
                    self.rootfs.remove(entry)
        return removed

    def _subvolumes(self, live: set[str], dry_run: bool) -> list[str]:
        """Writable layers and run folders of kernels that have no folder."""
        removed = []
        for sub, what in (("kernels", "writable layer"), ("run", "run folder")):
            root = self.drivers.volume.volume_dir() / sub
            if not root.is_dir():
                continue
            for entry in root.iterdir():
                if entry.name not in live and not (paths.kernels_dir() / entry.name).exists():
                    removed.append(f"{what} {entry}")
                    if not dry_run:
                        self.drivers.volume.delete_subvolume(entry)
        return removed

    @staticmethod
    def _drafts(dry_run: bool) -> list[str]:
        """Snapshots a crash left half-written or half-deleted."""
        removed = []
        for leftover in snapshots.leftovers():
            removed.append(f"unfinished snapshot {leftover}")
            if not dry_run:
                snapshots.purge(leftover)
        for staging in saving.leftover_stagings():
            removed.append(f"memory images of an unsaved snapshot {staging}")
            if not dry_run:
                shutil.rmtree(staging, ignore_errors=True)
        return removed

    def _aliases(self, live: set[str], dry_run: bool) -> list[str]:
        """Jupyter ids of pool kernels that are gone (see ``pool.py``)."""
        removed = []
        for alias, kid in self.store.aliases().items():
            if kid not in live:
                removed.append(f"kernel id {alias} (of kernel {kid}, gone)")
                if not dry_run:
                    self.store.unalias(alias)
        return removed

    def _layers(self, dry_run: bool) -> list[str]:
        """Image layers no image, kernel or base uses, and builds of them cut short."""
        if not paths.layers_dir().is_dir():
            return []
        used: set[str] = set()
        for image in paths.images_dir().glob("*.json"):
            used.update(read_json(image).get("layers", []))
        used |= self.store.layers_in_use()
        # A base's kernels mount its layers (its own mount-point layer among them).
        for meta in bases.listing(copies=True, pristine=True):
            used.update(meta.get("layers", []))
        removed = []
        for entry in paths.layers_dir().iterdir():
            stale_build = entry.name.startswith(".building-") and (
                time.time() - entry.stat().st_mtime > 600
            )
            if (entry.name.startswith("sha256-") and entry.name not in used) or stale_build:
                removed.append(f"layer {entry.name}")
                if not dry_run:
                    shutil.rmtree(entry, ignore_errors=True)
        return removed


def _stale_pristine_bases(used: set[str], dry_run: bool) -> list[str]:
    """Pristine bases no kernel uses whose environment changed since (see
    ``pristine.is_stale``): no start will take them again. The current ones stay."""
    removed = []
    for meta in bases.listing(copies=True, pristine=True):
        if not meta.get("pristine") or meta["id"] in used:
            continue
        if pristine.is_stale(meta):
            removed.append(f"pristine base {meta['id']} (its Python environment or image changed)")
        elif pristine.is_broken(meta):
            removed.append(f"pristine base {meta['id']} (a layer of it is gone)")
        else:
            continue
        if not dry_run:
            bases.delete(meta["id"])
    return removed


def _pristine_snapshots(dry_run: bool) -> list[str]:
    """Snapshots a pristine base was being made from, left by a making cut short
    (one being made holds its lock)."""
    removed = []
    locks = paths.state_dir() / "pristine"
    for owner in snapshots.owners():
        for name in snapshots.names(owner, every=True):
            if not name.startswith(snapshots.PRISTINE_PREFIX):
                continue
            key = name.removeprefix(snapshots.PRISTINE_PREFIX)
            if any(_held(lock) for lock in locks.glob(f"{key}*.lock")):
                continue  # being made now
            removed.append(f"snapshot {owner}/{name} (a pristine base's, cut short)")
            if not dry_run:
                snapshots.delete(owner, name)
    return removed


def _held(lock: Path) -> bool:
    """Whether another process holds ``lock`` (one that cannot be probed: no)."""
    try:
        return lock_held(lock)
    except OSError:
        return False
