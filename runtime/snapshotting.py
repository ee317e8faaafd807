"""Snapshots of a running kernel: take one, list them, delete one, diff against one.

The store of snapshots (folders, metas, checksums, quotas) is ``snapshots.py``;
this module puts a kernel into it, and ``restoring.py`` takes it back out. A
snapshot takes the kernel's operation lock (``KernelStore.exclusive``), so the
snapshots, restores and resets of one kernel run one at a time; the record is
changed only through ``KernelStore.update``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import RequirementMissing, SandboxError

from . import bases, dedupe, hostpath, layers, snapshots
from .boot import Boot, fresh_work
from .drivers import Drivers
from .fsutil import give
from .record import KernelRecord, Start
from .rootfs import Rootfs, checked_cwd, tree_bytes, tree_sizes
from .store import KernelStore


@dataclass
class Dump:
    """What the frozen moment of a snapshot produced."""

    mode: str  # "live" (files and memory) or "files"
    reason: str  # why files only, or ""
    paused: float  # seconds the kernel was frozen


def _out_of_space(error: str, log: Path) -> bool:
    """Whether a failed CRIU dump ran out of room on the volume."""
    marks = ("No space left on device", "Disk quota exceeded")
    with contextlib.suppress(OSError):
        error += log.read_text(errors="replace")[-20000:]
    return any(mark in error for mark in marks)


class Snapshotter:
    """Takes snapshots of kernels, and shows a kernel its snapshots."""

    def __init__(self, drivers: Drivers, store: KernelStore, rootfs: Rootfs, boot: Boot) -> None:
        self.drivers = drivers
        self.store = store
        self.rootfs = rootfs
        self.boot = boot

    # ---- snapshot -------------------------------------------------------------------

    async def snapshot(
        self,
        kernel_id: str,
        name: str,
        message: str = "",
        live: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Snapshot kernel ``kernel_id``'s files and live memory as ``name``; return its
        meta. Four steps: freeze and dump, share pages with the parent, describe,
        commit. A failure at any step keeps nothing.

        The container is frozen while its writable layer is copied and CRIU dumps
        its processes (leaving them running), so files and memory come from the same
        moment; then it is thawed. Where CRIU is missing or fails, or ``live`` is
        False, the snapshot keeps the files only (mode ``files``, with the reason).
        ``progress`` is called with a line of text as each later step starts.

        Raises:
            ConfigError: the name is invalid or taken.
            QuotaExceeded, StoreFull: the owner's limit, or the volume, is full.
            KernelNotFound: no such kernel.
            CommandError: the container could not be frozen or thawed.
        """
        started = time.monotonic()
        say = progress or (lambda text: None)
        async with self.store.exclusive(kernel_id):
            record = self.store.load(kernel_id)
            owner = str(record.uid)
            snapshots.check_name(name)
            await asyncio.to_thread(snapshots.check_quota, owner, name)
            draft = snapshots.Draft(owner, name)
            try:
                dump = await self._freeze_and_dump(record, draft, live)
                memory = tree_bytes(draft.criu_dir) if draft.criu_dir.is_dir() else 0
                say(f"saved files and {format_size(memory)} of memory ({dump.paused:.2f} s frozen)")
                shared_with, shared = await self._share_pages(record, draft, dump, say)
                meta = await self._describe(record, draft, dump, message, memory)
                meta.update(shared_bytes=shared, shared_with=shared_with if shared else {})
                meta["seconds"] = round(time.monotonic() - started, 4)
                await asyncio.to_thread(snapshots.check_quota, owner, name, meta)
                say(f"checksumming and syncing {format_size(memory)}")
                meta = await asyncio.to_thread(draft.commit, meta)
            except OSError as err:
                draft.discard()
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise snapshots.StoreFull(name) from err
                raise
            except BaseException:
                draft.discard()
                raise

            def parent(current: KernelRecord) -> None:
                current.snapshot = name  # the next snapshot's parent

            await self.store.aupdate(kernel_id, parent)
            return meta

    async def _freeze_and_dump(
        self, record: KernelRecord, draft: snapshots.Draft, live: bool
    ) -> Dump:
        """Freeze the kernel, snapshot its writable layer into the draft and, if
        ``live``, dump its memory there; thaw it."""
        kdir = self.store.kernel_dir(record.kernel_id)
        mode, reason = "files", "" if live else "asked for files only"
        dump: tuple[str, dict[str, str], str] | None = None
        if live:
            try:
                dump = self.drivers.criu.dump_command(record.uid, record.gid)
            except RequirementMissing as err:
                reason = str(err)
        work = fresh_work(kdir)
        layer = self.rootfs.layer_dir(record.kernel_id)
        # Nothing is said while the kernel is frozen: CRIU would dump the unread
        # line with the kernel's control connection.
        await self.drivers.runc.pause(record.container_id)
        frozen = time.monotonic()
        try:
            await asyncio.to_thread(
                self.drivers.volume.snapshot_subvolume, layer, draft.files, True
            )
            if dump is not None:
                mode, reason = await self._dump(kdir, record, draft, dump, work)
        finally:
            self.boot.criu_config(kdir)
            await self.drivers.runc.resume(record.container_id)
        return Dump(mode, reason, time.monotonic() - frozen)

    async def _dump(
        self,
        kdir: Path,
        record: KernelRecord,
        draft: snapshots.Draft,
        dump: tuple[str, dict[str, str], str],
        work: Path,
    ) -> tuple[str, str]:
        """CRIU-dump the frozen kernel into the draft: (mode, reason).

        Raises:
            StoreFull: the volume ran out of room.
        """
        criu, env, config = dump
        self.boot.criu_config(kdir, config)
        try:
            await self.drivers.runc.checkpoint(record.container_id, criu, draft.criu_dir, work, env)
        except SandboxError as err:
            if _out_of_space(str(err), work / "dump.log"):
                raise snapshots.StoreFull(draft.name) from err
            shutil.rmtree(draft.criu_dir, ignore_errors=True)
            return "files", f"CRIU could not dump this kernel: {err}"
        # A restore reads the images from inside the kernel's user namespace, where
        # only ids it maps have rights, and CRIU reads the first one (timens) before
        # it has even written the namespace's maps: the folder runc made (root's,
        # 0600) becomes the kernel user's, and searchable by all. The images are
        # 0644, and the snapshot's own folder stays root's alone (0700).
        give(draft.criu_dir, record.uid, record.gid)
        draft.criu_dir.chmod(0o711)
        return "live", ""

    async def _share_pages(
        self,
        record: KernelRecord,
        draft: snapshots.Draft,
        dump: Dump,
        say: Callable[[str], None],
    ) -> tuple[dict[str, Any], int]:
        """Share the new memory images' unchanged pages with those of the snapshot
        the kernel's files came from (or its base): (whose, bytes shared)."""
        if dump.mode != "live":
            return {}, 0
        like: Path | None = None
        shared_with: dict[str, Any] = {}
        if record.snapshot:
            # The parent may have been deleted since: then there is nothing to share.
            with contextlib.suppress(SandboxError, OSError):
                created = snapshots.load(draft.owner, record.snapshot)["created"]
                like = snapshots.snapshot_dir(draft.owner, record.snapshot) / "criu"
                shared_with = {"kind": "snapshot", "name": record.snapshot, "created": created}
        elif record.start is Start.BASE and record.base:
            like = bases.base_dir(record.base) / "criu"
            shared_with = {"kind": "base", "id": record.base}
        if like is None or not like.is_dir():
            return {}, 0
        say(f"sharing unchanged pages with {record.snapshot or 'the base'}")
        shared = await asyncio.to_thread(dedupe.share_with_parent, draft.criu_dir, like)
        return shared_with, shared

    @staticmethod
    async def _describe(
        record: KernelRecord, draft: snapshots.Draft, dump: Dump, message: str, memory: int
    ) -> dict[str, Any]:
        """The new snapshot's meta (without its timing and sharing)."""
        file_bytes, layer_bytes = await asyncio.to_thread(tree_sizes, draft.files)
        return {
            "created": time.time(),
            "message": message,
            "parent": record.snapshot,
            "mode": dump.mode,
            "reason": dump.reason,
            "image": record.image,
            "layers": record.layers,
            "kernel_id": record.kernel_id,
            # What a kernel started from this snapshot as a base must match.
            "uid": record.uid,
            "gid": record.gid,
            "executable": record.executable,
            "python_prefixes": record.python_prefixes,
            "cwd_inside": record.cwd_inside,
            # The host folder: kernels elsewhere do not see this snapshot.
            "cwd": record.cwd,
            "file_bytes": file_bytes,
            # Blocks of the files: what a restore brings against `disk`.
            "layer_bytes": layer_bytes,
            "memory_bytes": memory,
            "paused_seconds": round(dump.paused, 4),
            "seconds": 0.0,
        }

    # ---- the kernel's view of the store ---------------------------------------------

    def listing(self, kernel_id: str) -> dict[str, Any]:
        """The snapshots kernel ``kernel_id`` may see (see ``snapshots.visible_to``),
        oldest first, and its owner's use of the store against the limit:
        ``{"snapshots": [meta, ...], "store": snapshots.usage(...)}``."""
        record = self.store.load(kernel_id)
        owner = str(record.uid)
        metas = snapshots.listing(owner)  # read once, for both answers
        return {
            "snapshots": [m for m in metas if snapshots.visible_to(m, record)],
            "store": snapshots.usage(owner, {m["name"]: m for m in metas}),
        }

    def delete(self, kernel_id: str, name: str) -> None:
        """Delete snapshot ``name`` on behalf of kernel ``kernel_id``: only one that
        kernel may see. It may wait for a lazy restore's page server.

        Raises:
            SnapshotNotFound: no such snapshot, or one the kernel may not see.
        """
        record = self.store.load(kernel_id)
        snapshots.load_visible(record, name)
        snapshots.delete(str(record.uid), name)

    def diff(self, kernel_id: str, name: str | None = None) -> dict[str, Any]:
        """Files added, changed and deleted since snapshot ``name`` (default: the
        snapshot the kernel's files came from, else the kernel's start), like
        ``docker diff``. Paths are as the kernel sees them. Walks the files: async
        code calls it in a thread.

        Raises:
            SnapshotNotFound: no such snapshot, or one the kernel may not see.
        """
        record = self.store.load(kernel_id)
        since = name or record.snapshot
        current = self.rootfs.layer_dir(kernel_id)
        base = snapshots.snapshot_dir(str(record.uid), since) / "files" if since else None
        if since:
            snapshots.load_visible(record, since)
        changes: dict[str, Any] = {"since": since, "added": [], "changed": [], "deleted": []}
        for part, mount in (("root", "/"), ("cwd", record.cwd_inside)):
            now = _entries(current / part)
            then = _entries(base / part) if base else {}
            for rel, entry in sorted(now.items()):
                path = str(Path(mount) / rel)
                if entry == "whiteout":
                    if base is None or then.get(rel, "whiteout") != "whiteout":
                        changes["deleted"].append(path)
                elif rel not in then or then[rel] == "whiteout":
                    existed = base is None and _in_lower(record, part, rel)
                    changes["changed" if existed else "added"].append(path)
                elif then[rel] != entry:
                    changes["changed"].append(path)
            for rel, entry in sorted(then.items()):
                if rel not in now and entry != "whiteout":
                    changes["deleted"].append(str(Path(mount) / rel))
        return changes


def _in_lower(record: KernelRecord, part: str, rel: str) -> bool:
    """Whether ``rel`` exists below the kernel's files: the host working folder
    (walked without following symlinks) or the image's layers."""
    if part == "cwd":
        with checked_cwd(record) as cwd:
            return hostpath.lookup(cwd, rel)
    return any((layers.layer_path(d) / rel).exists() for d in record.layers)


def _entries(root: Path) -> dict[str, Any]:
    """Every entry below ``root``: a whiteout marker, or (type, size, mtime) to compare."""
    found: dict[str, Any] = {}
    if not root.is_dir():
        return found
    for path in root.rglob("*"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # the running kernel removed it meanwhile (SQLite's journal)
        rel = path.relative_to(root).as_posix()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            found[rel] = "whiteout"
        elif stat.S_ISDIR(st.st_mode):
            continue  # a folder is listed through what changed inside it
        else:
            found[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return found
