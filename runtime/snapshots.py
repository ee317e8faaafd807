"""The snapshot store: named snapshots per owner, written atomically, checked on read.

A snapshot is a folder ``snapshots/<owner>/<name>/`` of the runtime's btrfs volume
(see ``volume.py``), holding

- ``files``: a read-only btrfs snapshot of the kernel's writable layer;
- ``meta.json``: name, time, parent, mode (``live`` or ``files``), message, and the
  image and environment it belongs to;
- ``criu/``: the CRIU images of the kernel's processes (``live`` mode only);
- ``manifest.json``: the sha256 and size of every file under ``criu/``.

It is built in a hidden folder beside it and renamed into place after every file
and folder is fsynced, so a crash leaves no partial snapshot listed; ``gc`` removes
the hidden leftovers. A snapshot whose images are saved after the kernel was thawed
(``saving.py``) is listed meanwhile as *saving*, from the ``saving.json`` in its
locked hidden folder, and whatever reads it waits for it (:func:`wait_saved`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, SandboxError

from . import saving
from .fsutil import DraftFolder, fsync_dir, lock_held, read_json, write_json
from .limits import parse_size
from .volume import compress, delete_subvolume, ensure_volume, image_path, is_subvolume

if TYPE_CHECKING:
    from .record import KernelRecord

#: A file in a snapshot's folder that whatever reads the snapshot (a restore, a lazy
#: restore's page server) holds locked, shared (flock), while it reads; deleting the
#: snapshot takes it exclusively, so it waits for them and they for it.
SERVING = ".serving"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # whole names: fullmatch
MODES = ("live", "files")


class SnapshotNotFound(SandboxError, LookupError):
    """No snapshot of that name for this owner."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        hint = f"; there are: {', '.join(known)}" if known else "; there are none yet"
        super().__init__(f"no snapshot named {name!r}{hint}")


class SnapshotCorrupt(SandboxError):
    """A snapshot's files do not match its checksums; it is refused."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(
            f"snapshot {name!r} is damaged ({problem}); it was not restored and the "
            "kernel is untouched. Delete it with `sandbox-kernel snapshots --delete`"
        )


class SnapshotBusy(SandboxError):
    """A snapshot is still being written to disk after the time allowed to wait."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"snapshot {name!r} is still being written to disk; try again in a moment "
            "(`%container list` shows it as saving until then)"
        )


class StoreFull(SandboxError):
    """The volume has no room for a snapshot; nothing of it was kept."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"no space left on the snapshot volume for snapshot {name!r}: nothing was "
            "saved and the kernel runs on. Delete snapshots you no longer need "
            "(`%container delete NAME`), or give the volume more room "
            "(SANDBOX_KERNEL_VOLUME_SIZE)"
        )


class QuotaExceeded(SandboxError):
    """A snapshot would take its owner past the store's limit; nothing of it was kept."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(
            f"snapshot {name!r} was not taken: {problem}. Nothing was saved and the "
            "kernel runs on; delete snapshots you no longer need (`%container delete NAME`)"
        )


#: The names of the snapshots pristine bases are made from (see ``pristine.py``):
#: deleted once the base is made, and never listed.
PRISTINE_PREFIX = "pristine-base-"
#: The names of a kernel's automatic checkpoints (see ``timetravel.py``): counted
#: against the quota like any snapshot, but listed by ``%container history`` only.
CHECKPOINT_PREFIX = "ckpt-"
#: The names of the snapshots a kernel moving between nodes is carried in (see
#: ``sandbox_kernel/migrate.py``): deleted with the kernel, and never listed.
MOVED_PREFIX = "moved-"


def is_checkpoint(name: str) -> bool:
    """Whether snapshot ``name`` is an automatic checkpoint."""
    return name.startswith(CHECKPOINT_PREFIX)


def is_moved(name: str) -> bool:
    """Whether snapshot ``name`` carries a kernel between nodes."""
    return name.startswith(MOVED_PREFIX)


