"""The cluster's shared snapshot store: a folder every node sees (NFS at a site).

A kernel that runs as a Slurm job publishes what its node keeps of it: each
snapshot it takes and, at most every :data:`CHECKPOINT_EVERY` seconds, its latest
automatic checkpoint. Each goes in the portable form (``portable.py``), against the
nearest ancestor published before it, as two files:

- ``NAME.sks``: the stream;
- ``NAME.json``: its index entry, ``{"name", "kernel_id", "since", "created",
  "checkpoint", "node"}``.

The owner's node-run writes them, as the owner, in the owner's folder (by
default below their home, which the nodes share). Another node's daemon reads
them as the kernel's owner, never as root (:func:`fetch`): a ``%container
restore NAME`` of a snapshot this node lacks, a kernel that comes back here after
its node died. Whatever the files hold is read as hostile, as any import is.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError

from . import portable, snapshots
from .callers import Caller, as_caller
from .snapshots import SnapshotNotFound

#: The shortest time between two published checkpoints of one kernel, in seconds.
CHECKPOINT_EVERY = 10.0
#: The largest index entry read, in bytes.
INDEX_MAX = 64 << 10
STREAM = ".sks"
INDEX = ".json"


def default_store() -> Path:
    """The caller's shared store: ``$SANDBOX_KERNEL_STORE``, else below their home
    (which the nodes of a site share)."""
    found = os.environ.get("SANDBOX_KERNEL_STORE")
    return Path(found) if found else Path.home() / ".local/share/sandbox-kernel/store"


def check_store(path: object) -> str:
    """A shared store's path as a kernel's configuration names it: absolute text."""
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise ConfigError("shared store", path, "must be an absolute path to a folder")
    return path


def _open_below(folder: str, name: str, flags: int) -> int:
    """Open ``name`` in ``folder`` without following a symlink at either step."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    finally:
        os.close(dfd)


def read_entry(folder: str, name: str) -> dict[str, Any] | None:
    """The index entry of ``name`` in the store, or None. Blocks; call as the owner."""
    snapshots.check_name(name)
    try:
        fd = _open_below(folder, name + INDEX, os.O_RDONLY)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = handle.read(INDEX_MAX + 1)
    try:
        entry = json.loads(data) if len(data) <= INDEX_MAX else None
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("name") != name:
        return None
    return entry


def entries(folder: Path) -> list[dict[str, Any]]:
    """Every index entry in ``folder`` (the caller's own store), oldest first."""
    found = []
    try:
        names = sorted(p.name[: -len(INDEX)] for p in folder.glob("*" + INDEX))
    except OSError:
        return []
    for name in names:
        try:
            entry = read_entry(str(folder), name)
        except ConfigError:
            continue
        if entry is not None:
            found.append(entry)
    return sorted(found, key=lambda e: float(e.get("created") or 0.0))


def local_name(name: str) -> str:
    """The name a published snapshot gets in a node's store: its own, but for a
    checkpoint, which is carried under a ``moved-`` name (kept with the kernel)."""
    if snapshots.is_checkpoint(name):
        return (snapshots.MOVED_PREFIX + name[len(snapshots.CHECKPOINT_PREFIX) :])[:64]
    return name


def fetch(
    caller: Caller, owner_uid: int, owner_gid: int, folder: str, name: str,
    say: Callable[[str], None] = lambda _: None,
) -> list[str]:  # fmt: skip
    """Import published snapshot ``name`` from the shared store ``folder`` into the
    owner's store, with the ancestors it was published against first; the files
    are read as ``caller``. Those the store has already are not read again.
    Returns the local names imported (the last is ``name``'s); blocks.

    Raises:
        SnapshotNotFound: the shared store does not have it.
        ImportRefused, ConfigError, QuotaExceeded: as an import.
    """
    owner = str(owner_uid)
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    wanted: str | None = name
    with as_caller(caller):
        while wanted is not None and wanted not in seen:
            seen.add(wanted)
            if chain and local_name(wanted) in snapshots.names(owner):
                break  # the store has this ancestor already
            entry = read_entry(folder, wanted)
            if entry is None:
                raise SnapshotNotFound(wanted, snapshots.names(owner))
            chain.append(entry)
            since = entry.get("since")
            wanted = str(since) if since else None
    imported = []
    for entry in reversed(chain):
        target = local_name(str(entry["name"]))
        if target in snapshots.names(owner):
            imported.append(target)
            continue
        since = entry.get("since")
        with as_caller(caller):
            fd = _open_below(folder, str(entry["name"]) + STREAM, os.O_RDONLY)
        with os.fdopen(fd, "rb", buffering=1 << 20) as source:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError("shared snapshot", entry["name"], "is not a regular file")
            os.set_blocking(fd, True)
            say(f"fetching {entry['name']} from the shared store")
            parent = local_name(str(since)) if since else None
            portable.import_(owner_uid, owner_gid, source, target, None, say, parent)
        imported.append(target)
    return imported


def forget_published(folder: Path, kernel_id: str) -> None:
    """Delete the checkpoints and moves kernel ``kernel_id`` published (at its
    shutdown: nothing restores them now); the snapshots it took stay, the user's."""
    for entry in entries(folder):
        if entry.get("kernel_id") != kernel_id or not entry.get("checkpoint"):
            continue
        for suffix in (STREAM, INDEX):
            (folder / (str(entry["name"]) + suffix)).unlink(missing_ok=True)
