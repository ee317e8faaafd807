"""Restores and resets of a running kernel, and a restore cut short finished.

A restore replaces the kernel's files by a snapshot's and brings its memory back
with CRIU (or, where that cannot be done, starts it afresh on those files). It takes
the kernel's operation lock (``KernelStore.exclusive``); the record is changed only
through ``KernelStore.update``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError, RequirementMissing, SandboxError
from sandbox_kernel.protocol import connections_from_outside

from . import paths, snapshots
from .boot import Boot, lazy_restore_size
from .drivers import Drivers
from .fsutil import write_json
from .lifecycle import follow_class
from .portable import misfit_host
from .ports import KERNEL_PORTS
from .record import KernelRecord
from .rootfs import Rootfs, check_disk, check_folders, inherited_bytes
from .store import KernelStore

#: In a kernel's run folder: how many connections its frontends had when it was
#: restored (``{"shell": n, "iopub": m}``).
PEERS = "peers.json"


def count_peers(pid: int) -> dict[str, int]:
    """The live TCP connections from outside to the shell and iopub ports of the
    kernel whose init is ``pid``, read from the host in its network namespace (a
    Jupyter server holds two on iopub: a browser's channel and its own watcher)."""
    ports = {KERNEL_PORTS["shell_port"]: "shell", KERNEL_PORTS["iopub_port"]: "iopub"}
    counts = {"shell": 0, "iopub": 0}
    for channel, _ in connections_from_outside(Path(f"/proc/{pid}/net/tcp").read_text(), ports):
        counts[channel] += 1
    return counts


class Restorer:
    """Brings kernels back to a snapshot, to their base, or to the image's files."""

    def __init__(
        self,
        drivers: Drivers,
        store: KernelStore,
        rootfs: Rootfs,
        boot: Boot,
        from_base: Callable[..., Awaitable[tuple[int, str]]],
    ) -> None:
        self.drivers = drivers
        self.store = store
        self.rootfs = rootfs
        self.boot = boot
        #: Starts a kernel from its base, cold where that fails (``Lifecycle.start_from_base``).
        self.from_base = from_base

    # ---- restore --------------------------------------------------------------------

    async def restore(self, kernel_id: str, name: str, arriving: bool = False) -> dict[str, Any]:
        """Bring kernel ``kernel_id`` back to snapshot ``name``, in place.

        The kernel keeps its id, address and connection info. A ``live`` snapshot
        is restored with CRIU: the processes continue from the snapshot's moment and
        clients reconnect by themselves. A ``files`` snapshot (or a live one CRIU
        cannot restore) brings the files back and starts the kernel afresh. Returns
        ``{"pid", "mode", "reason", "name"}``; the provisioner picks up the new pid.

        Raises:
            SnapshotNotFound, SnapshotCorrupt, ConfigError: refused before anything
                was touched; the kernel runs on as it was.
            CommandError: the container could not be stopped or started.
        """
        async with self.store.exclusive(kernel_id):
            return await self._restore(kernel_id, name, arriving)

    async def finish_restore(self, kernel_id: str) -> int | None:
        """Complete a restore whose runtime died in the middle; return the new pid.

        A restore notes its snapshot in the kernel's record as soon as it has
        stopped the kernel, and clears the note when the kernel runs again. A note
        left behind means the old process is gone and the new one may not be whole:
        the restore is done again from the start. None if no restore was cut short.
        """
        async with self.store.exclusive(kernel_id):
            name = self.store.load(kernel_id).restoring
            if not name:
                return None
            self.rootfs.append_log(kernel_id, f"finishing the restore of {name}, cut short")
            try:
                done = await self._restore(kernel_id, name)
            except BaseException:
                # Tried once: the kernel restarts instead.
                await self.store.aupdate(kernel_id, _restore_done)
                raise
            pid: int = done["pid"]
            return pid

    async def _restore(self, kernel_id: str, name: str, arriving: bool = False) -> dict[str, Any]:
        """:meth:`restore`, with the kernel's operation lock held."""
        owner = str(self.store.load(kernel_id).uid)
        # One still being saved in the background is restored once it is durable.
        await asyncio.to_thread(snapshots.wait_saved, owner, name)
        async with snapshots.areading(owner, name):  # a delete waits for the restore
            return await self._restore_read(kernel_id, name, arriving)

    async def _restore_read(self, kernel_id: str, name: str, arriving: bool) -> dict[str, Any]:
        """:meth:`_restore`, with the snapshot held against its deletion."""
        record = self.store.load(kernel_id)
        kdir = self.store.kernel_dir(kernel_id)
        owner = str(record.uid)
        folder = snapshots.snapshot_dir(owner, name)
        # Only a snapshot this kernel may see (same owner, image and folder).
        snapshots.load_visible(record, name)
        meta = await asyncio.to_thread(snapshots.verify, owner, name)
        why = misfit_host(meta.get("host"))
        if why:
            raise ConfigError("snapshot", name, f"cannot be restored on this machine: {why}")
        inherited = await asyncio.to_thread(inherited_bytes, meta, folder)
        check_disk(record, inherited, f"snapshot {name!r}")
        check_folders(record)  # before the kernel is stopped (checked again at the mount)
        mode, reason, criu = meta["mode"], meta.get("reason", ""), None
        if mode == "live":
            try:
                criu = self.drivers.criu.criu_binary()
            except RequirementMissing as err:
                mode, reason = "files", str(err)
        # A kernel arriving from another node has none of its frontends here yet: its
        # process waits for one connection of each.
        await self._note_peers(record, count=not arriving)
        await self.drivers.runc.delete(record.container_id)

        def restoring(current: KernelRecord) -> None:
            # The old process is gone: a restore cut short from here on is
            # finished by whoever notices (see finish_restore).
            current.restoring = name

        def files_from(current: KernelRecord) -> None:
            current.snapshot = name  # the next snapshot's parent

        await self.store.aupdate(kernel_id, restoring)
        await asyncio.to_thread(self._files_from, kdir, record, folder, meta)
        await self.store.aupdate(kernel_id, files_from)
        try:
            if criu is not None:
                lazy = None
                if meta.get("memory_bytes", 0) >= lazy_restore_size():
                    lazy = folder / snapshots.SERVING
                try:
                    pid = await self.boot.restore(kdir, record, criu, folder / "criu", lazy)
                    await self.store.aupdate(kernel_id, _restore_done)
                    return {"pid": pid, "mode": "live", "reason": "", "name": name}
                except SandboxError as err:
                    await self.drivers.runc.delete(record.container_id)
                    mode, reason = "files", f"CRIU could not restore the memory: {err}"
                    self.rootfs.append_log(kernel_id, f"restore of {name}: {reason}")
            pid = await self.boot.run(kdir, record)
            await self.store.aupdate(kernel_id, _restore_done)
            return {"pid": pid, "mode": mode, "reason": reason, "name": name}
        except BaseException:
            await asyncio.to_thread(self.rootfs.unmount, kdir)
            raise

    async def _note_peers(self, record: KernelRecord, count: bool = True) -> None:
        """Tell the process a restore brings back how many frontend connections to
        wait for (``peers.json`` in its run folder; see the magic's handoff): those
        its kernel has now. None are told where that cannot be seen."""
        path = self.rootfs.run_dir(record.kernel_id) / PEERS
        try:
            path.unlink(missing_ok=True)
            if not count:
                return
            state = await self.drivers.runc.state(record.container_id)
            pid = state.get("pid") if state else None
            if pid:
                write_json(path, await asyncio.to_thread(count_peers, int(pid)), mode=0o644)
        except (OSError, ValueError, SandboxError):
            pass  # the process then waits for one connection of each, as before

    def _files_from(
        self, kdir: Path, record: KernelRecord, folder: Path, meta: dict[str, Any]
    ) -> None:
        """Replace a stopped kernel's files by those of the snapshot in ``folder`` and
        mount them. Blocks: called in a thread."""
        self.rootfs.unmount(kdir)
        self.rootfs.layer_from(record, folder, meta)
        self.rootfs.mount(kdir, record)

    async def reset(self, kernel_id: str, pristine: bool = False) -> dict[str, Any]:
        """Give kernel ``kernel_id`` a fresh start, with the same id, address and
        connection info. Snapshots stay.

        A class kernel (one with a base) goes back to its base, files and memory:
        where the class started. With ``pristine``, or without a base, everything
        the kernel wrote is gone and a new process starts on the image's pristine
        files. Returns ``{"pid", "to"}``, ``to`` being ``base`` or ``image`` (a
        base that cannot be restored gives a cold start on its files, ``files``,
        with the reason in ``note``); the provisioner picks up the new pid.

        Raises:
            ConfigError: a user's folder was moved or replaced; the kernel runs on.
            CommandError: the container could not be stopped or started.
        """
        async with self.store.exclusive(kernel_id):
            record = self.store.load(kernel_id)
            kdir = self.store.kernel_dir(kernel_id)
            check_folders(record)  # before the kernel is stopped (checked again at the mount)
            if not pristine:
                record = await asyncio.to_thread(
                    follow_class, self.store, record,
                    lambda text: self.rootfs.append_log(kernel_id, text),
                )  # fmt: skip
            await self._note_peers(record)
            await self.drivers.runc.delete(record.container_id)
            to_base = await asyncio.to_thread(
                self._fresh_files, kdir, record, record.base is not None and not pristine
            )

            def fresh(current: KernelRecord) -> None:
                current.snapshot = None

            await self.store.aupdate(kernel_id, fresh)
            try:
                await asyncio.to_thread(self.rootfs.mount, kdir, record)
                if not to_base:
                    return {"pid": await self.boot.run(kdir, record), "to": "image", "note": ""}
                pid, note = await self.from_base(kdir, record, "reset started")
                return {"pid": pid, "to": "files" if note else "base", "note": note}
            except BaseException:
                await asyncio.to_thread(self.rootfs.unmount, kdir)
                raise

    def _fresh_files(self, kdir: Path, record: KernelRecord, to_base: bool) -> bool:
        """Give a stopped kernel new files: its base's if ``to_base`` and the base is
        there, else an empty writable layer. Whether they are the base's. Blocks."""
        self.rootfs.unmount(kdir)
        if to_base:
            try:
                self.rootfs.make_layer(kdir, record)
                return True
            except ConfigError as err:  # the base is gone
                self.rootfs.append_log(record.kernel_id, f"reset to the image: {err}")
        self.rootfs.make_layer(kdir, record, fresh=True)
        return False

    async def thaw_if_stale(self, kernel_id: str) -> bool:
        """Thaw a kernel left frozen by a snapshot whose runtime died; True if it was.

        A frozen container whose operation lock nobody holds was frozen by a process
        that is gone (the lock goes with its holder). Cheap when the kernel is not
        frozen: one small cgroup file is read. Called by the provisioner's ``poll``.
        """
        cid = paths.container_id(kernel_id)
        if not self.drivers.cgroups.frozen(paths.cgroup_of(cid)):
            return False
        with self.store.busy(kernel_id) as held:
            if held is None:
                return False  # a snapshot is in progress
            await self.drivers.runc.resume(cid)
            self.rootfs.append_log(
                kernel_id, "thawed: the snapshot that froze the kernel was cut short"
            )
            return True


def _restore_done(record: KernelRecord) -> None:
    """Clear the note of a restore in progress: the kernel runs again, or it was
    tried once and the kernel restarts instead."""
    record.restoring = None