def check_name(name: str) -> str:
    """Validate a snapshot name.

    Raises:
        ConfigError: not 1-64 letters, digits, ``.``, ``-`` or ``_`` starting with a
            letter or digit.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            "snapshot name", name,
            "is not valid; use 1-64 letters, digits, '.', '-' or '_', e.g. before-training",
        )  # fmt: skip
    return name


def check_user_name(name: str) -> str:
    """:func:`check_name`, for a name a user gives: not one of the runtime's own
    (automatic checkpoints, pristine bases), which are hidden and removed by it.

    Raises:
        ConfigError: invalid, or starting with a reserved prefix.
    """
    check_name(name)
    for prefix in (CHECKPOINT_PREFIX, PRISTINE_PREFIX, MOVED_PREFIX):
        if name.startswith(prefix):
            raise ConfigError(
                "snapshot name", name,
                f"starts with {prefix!r}, which the runtime keeps for its own; choose another",
            )  # fmt: skip
    return name


def store_dir() -> Path:
    """The root of the store, on the mounted volume."""
    return ensure_volume() / "snapshots"


def owners() -> list[str]:
    """Every owner that has a snapshot folder. Where no volume was ever made there
    are none, and none is made (or mounted) to say so."""
    if not image_path().exists():
        return []
    base = store_dir()
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def owner_dir(owner: str) -> Path:
    """The folder of one owner's snapshots."""
    return store_dir() / owner


def snapshot_dir(owner: str, name: str) -> Path:
    """The folder of one snapshot (it may not exist)."""
    return owner_dir(owner) / check_name(name)


def names(owner: str, every: bool = False) -> list[str]:
    """The owner's snapshots, oldest first; hidden (unfinished) ones are not listed,
    nor (unless ``every``) the one a pristine base is being made from."""
    base = owner_dir(owner)
    found = []
    if base.is_dir():
        found = [
            p for p in base.iterdir() if not p.name.startswith(".") and (p / "meta.json").exists()
        ]
    listed = [p.name for p in sorted(found, key=lambda p: (p / "meta.json").stat().st_mtime)]
    # Being saved (see saving.py), by this process or another: after the saved ones.
    listed += [s.name for s in saving.saving(owner) if s.name not in listed]
    listed += [name for name in _saving_drafts(owner) if name not in listed]
    if not every:
        listed = [n for n in listed if not n.startswith(PRISTINE_PREFIX)]
    return listed


#: How long reading a snapshot waits for its save under way (see saving.py).
SAVE_WAIT = 600.0
#: In a draft being saved in the background: its meta so far, for other processes.
SAVING_META = "saving.json"


def _saving_drafts(owner: str) -> dict[str, Path]:
    """``owner``'s drafts being saved in the background, by this process or another
    (their writer holds the lock): name -> folder."""
    base = owner_dir(owner)
    found: dict[str, Path] = {}
    if not base.is_dir():
        return found
    for folder in sorted(base.iterdir()):
        if not folder.name.startswith(".") or folder.name.startswith(".deleting."):
            continue
        name = folder.name[1:].rsplit(".", 1)[0]  # DraftFolder's ".<name>.<random>"
        try:
            if (folder / SAVING_META).is_file() and lock_held(folder / ".lock"):
                found[name] = folder
        except OSError:
            continue  # committed or discarded meanwhile
    return found


