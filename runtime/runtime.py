"""The runtime's one API: what the provisioner, the CLI and the control server call.

:class:`Runtime` is a facade. The work is done by the rooms behind it (see
docs/design.md for the map): the kernel store (``store.py``), a kernel's
filesystems (``rootfs.py``), booting a container (``boot.py``), a kernel's life
(``lifecycle.py``), snapshots (``snapshotting.py``), restores (``restoring.py``)
and garbage collection
(``gc.py``), each driving runc, CRIU, the volume and the network through
``drivers.py``. Its methods take and return plain data and records, because a
later version serves the same API from a privileged daemon over a local socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .boot import Boot
from .cgroups import Usage
from .drivers import Drivers
from .gc import Collector
from .lifecycle import KernelConfig, Lifecycle
from .limits import Limits
from .record import KernelRecord
from .restoring import Restorer
from .rootfs import Rootfs
from .snapshotting import Snapshotter
from .store import KernelStore

__all__ = ["KernelConfig", "Runtime"]


class Runtime:
    """Runs kernel containers. It keeps no state in memory: everything is in the
    kernel folders, so any process can pick up a kernel another one started
    (:meth:`adopt`). ``drivers`` are the real ones unless a test gives fakes.
    """

    def __init__(self, drivers: Drivers | None = None, rootfs: Rootfs | None = None) -> None:
        self.drivers = drivers or Drivers.real()
        self.store = KernelStore()
        self.rootfs = rootfs or Rootfs(self.drivers)
        boot = Boot(self.drivers, self.rootfs)
        self.lifecycle = Lifecycle(self.drivers, self.store, self.rootfs, boot)
        self.snapshotter = Snapshotter(self.drivers, self.store, self.rootfs, boot)
        self.restorer = Restorer(
            self.drivers, self.store, self.rootfs, boot, self.lifecycle.start_from_base
        )
        self.collector = Collector(self.drivers, self.store, self.rootfs, self.lifecycle.remove)

    # ---- lookups --------------------------------------------------------------------

    def kernel_dir(self, kernel_id: str) -> Path:
        """The folder of kernel ``kernel_id`` (see ``rootfs.py`` for what it holds)."""
        return self.store.kernel_dir(kernel_id)

    def record(self, kernel_id: str) -> KernelRecord:
        """The record of kernel ``kernel_id``. Raises KernelNotFound."""
        return self.store.load(kernel_id)

    def records(self) -> list[KernelRecord]:
        """Records of every kernel the runtime has, oldest first."""
        return self.store.records()

    def log_path(self, kernel_id: str) -> Path:
        """The kernel's log on the host (its stdout and stderr). Raises KernelNotFound."""
        self.store.load(kernel_id)
        return self.rootfs.run_dir(kernel_id) / "kernel.log"

    def run_dir(self, kernel_id: str) -> Path:
        """The kernel's run folder on the host (/run/sandbox inside): its connection
        file, control credentials and log."""
        self.store.kernel_dir(kernel_id)  # checks the id
        return self.rootfs.run_dir(kernel_id)

    def trim_log(self, kernel_id: str) -> bool:
        """Keep the kernel's log under its cap; True if it was trimmed. One stat
        otherwise; called by the provisioner's ``poll``."""
        return self.rootfs.trim_log(kernel_id)

    def append_log(self, kernel_id: str, line: str) -> None:
        """Append a line from the runtime to the kernel's log, marked as such."""
        self.rootfs.append_log(kernel_id, line)

    # ---- life cycle (lifecycle.py) --------------------------------------------------

    async def prepare(self, kernel_id: str, config: KernelConfig) -> KernelRecord:
        """Make kernel ``kernel_id``'s folder, layers and address; return its record.
        Called by the provisioner's ``pre_launch``; a restart keeps the kernel's
        files, address and limits. Raises ConfigError, ImageNotFound."""
        return await asyncio.to_thread(self.lifecycle.prepare, kernel_id, config)

    async def start(
        self, kernel_id: str, argv: list[str], env: dict[str, str], connection: dict[str, Any]
    ) -> int:
        """Start a prepared kernel running ``argv``; return its init's host pid."""
        return await self.lifecycle.start(kernel_id, argv, env, connection)

    async def start_cold(self, kernel_id: str, note: str) -> int:
        """Replace the kernel's process by a cold start (a base restore went wrong)."""
        return await self.lifecycle.start_cold(kernel_id, note)

    async def stop(self, kernel_id: str) -> None:
        """Delete the container and unmount; the files and address stay (a restart)."""
        await self.lifecycle.stop(kernel_id)

    async def remove(self, kernel_id: str) -> None:
        """Remove every trace of the kernel. A kernel that is gone is fine."""
        await self.lifecycle.remove(kernel_id)

    async def container_pid(self, kernel_id: str) -> int | None:
        """The host pid of the kernel's init if it runs, once no snapshot or restore
        of it is in progress; else None."""
        return await self.lifecycle.container_pid(kernel_id)

    def adopt(self, kernel_id: str) -> KernelRecord:
        """Make this process the owner of a kernel another process started."""
        return self.lifecycle.adopt(kernel_id)

    async def update_limits(self, kernel_id: str, limits: Limits, operator: bool = False) -> Limits:
        """Change a running kernel's limits; only an ``operator`` goes above the
        kernel's ceiling. See :meth:`Lifecycle.update_limits`."""
        return await self.lifecycle.update_limits(kernel_id, limits, operator)

    def usage(self, kernel: str | KernelRecord) -> Usage | None:
        """What the kernel uses now against its limits; None if its container is gone.
        Takes a kernel id or a record from :meth:`records` (which saves a read)."""
        record = self.store.load(kernel) if isinstance(kernel, str) else kernel
        return self.lifecycle.usage(record)

    def oom_killed(self, kernel_id: str) -> bool:
        """Whether the OOM killer has killed a process of the kernel's container."""
        use = self.usage(kernel_id)
        return bool(use and use.oom_kills)

    # ---- snapshots (snapshotting.py, restoring.py) ---------------------------------------------

    async def snapshot(
        self,
        kernel_id: str,
        name: str,
        message: str = "",
        live: bool = True,
        progress: Callable[[str], None] | None = None,
        wait: bool = False,
        keep_frozen: bool = False,
    ) -> dict[str, Any]:
        """Snapshot the kernel's files and live memory; return the meta. It may be
        saved to disk in the background (``saving`` in the meta) unless ``wait``."""
        return await self.snapshotter.snapshot(
            kernel_id, name, message, live, progress, wait, keep_frozen
        )

    async def restore(self, kernel_id: str, name: str, arriving: bool = False) -> dict[str, Any]:
        """Bring the kernel back to snapshot ``name`` in place:
        ``{"pid", "mode", "reason", "name"}``. ``arriving``: the kernel comes from
        another node, whose frontends reconnect here."""
        return await self.restorer.restore(kernel_id, name, arriving)

    async def finish_restore(self, kernel_id: str) -> int | None:
        """Complete a restore cut short; the new pid, or None if there was none."""
        return await self.restorer.finish_restore(kernel_id)

    async def reset(self, kernel_id: str, pristine: bool = False) -> dict[str, Any]:
        """Restart the kernel on its base (a class kernel), or with ``pristine`` or
        without a base on the image's pristine files: ``{"pid", "to", "note"}``."""
        return await self.restorer.reset(kernel_id, pristine)

    async def thaw_if_stale(self, kernel_id: str) -> bool:
        """Thaw a kernel a dead runtime left frozen; True if it was."""
        return await self.restorer.thaw_if_stale(kernel_id)

    def snapshot_listing(self, kernel_id: str) -> dict[str, Any]:
        """The snapshots the kernel may see, and its owner's use of the store."""
        return self.snapshotter.listing(kernel_id)

    def delete_snapshot(self, kernel_id: str, name: str) -> None:
        """Delete a snapshot the kernel may see. Raises SnapshotNotFound."""
        self.snapshotter.delete(kernel_id, name)

    def diff(self, kernel_id: str, name: str | None = None) -> dict[str, Any]:
        """Files added, changed and deleted since a snapshot (default: the latest)."""
        return self.snapshotter.diff(kernel_id, name)

    # ---- garbage collection (gc.py) -------------------------------------------------

    async def gc(self, dry_run: bool = False) -> list[str]:
        """Remove what crashed servers and kernels left behind; return what it was."""
        return await self.collector.gc(dry_run)
