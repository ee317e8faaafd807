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
import logging
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import RequirementMissing, SandboxError

from . import bases, dedupe, hostpath, layers, paths, saving, snapshots
from .boot import Boot, fresh_work
from .drivers import Drivers
from .fsutil import give
from .portable import host_facts
from .record import KernelRecord, Start
from .rootfs import Rootfs, checked_cwd, tree_bytes, tree_sizes
from .store import KernelStore

log = logging.getLogger(__name__)


@dataclass
class Dump:
    """What the frozen moment of a snapshot produced."""

    mode: str  # "live" (files and memory) or "files"
    reason: str  # why files only, or ""
    paused: float  # seconds the kernel was frozen
    staged: bool = False  # the memory images are in a staging folder, not the draft


@contextlib.contextmanager
def _dropped_on_failure(draft: snapshots.Draft) -> Iterator[None]:
    """Discard ``draft`` if the block fails; a full volume is :class:`StoreFull`."""
    try:
        yield
    except OSError as err:
        draft.discard()
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise snapshots.StoreFull(draft.name) from err
        raise
    except BaseException:
        draft.discard()
        raise


def _listed(meta: dict[str, Any], record: KernelRecord) -> bool:
    """Whether ``%container list`` of kernel ``record`` shows snapshot ``meta``: one
    it may see, but for automatic checkpoints (``%container history`` shows them)."""
    return snapshots.visible_to(meta, record) and not snapshots.is_checkpoint(meta["name"])


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
        wait: bool = False,
        keep_frozen: bool = False,
    ) -> dict[str, Any]:
        """Snapshot kernel ``kernel_id``'s files and live memory as ``name``; return its
        meta. A failure at any step keeps nothing.

        The container is frozen while its writable layer is copied and CRIU dumps
        its processes (leaving them running), so files and memory come from the same
        moment; then it is thawed. Where CRIU is missing or fails, or ``live`` is
        False, the snapshot keeps the files only (mode ``files``, with the reason).
        ``progress`` is called with a line of text as each later step starts.

        Where the machine can spare the memory, CRIU dumps into a staging folder in
        memory, and the images are saved to the volume in the background after the
        kernel is thawed (see ``saving.py``): the meta returned then has ``saving``
        True, and the snapshot is listed as saving until it is durable. With
        ``wait``, or where only the save can tell whether the snapshot fits the
        owner's quota (its pages shared with the parent count), this waits for the
        save and returns the final meta. With ``keep_frozen`` (a kernel that moves to
        another node) the kernel stays frozen after a dump that went through: it must
        not run on past the moment its new node restores.

        Raises:
            ConfigError: the name is invalid or taken.
            QuotaExceeded, StoreFull: the owner's limit, or the volume, is full.
            KernelNotFound: no such kernel.
            CommandError: the container could not be frozen or thawed.
        """
        started = time.monotonic()
        say = progress or (lambda text: None)
        under_way: saving.Saving | None = None
        must_wait = wait
        async with self.store.exclusive(kernel_id):
            record = self.store.load(kernel_id)
            owner = str(record.uid)
            snapshots.check_name(name)
            await asyncio.to_thread(snapshots.check_quota, owner, name)
            draft = snapshots.Draft(owner, name)
            staging: saving.Staging | None = None
            try:
                with _dropped_on_failure(draft):
                    staging = self._staging(record, live)
                    dump = await self._freeze_and_dump(record, draft, live, staging, keep_frozen)
                    images = (
                        staging.images if staging is not None and dump.staged else draft.criu_dir
                    )
                    memory = tree_bytes(images) if images.is_dir() else 0
                    frozen = f"{dump.paused:.2f} s frozen"
                    say(f"saved files and {format_size(memory)} of memory ({frozen})")
                    if staging is not None and dump.staged:
                        meta = await self._describe(record, draft, dump, message, memory)
                        meta.update(name=name, owner=owner, shared_bytes=0, shared_with={})
                        meta["seconds"] = round(time.monotonic() - started, 4)
                        try:
                            await asyncio.to_thread(snapshots.check_quota, owner, name, meta)
                        except snapshots.QuotaExceeded:
                            must_wait = True  # the save shares pages with the parent, then checks
                        # The last step here: from now on the draft is the save's.
                        under_way = self._save_later(record, draft, staging, meta)
                        staging = None
                    else:
                        meta = await self._commit_here(record, draft, dump, message, memory, say)
                        meta["seconds"] = round(time.monotonic() - started, 4)
            finally:
                if staging is not None:
                    staging.remove()
            if under_way is not None and not must_wait:
                say(f"writing {format_size(memory)} to disk in the background")

            def parent(current: KernelRecord) -> None:
                current.snapshot = name  # the next snapshot's parent

            await self.store.aupdate(kernel_id, parent)
        if under_way is None:
            return meta
        if must_wait:
            say(f"saving {format_size(memory)} to disk")
            final = await asyncio.to_thread(under_way.wait)
            return {**final, "seconds": round(time.monotonic() - started, 4)}
        return {**meta, "saving": True}

    def _staging(self, record: KernelRecord, live: bool) -> saving.Staging | None:
        """A staging folder in memory for the kernel's dump, or None (the dump then
        goes straight to the volume)."""
        if not live:
            return None
        used = self.drivers.cgroups.usage(paths.cgroup_of(record.container_id))
        if used is None or used.memory is None:
            return None
        # What the cgroup holds (process memory and its page cache) bounds the dump.
        staging, why = saving.stage(used.memory)
        if staging is None:
            log.info("kernel %s: dumping to the volume: %s", record.kernel_id, why)
        return staging

    def _save_later(
        self,
        record: KernelRecord,
        draft: snapshots.Draft,
        staging: saving.Staging,
        meta: dict[str, Any],
    ) -> saving.Saving:
        """Queue the save of a staged dump into ``draft`` (see ``saving.py``)."""
        kernel_id, owner, name = record.kernel_id, draft.owner, draft.name
        started = time.monotonic()

        def save() -> dict[str, Any]:
            try:
                with _dropped_on_failure(draft):
                    # Here, not before: a parent still being saved is saved by now.
                    like, shared_with = self._parent_images(record, draft)
                    checksums, shared = dedupe.copy_sharing(staging.images, draft.criu_dir, like)
                    self._readable(record, draft.criu_dir)
                    final = {**meta, "shared_bytes": shared}
                    final["shared_with"] = shared_with if shared else {}
                    final["save_seconds"] = round(time.monotonic() - started, 4)
                    snapshots.check_quota(owner, name, final)
                    return draft.commit(final, checksums)
            finally:
                staging.remove()

        def ended(done: saving.Saving) -> None:
            if done.error is None:
                took = time.monotonic() - started
                self._note(kernel_id, f"snapshot {name} saved in {took:.2f} s")
                return
            self._note(kernel_id, f"snapshot {name} was not saved: {done.error}")

            def unparent(current: KernelRecord) -> None:
                if current.snapshot == name:
                    current.snapshot = meta.get("parent")

            with contextlib.suppress(SandboxError, OSError):
                self.store.update(kernel_id, unparent)

        draft.saving(meta)
        return saving.submit(saving.Saving(owner, name, meta, save, ended))

    def _note(self, kernel_id: str, text: str) -> None:
        """A line in the kernel's log (and the runtime's)."""
        log.info("kernel %s: %s", kernel_id, text)
        with contextlib.suppress(OSError, SandboxError):
            self.rootfs.append_log(kernel_id, text)

    async def _commit_here(
        self,
        record: KernelRecord,
        draft: snapshots.Draft,
        dump: Dump,
        message: str,
        memory: int,
        say: Callable[[str], None],
    ) -> dict[str, Any]:
        """Share pages, describe and commit a dump written straight to the volume."""
        owner, name = draft.owner, draft.name
        shared_with, shared = await self._share_pages(record, draft, dump, say)
        meta = await self._describe(record, draft, dump, message, memory)
        meta.update(shared_bytes=shared, shared_with=shared_with if shared else {})
        await asyncio.to_thread(snapshots.check_quota, owner, name, meta)
        say(f"checksumming and syncing {format_size(memory)}")
        return await asyncio.to_thread(draft.commit, meta)

    async def _freeze_and_dump(
        self,
        record: KernelRecord,
        draft: snapshots.Draft,
        live: bool,
        staging: saving.Staging | None = None,
        keep_frozen: bool = False,
    ) -> Dump:
        """Freeze the kernel, snapshot its writable layer into the draft and, if
        ``live``, dump its memory into ``staging`` (else the draft); thaw it. A dump
        that fails in staging (the tmpfs full) is taken again into the draft."""
        kdir = self.store.kernel_dir(record.kernel_id)
        mode, reason = "files", "" if live else "asked for files only"
        dump: tuple[str, dict[str, str], str] | None = None
        staged = False
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
            if dump is not None and staging is not None:
                try:
                    mode, reason = await self._dump(kdir, record, staging.images, dump, work)
                    staged = mode == "live"
                except snapshots.StoreFull:
                    shutil.rmtree(staging.images, ignore_errors=True)
                    log.info("kernel %s: the staging tmpfs is full; dumping to the volume",
                             record.kernel_id)  # fmt: skip
                    work = fresh_work(kdir)
                    staging = None
            if dump is not None and staging is None:
                mode, reason = await self._dump(kdir, record, draft.criu_dir, dump, work)
                if mode == "live":
                    self._readable(record, draft.criu_dir)
        except BaseException:
            self.boot.criu_config(kdir)
            await self.drivers.runc.resume(record.container_id)
            raise
        self.boot.criu_config(kdir)
        if not (keep_frozen and mode == "live"):
            await self.drivers.runc.resume(record.container_id)
        return Dump(mode, reason, time.monotonic() - frozen, staged)

    async def _dump(
        self,
        kdir: Path,
        record: KernelRecord,
        images: Path,
        dump: tuple[str, dict[str, str], str],
        work: Path,
    ) -> tuple[str, str]:
        """CRIU-dump the frozen kernel into ``images``: (mode, reason).

        Raises:
            StoreFull: the volume (or staging tmpfs) ran out of room.
        """
        criu, env, config = dump
        self.boot.criu_config(kdir, config)
        try:
            await self.drivers.runc.checkpoint(record.container_id, criu, images, work, env)
        except SandboxError as err:
            if _out_of_space(str(err), work / "dump.log"):
                raise snapshots.StoreFull(images.parent.name) from err
            shutil.rmtree(images, ignore_errors=True)
            return "files", f"CRIU could not dump this kernel: {err}"
        return "live", ""

    @staticmethod
    def _readable(record: KernelRecord, images: Path) -> None:
        """Let a restore read the images.

        A restore reads the images from inside the kernel's user namespace, where
        only ids it maps have rights, and CRIU reads the first one (timens) before
        it has even written the namespace's maps: the folder runc made (root's,
        0600) becomes the kernel user's, and searchable by all. The images are
        0644, and the snapshot's own folder stays root's alone (0700).
        """
        give(images, record.uid, record.gid)
        images.chmod(0o711)

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
        like, shared_with = await asyncio.to_thread(self._parent_images, record, draft)
        if like is None:
            return {}, 0
        say(f"sharing unchanged pages with {record.snapshot or 'the base'}")
        shared = await asyncio.to_thread(dedupe.share_with_parent, draft.criu_dir, like)
        return shared_with, shared

    @staticmethod
    def _parent_images(
        record: KernelRecord, draft: snapshots.Draft
    ) -> tuple[Path | None, dict[str, Any]]:
        """The memory images of the snapshot the kernel's files came from (or its
        base), to share unchanged pages with, and how the meta names them; (None,
        {}) where there are none. A parent still being saved is waited for."""
        like: Path | None = None
        shared_with: dict[str, Any] = {}
        # A parent of the same name never reached the disk (its save failed or was
        # cut short, and the name was taken again): there is nothing to share.
        if record.snapshot and record.snapshot != draft.name:
            # The parent may have been deleted since: then there is nothing to share.
            with contextlib.suppress(SandboxError, OSError):
                created = snapshots.load(draft.owner, record.snapshot)["created"]
                like = snapshots.snapshot_dir(draft.owner, record.snapshot) / "criu"
                shared_with = {"kind": "snapshot", "name": record.snapshot, "created": created}
        elif record.start is Start.BASE and record.base:
            like = bases.base_dir(record.base) / "criu"
            shared_with = {"kind": "base", "id": record.base}
        if like is None or not like.is_dir():
            return None, {}
        return like, shared_with

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
            # What CRIU needs of a machine that restores it (see portable.py).
            "host": host_facts(),
        }

    # ---- the kernel's view of the store ---------------------------------------------

    def listing(self, kernel_id: str) -> dict[str, Any]:
        """The snapshots kernel ``kernel_id`` may see (see ``snapshots.visible_to``),
        oldest first (those being saved last, with ``saving``), its owner's use of
        the store against the limit, and this kernel's snapshots whose save failed
        in the last hour: ``{"snapshots": [meta, ...], "store": snapshots.usage(...),
        "unsaved": [{"name", "error", "time"}, ...]}``."""
        record = self.store.load(kernel_id)
        owner = str(record.uid)
        metas = snapshots.listing(owner)  # read once, for both answers
        return {
            "snapshots": [m for m in metas if _listed(m, record)],
            "store": snapshots.usage(owner, {m["name"]: m for m in metas}),
            "unsaved": [
                f
                for f in saving.failures(owner, time.time() - 3600)
                if f.get("kernel_id") == kernel_id
            ],
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