def wait_saved(owner: str, name: str, timeout: float = SAVE_WAIT) -> None:
    """Wait until snapshot ``name`` is no longer being saved, by this process or
    another (not its outcome: a failed save leaves no snapshot). Blocks: async code
    calls it in a thread.

    Raises:
        SnapshotBusy: it is still being saved after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        saving.wait(owner, name, timeout)
    except TimeoutError:
        raise SnapshotBusy(name) from None
    while name in _saving_drafts(owner):
        if time.monotonic() > deadline:
            raise SnapshotBusy(name)
        time.sleep(0.02)


def load(owner: str, name: str, wait: bool = True) -> dict[str, Any]:
    """The meta of snapshot ``name``. One being saved is waited for (at most
    :data:`SAVE_WAIT` seconds); without ``wait``, its meta so far is returned, with
    ``saving`` True.

    Raises:
        SnapshotNotFound: there is no such snapshot (or its save failed).
        SnapshotBusy: it is still being saved.
    """
    under_way = saving.find(owner, name)
    if under_way is not None and not wait:
        return {**under_way.meta, "saving": True}
    if wait:
        wait_saved(owner, name)
    elif not (snapshot_dir(owner, name) / "meta.json").exists():
        draft = _saving_drafts(owner).get(name)
        if draft is not None:
            with contextlib.suppress(OSError, ValueError):
                return {**read_json(draft / SAVING_META), "saving": True}
    try:
        meta: dict[str, Any] = read_json(snapshot_dir(owner, name) / "meta.json")
    except FileNotFoundError:
        raise SnapshotNotFound(name, names(owner)) from None
    return meta


def listing(owner: str) -> list[dict[str, Any]]:
    """Every snapshot's meta, oldest first; those being saved last, with ``saving``."""
    found = []
    for name in names(owner):
        try:
            found.append(load(owner, name, wait=False))
        except SnapshotNotFound:
            continue  # its save failed or it was deleted meanwhile
    return found


# ---- who sees which snapshot -------------------------------------------------------


def visible_to(meta: dict[str, Any], record: KernelRecord) -> bool:
    """Whether the kernel of ``record`` may see and act on snapshot ``meta``.

    The rule for ``list``, ``diff``, ``delete`` and ``restore`` from inside a kernel:
    the same owner (the store is per uid), the same image and mount points (its
    layers), and the same host working folder. Kernels of one uid in other folders
    (on a root server, every kernel whose folder is root's runs as 65534) see none of
    each other's snapshots. Snapshots from before the folder was kept in the meta
    are matched by their layers, which name the folder's mount point.
    """
    if str(meta.get("owner")) != str(record.uid):
        return False
    if meta.get("layers") != record.layers:
        return False
    return bool(meta.get("cwd", record.cwd) == record.cwd)


def visible_listing(record: KernelRecord) -> list[dict[str, Any]]:
    """The metas of the snapshots the kernel of ``record`` may see, oldest first."""
    return [m for m in listing(str(record.uid)) if visible_to(m, record)]


def load_visible(record: KernelRecord, name: str) -> dict[str, Any]:
    """The meta of snapshot ``name`` if the kernel of ``record`` may see it.

    Raises:
        SnapshotNotFound: no such snapshot, or one the kernel may not see (the
            message lists only the ones it may).
    """
    owner = str(record.uid)
    check_name(name)
    try:
        meta = load(owner, name)
    except SnapshotNotFound:
        meta = None
    if meta is None or not visible_to(meta, record):
        raise SnapshotNotFound(name, [m["name"] for m in visible_listing(record)])
    return meta


# ---- the per-owner limit -------------------------------------------------------------


#: Defaults of the store's per-owner limits (see :func:`quota`).
DEFAULT_QUOTA_BYTES = 20 << 30
DEFAULT_QUOTA_COUNT = 100


#: Set by the daemon: ``owner -> (bytes, count)`` from its per-user quotas (None:
#: unlimited).
QUOTA_SOURCE: Callable[[str], tuple[int | None, int | None]] | None = None


