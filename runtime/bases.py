"""Base snapshots: a live snapshot that every new kernel of a kernelspec starts from.

``sandbox-kernel install NAME --base SNAPSHOT`` copies the snapshot into
``bases/<id>/`` on the volume (the CRIU images as reflinks, the files as a btrfs
snapshot: no data is copied) and names ``<id>`` in the kernelspec. The id is
derived from the snapshot's checksums, so the base never changes under a
kernelspec, and deleting or replacing the snapshot later does not touch it.

A new kernel of that kernelspec gets a writable copy of the base's files and is
started by restoring the base's memory instead of starting Python: imports and
data the base holds are there at once. Its own identity comes after: the restored
process takes the new kernel's connection key and control credentials from
``/run/sandbox`` (see ``magics/handoff.py``) before the provisioner lets any
client in.

The process must find the mounts it was dumped with, so a base fits kernels with
the same image, Python environment, user and in-container paths. The working
folder is the exception: a kernel started in another folder sees that folder at
the base's path. Where a base does not fit, or its restore fails, the kernel starts
cold and its log says why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError

from . import snapshots
from .criu_images import Owners, rewrite_image
from .fsutil import DraftFolder, fsync_dir, read_json, write_json
from .ioctl import FICLONE
from .volume import delete_subvolume, ensure_volume, snapshot_subvolume

_ID_RE = re.compile(r"[0-9a-f]{16}")  # whole ids: fullmatch


def bases_dir() -> Path:
    """Where bases are kept, on the mounted volume."""
    return ensure_volume() / "bases"


def base_dir(base_id: str) -> Path:
    """The folder of base ``base_id``.

    Raises:
        ConfigError: ``base_id`` is not a base id.
    """
    if not isinstance(base_id, str) or not _ID_RE.fullmatch(base_id):
        raise ConfigError(
            "base", base_id,
            "is not a base id; install the kernelspec again with --base SNAPSHOT",
        )  # fmt: skip
    return bases_dir() / base_id


def find_owner(name: str, owner: str | None = None) -> str:
    """The owner of snapshot ``name``: ``owner`` if given, else the only one that has it.

    Raises:
        SnapshotNotFound: nobody has it.
        ConfigError: several owners have one of that name.
    """
    if owner is not None:
        snapshots.load(owner, name)
        return owner
    have = [o for o in snapshots.owners() if name in snapshots.names(o)]
    if not have:
        raise snapshots.SnapshotNotFound(name, [])
    if len(have) > 1:
        owners = ", ".join(have)
        raise ConfigError(
            "--base", name, f"names snapshots of several owners ({owners}); add --base-owner"
        )
    return have[0]


def make_base(owner: str, name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy live snapshot ``name`` of ``owner`` into the bases; return the base's meta
    (with its ``id``, and ``extra``). The same snapshot twice gives the same base.

    Raises:
        SnapshotNotFound, SnapshotCorrupt: the snapshot is missing or damaged.
        ConfigError: it holds files only, so there is no memory to start from.
    """
    meta = snapshots.verify(owner, name)
    if meta["mode"] != "live":
        raise ConfigError(
            "--base", name,
            "holds files only; a base needs a live snapshot (files and memory)",
        )  # fmt: skip
    source = snapshots.snapshot_dir(owner, name)
    manifest = (source / "manifest.json").read_bytes()
    base_id = hashlib.sha256(manifest + owner.encode() + name.encode()).hexdigest()[:16]
    target = base_dir(base_id)
    if (target / "meta.json").exists():
        return load(base_id)
    target.parent.mkdir(exist_ok=True)
    # The files are a btrfs subvolume: purge deletes it with the draft.
    with DraftFolder(target.parent, base_id, remove=snapshots.purge) as draft:
        criu = draft.path / "criu"
        criu.mkdir()
        for file in sorted((source / "criu").iterdir()):
            clone(file, criu / file.name)
        fsync_dir(criu)
        snapshot_subvolume(source / "files", draft.path / "files", readonly=True)
        # The copies are new inodes: give the manifest their stamps (see verify).
        entries: dict[str, dict[str, Any]] = json.loads(manifest)
        for rel, entry in entries.items():
            st = (criu / rel).stat()
            entry["stamp"] = [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
        write_json(draft.path / "manifest.json", entries)
        meta = {**meta, **(extra or {}), "id": base_id, "snapshot": name, "snapshot_owner": owner}
        write_json(draft.path / "meta.json", meta)
        draft.commit(target)
    return meta


def for_user(base_id: str, uid: int, gid: int) -> dict[str, Any]:
    """Base ``base_id`` as a kernel of ``uid``:``gid`` can restore it: the base itself
    if its process ran as them, else that user's copy, made once and kept as a base
    of its own (``derived_from``). The copy's CRIU images have the base's user
    replaced by this one (see ``criu_images.py``), and its files are given to them.

    Only a class's base is shared so (see ``lifecycle.fitting_base``): its teacher
    published it for every user of the class.

    Raises:
        ConfigError: no such base.
        SnapshotCorrupt: it is damaged.
        ImageError: an image is not what the rewrite expects.
    """
    meta = load(base_id)
    if meta["uid"] == uid and meta["gid"] == gid:
        return meta
    origin = meta.get("derived_from") or base_id
    if origin != base_id:
        return for_user(origin, uid, gid)
    key = f"{base_id}:{uid}:{gid}".encode()
    copy_id = hashlib.sha256(key).hexdigest()[:16]
    target = base_dir(copy_id)
    if (target / "meta.json").exists():
        return load(copy_id)
    verify(base_id)
    source = base_dir(base_id)
    owners = Owners((int(meta["uid"]), uid), (int(meta["gid"]), gid))
    with DraftFolder(target.parent, copy_id, remove=snapshots.purge) as draft:
        criu = draft.path / "criu"
        criu.mkdir()
        entries: dict[str, dict[str, Any]] = read_json(source / "manifest.json")
        for rel in sorted(entries):
            copy = criu / rel
            clone(source / "criu" / rel, copy)
            if rewrite_image(copy, owners):
                with open(copy, "rb") as handle:
                    entries[rel]["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
                    os.fsync(handle.fileno())
            st = copy.stat()
            entries[rel] = {**entries[rel], "size": st.st_size,
                            "stamp": [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]}  # fmt: skip
        fsync_dir(criu)
        writable = draft.path / "files.rw"
        snapshot_subvolume(source / "files", writable, readonly=False)
        _give_tree(writable, owners)
        snapshot_subvolume(writable, draft.path / "files", readonly=True)
        delete_subvolume(writable)
        write_json(draft.path / "manifest.json", entries)
        meta = {**meta, "id": copy_id, "uid": uid, "gid": gid, "derived_from": base_id}
        write_json(draft.path / "meta.json", meta)
        try:
            draft.commit(target)
        except OSError:
            if not (target / "meta.json").exists():
                raise
            return load(copy_id)  # made by another start meanwhile
    return meta


def _give_tree(folder: Path, owners: Owners) -> None:
    """Give what the base's user owns under ``folder`` to the new user (symlinks
    themselves, never followed)."""
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files, ""]:
            path = os.path.join(root, name) if name else root
            st = os.lstat(path)
            uid, gid = owners.swap_uid(st.st_uid), owners.swap_gid(st.st_gid)
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.lchown(path, uid, gid)


def load(base_id: str) -> dict[str, Any]:
    """The meta of base ``base_id``.

    Raises:
        ConfigError: there is no such base (the kernelspec names one that is gone).
    """
    try:
        meta: dict[str, Any] = read_json(base_dir(base_id) / "meta.json")
    except FileNotFoundError:
        raise ConfigError(
            "base", base_id,
            "does not exist on this machine; install the kernelspec again with --base SNAPSHOT",
        ) from None  # fmt: skip
    return meta


def verify(base_id: str) -> dict[str, Any]:
    """Check base ``base_id`` before a kernel starts from it; return its meta.

    Every start checks it, so unchanged images are not read again (see
    ``snapshots.check_folder``); a changed one is hashed.

    Raises:
        ConfigError: no such base.
        SnapshotCorrupt: it is damaged.
    """
    return snapshots.check_folder(base_dir(base_id), load(base_id), read=False)


def listing(copies: bool = False, pristine: bool = False) -> list[dict[str, Any]]:
    """Every base's meta; with ``copies``, users' copies of class bases too, and with
    ``pristine``, the pristine bases kernels start from unseen (``pristine.py``)."""
    folder = bases_dir()
    if not folder.is_dir():
        return []
    found = [p for p in sorted(folder.iterdir()) if _ID_RE.fullmatch(p.name)]
    metas = [read_json(p / "meta.json") for p in found if (p / "meta.json").exists()]
    return [
        m for m in metas
        if (copies or not m.get("derived_from")) and (pristine or not m.get("pristine"))
    ]  # fmt: skip


def delete(base_id: str) -> None:
    """Delete base ``base_id``; kernelspecs naming it then start kernels cold.

    Raises:
        ConfigError: no such base.
    """
    load(base_id)
    folder = base_dir(base_id)
    doomed = folder.with_name(f".deleting.{base_id}")
    os.rename(folder, doomed)
    delete_subvolume(doomed / "files")
    shutil.rmtree(doomed, ignore_errors=True)


def clone(source: Path, target: Path, sync: bool = True) -> None:
    """Copy ``source`` to ``target`` sharing its blocks (a reflink), keeping its owner;
    with ``sync``, durably."""
    st = source.stat()
    with open(source, "rb") as src, open(target, "wb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        os.fchown(dst.fileno(), st.st_uid, st.st_gid)
        os.fchmod(dst.fileno(), st.st_mode & 0o7777)
        if sync:
            os.fsync(dst.fileno())