def quota(owner: str | None = None) -> tuple[int, int]:
    """The most bytes and snapshots ``owner`` may keep: the daemon's quotas for them
    (:data:`QUOTA_SOURCE`), else ``$SANDBOX_KERNEL_SNAPSHOT_QUOTA`` (a size, default
    20G) and ``$SANDBOX_KERNEL_SNAPSHOT_COUNT`` (default 100). Set by the operator; a
    kernel cannot change them.

    Raises:
        ConfigError: a value is not a size or a whole number.
    """
    size = parse_size(
        os.environ.get("SANDBOX_KERNEL_SNAPSHOT_QUOTA", str(DEFAULT_QUOTA_BYTES)),
        "SANDBOX_KERNEL_SNAPSHOT_QUOTA",
    )
    text = os.environ.get("SANDBOX_KERNEL_SNAPSHOT_COUNT", str(DEFAULT_QUOTA_COUNT))
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(
            "SANDBOX_KERNEL_SNAPSHOT_COUNT", text, "is not a whole number; use e.g. 100"
        ) from None
    if QUOTA_SOURCE is not None and owner is not None:
        own_size, own_count = QUOTA_SOURCE(owner)
        size = 1 << 62 if own_size is None else own_size
        count = 1 << 31 if own_count is None else own_count
    return size, count


def charged_bytes(meta: dict[str, Any], metas: dict[str, dict[str, Any]]) -> int:
    """What snapshot ``meta`` counts against its owner's limit: its memory images
    less the pages it shares with its parent while that parent is still kept (once
    the parent is deleted the shared pages are this snapshot's alone), plus every
    block of its files (``layer_bytes``; a snapshot shares unchanged file blocks
    too, but counting them keeps a deleted parent from hiding bytes).

    ``metas`` are the owner's snapshots by name.
    """
    memory = int(meta.get("memory_bytes", 0))
    shared = int(meta.get("shared_bytes", 0))
    parent = metas.get(meta.get("parent") or "")
    like = meta.get("shared_with") or {}
    if like.get("kind") == "snapshot":
        still_there = parent is not None and parent.get("created") == like.get("created")
    elif like.get("kind") == "base":
        still_there = (store_dir().parent / "bases" / str(like.get("id")) / "meta.json").exists()
    else:
        still_there = False
    files = int(meta.get("layer_bytes", meta.get("file_bytes", 0)))
    return memory - (shared if still_there else 0) + files


def _by_name(owner: str) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in listing(owner)}


def usage(owner: str, metas: dict[str, dict[str, Any]] | None = None) -> dict[str, int]:
    """What ``owner`` keeps against the limit: ``bytes``, ``count``, and the limits
    ``quota_bytes`` and ``quota_count``. ``metas``: the owner's snapshots by name,
    if the caller has read them already."""
    metas = _by_name(owner) if metas is None else metas
    size, count = quota(owner)
    return {
        "bytes": sum(charged_bytes(m, metas) for m in metas.values()),
        "count": len(metas),
        "quota_bytes": size,
        "quota_count": count,
    }


def check_quota(owner: str, name: str, adding: dict[str, Any] | None = None) -> None:
    """Refuse a snapshot that takes ``owner`` past the limit: before it is taken
    (``adding`` None: the count, and bytes already at the limit), or once its meta
    is known (``adding``: its bytes too).

    Raises:
        QuotaExceeded: naming the limit and the use.
    """
    metas = _by_name(owner)
    metas.pop(name, None)  # itself, while it is being saved
    use = usage(owner, metas)
    if adding is None:
        if use["count"] >= use["quota_count"]:
            raise QuotaExceeded(
                name, f"you keep {use['count']} snapshots, the limit of {use['quota_count']}"
            )
        if use["bytes"] >= use["quota_bytes"]:
            raise QuotaExceeded(
                name,
                f"your snapshots take {format_size(use['bytes'])}, the limit of "
                f"{format_size(use['quota_bytes'])}",
            )
        return
    more = charged_bytes(adding, metas)
    if use["bytes"] + more > use["quota_bytes"]:
        raise QuotaExceeded(
            name,
            f"it takes {format_size(more)} and your snapshots already take "
            f"{format_size(use['bytes'])}, past the limit of {format_size(use['quota_bytes'])}",
        )


class Draft:
    """A snapshot being written. ``commit`` makes it visible; ``discard`` drops it.

    Used by the runtime: it dumps CRIU images into :attr:`criu_dir`, then commits
    with the meta.
    """

    def __init__(self, owner: str, name: str) -> None:
        self.owner = owner
        self.name = check_name(name)
        base = owner_dir(owner)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)  # behind the volume's 0700 too
        compress(base)  # made before the store was compressed, perhaps
        if (base / name).exists() or saving.find(owner, name) is not None:
            raise ConfigError(
                "snapshot name", name, "is taken; choose another name or delete that snapshot"
            )
        # Locked while it is written: gc leaves locked drafts alone.
        self._folder = DraftFolder(base, name, lock=True, remove=purge)
        self.path = self._folder.path
        self.criu_dir = self.path / "criu"
        self.files = self.path / "files"

    def commit(
        self, meta: dict[str, Any], checksums: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Checksum, fsync and rename the draft into place; return the final meta.

        ``checksums``: the images' ``{"sha256", "size"}`` by relative path, where
        they were taken as the images were written and fsynced (``saving.py``);
        the images are then not read again.

        Raises:
            ConfigError: another snapshot of that name appeared meanwhile.
        """
        manifest: dict[str, dict[str, Any]] = {}
        if self.criu_dir.is_dir():
            files = sorted(f for f in self.criu_dir.rglob("*") if f.is_file())
            if checksums is None:
                # hashlib releases the GIL on large buffers: hash and fsync side by side.
                with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                    digests = list(pool.map(_sha256_and_fsync, files))
            else:
                rels = [f.relative_to(self.criu_dir).as_posix() for f in files]
                digests = [checksums[rel]["sha256"] for rel in rels]
            for file, digest in zip(files, digests, strict=True):
                st = file.stat()
                manifest[file.relative_to(self.criu_dir).as_posix()] = {
                    "sha256": digest,
                    "size": st.st_size,
                    "stamp": [st.st_ino, st.st_mtime_ns, st.st_ctime_ns],
                }
            for folder in sorted({f.parent for f in files} | {self.criu_dir}):
                fsync_dir(folder)
        size = sum(entry["size"] for entry in manifest.values())
        meta = {**meta, "name": self.name, "owner": self.owner, "memory_bytes": size}
        write_json(self.path / "manifest.json", manifest)
        write_json(self.path / "meta.json", meta)
        (self.path / SAVING_META).unlink(missing_ok=True)
        try:
            self._folder.commit(owner_dir(self.owner) / self.name)
        except OSError:
            if self._folder.committed:
                raise
            self.discard()  # the rename failed: the name was taken meanwhile
            raise ConfigError("snapshot name", self.name, "is taken; choose another name") from None
        return meta

    def saving(self, meta: dict[str, Any]) -> None:
        """Mark the draft as being saved in the background, with its meta so far:
        other processes list it as saving, and wait for it (:func:`wait_saved`)."""
        write_json(self.path / SAVING_META, meta)

    def discard(self) -> None:
        """Remove the draft; nothing is listed. After a commit or discard, nothing."""
        self._folder.discard()


def copy(owner: str, name: str, new_name: str, message: str = "") -> dict[str, Any]:
    """Keep snapshot ``name`` also as ``new_name``, sharing every block: its CRIU
    images cloned, its files a btrfs snapshot, its checksums taken over (they are
    the same bytes). The new one's meta.

    Raises:
        SnapshotNotFound, SnapshotCorrupt: ``name`` is missing or damaged.
        ConfigError: ``new_name`` is invalid or taken.
        QuotaExceeded: the owner keeps as many snapshots as they may.
    """
    from .bases import clone  # here: bases.py imports this module
    from .volume import snapshot_subvolume

    meta = verify(owner, name)
    check_quota(owner, new_name)
    source = snapshot_dir(owner, name)
    manifest: dict[str, dict[str, Any]] = read_json(source / "manifest.json")
    draft = Draft(owner, new_name)
    try:
        draft.criu_dir.mkdir()
        for rel in sorted(manifest):
            target = draft.criu_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            clone(source / "criu" / rel, target)
        if (source / "files").exists():
            snapshot_subvolume(source / "files", draft.files, readonly=True)
        copied = {**meta, "message": message, "copied_from": name, "created": time.time()}
        return draft.commit(copied, {k: {"sha256": v["sha256"]} for k, v in manifest.items()})
    except BaseException:
        draft.discard()
        raise


def verify(owner: str, name: str) -> dict[str, Any]:
    """Check a snapshot before it is restored; return its meta.

    Raises:
        SnapshotNotFound: there is no such snapshot.
        SnapshotCorrupt: a CRIU image or a file layer is missing or changed.
    """
    return check_folder(snapshot_dir(owner, name), load(owner, name))


def check_folder(folder: Path, meta: dict[str, Any], read: bool = True) -> dict[str, Any]:
    """Check the snapshot (or base) in ``folder``, whose meta is ``meta``; return the meta.

    Without ``read``, an image not written since its checksum was taken is not read
    here: btrfs still checks each block as CRIU reads it, and fails the restore
    on a bad one.

    Raises:
        SnapshotCorrupt: a CRIU image or the file layer is missing or changed.
    """
    name = str(meta.get("name", folder.name))
    try:
        manifest: dict[str, dict[str, Any]] = read_json(folder / "manifest.json")
    except (OSError, ValueError) as err:
        raise SnapshotCorrupt(name, f"its manifest is unreadable: {err}") from None
    files = [(rel, folder / "criu" / rel, want) for rel, want in manifest.items()]
    for rel, file, want in files:
        if not file.is_file():
            raise SnapshotCorrupt(name, f"{rel} is missing")
        if file.stat().st_size != want["size"]:
            raise SnapshotCorrupt(name, f"{rel} does not match its checksum")

    # (path, file, sha256 to compare or None to read, offset): an image not written
    # since its sha256 was taken is read (in chunks, side by side), which makes btrfs
    # check every block against its own checksum (EIO on a bad one) and warms the
    # page cache for CRIU; another is hashed whole.
    tasks: list[tuple[str, Path, str | None, int]] = []
    for rel, file, want in files:
        st = file.stat()
        if want.get("stamp") != [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]:
            tasks.append((rel, file, want["sha256"], 0))
        elif read:
            tasks += [(rel, file, None, at) for at in range(0, st.st_size, _READ_CHUNK)]

    def check(task: tuple[str, Path, str | None, int]) -> str | None:
        rel, file, digest, at = task
        try:
            if digest is None:
                _read_range(file, at, _READ_CHUNK)
                return None
            return None if _sha256(file) == digest else f"{rel} does not match its checksum"
        except OSError as err:
            return f"{rel} cannot be read ({err.strerror})"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        problems = [p for p in pool.map(check, tasks) if p]
    if problems:
        raise SnapshotCorrupt(name, problems[0])
    if meta["mode"] == "live" and not manifest:
        raise SnapshotCorrupt(name, "its memory images are missing")
    if not is_subvolume(folder / "files"):
        raise SnapshotCorrupt(name, "its files are missing")
    return meta


def delete(owner: str, name: str) -> None:
    """Delete a snapshot; its layers go at the next ``gc`` if nothing else uses them.

    Raises:
        SnapshotNotFound: there is no such snapshot.
    """
    folder = snapshot_dir(owner, name)
    wait_saved(owner, name)
    if not (folder / "meta.json").exists():
        raise SnapshotNotFound(name, names(owner))
    with _no_readers(folder):
        doomed = folder.with_name(f".deleting.{name}.{time.monotonic_ns()}")
        os.rename(folder, doomed)  # unlisted at once, even if the removal is cut short
        fsync_dir(folder.parent)
    purge(doomed)


@contextlib.contextmanager
def reading(owner: str, name: str) -> Iterator[None]:
    """Keep snapshot ``name`` from being deleted while the block reads it.

    Any number of readers hold it at once (a class restoring one snapshot). A
    delete waits for them; a reader that comes while a delete holds it waits, then
    finds the snapshot gone. Blocks (briefly: a delete holds it for a rename);
    :func:`areading` is the same for async code.

    Raises:
        SnapshotNotFound: there is no such snapshot, or it was deleted meanwhile.
    """
    fd = _reader(owner, name)
    while fd is None:
        time.sleep(0.005)
        fd = _reader(owner, name)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def areading(owner: str, name: str) -> AsyncIterator[None]:
    """:func:`reading` for async code: it waits on the event loop, never in a thread
    that a cancellation would leave holding the lock."""
    fd = _reader(owner, name)
    while fd is None:
        await asyncio.sleep(0.005)
        fd = _reader(owner, name)
    try:
        yield
    finally:
        os.close(fd)


def _reader(owner: str, name: str) -> int | None:
    """The descriptor of a shared lock on snapshot ``name`` (see :func:`reading`),
    or None while a delete holds it.

    Raises:
        SnapshotNotFound: there is no such snapshot, or it was deleted meanwhile.
    """
    folder = snapshot_dir(owner, name)
    try:
        fd = os.open(folder / SERVING, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise SnapshotNotFound(name, names(owner)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        now = os.stat(folder / SERVING, follow_symlinks=False)
    except FileNotFoundError:
        now = None
    held = os.fstat(fd)
    if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        os.close(fd)
        raise SnapshotNotFound(name, names(owner))  # deleted while this waited
    return fd


@contextlib.contextmanager
def _no_readers(folder: Path, timeout: float = 60) -> Iterator[None]:
    """Hold a snapshot's folder with no reader (see :func:`reading`) for the block,
    waiting (bounded) for those there are.

    Raises:
        SandboxError: readers still hold it after ``timeout`` seconds.
    """
    try:
        fd = os.open(folder / SERVING, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:  # another delete was quicker
        raise SnapshotNotFound(folder.name, names(folder.parent.name)) from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SandboxError(
                        f"snapshot {folder.name!r} is still being restored; try again"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def purge(folder: Path) -> None:
    """Remove a snapshot folder, its files subvolume included."""
    delete_subvolume(folder / "files")
    shutil.rmtree(folder, ignore_errors=True)


def leftovers() -> list[Path]:
    """Hidden drafts and half-deleted snapshots that a crash left (not the drafts a
    live process is still writing: those hold their lock)."""
    found = []
    for path in sorted(store_dir().glob("*/.*")):
        try:
            if not lock_held(path / ".lock"):
                found.append(path)
        except FileNotFoundError:
            # Half-deleted, or a draft a moment old that has no lock file yet.
            if time.time() - path.stat().st_mtime > 60:
                found.append(path)
        except OSError:
            continue
    return found


def _sha256(file: Path) -> str:
    with open(file, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


#: How much of one image one thread reads when a snapshot is checked.
_READ_CHUNK = 64 << 20


def _read_range(file: Path, start: int, length: int) -> None:
    """Read ``length`` bytes of ``file`` from ``start`` (fewer at its end), for btrfs
    to check them."""
    buffer = bytearray(1 << 20)
    left = length
    with open(file, "rb", buffering=0) as handle:
        handle.seek(start)
        while left > 0:
            got = handle.readinto(memoryview(buffer)[: min(left, len(buffer))])
            if not got:
                return
            left -= got


def _sha256_and_fsync(file: Path) -> str:
    with open(file, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        os.fsync(handle.fileno())
    return digest
