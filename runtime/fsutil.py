"""Durable file writes (temp file, fsync, rename, fsync of the directory) and locks."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half.

    The file is the runtime's own (mode 0600 unless ``mode`` says otherwise): records
    and metas name other tenants' folders, users and addresses. The temp file is made
    in the same directory, fsynced, renamed over ``path``,
    then the directory is fsynced. On any error the temp file is removed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    """:func:`atomic_write` of ``data`` as indented JSON."""
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path) -> Any:
    """Parse a JSON file written by :func:`write_json`."""
    return json.loads(path.read_text())


@contextlib.contextmanager
def flocked(path: Path, *, blocking: bool = True) -> Iterator[int | None]:
    """Hold an exclusive ``flock`` on ``path`` (made 0600 if missing) for the block.

    Yields the descriptor, or None when ``blocking`` is False and another holder has
    it. The lock goes with its descriptor, so a holder that dies releases it; that
    is why every cross-process lock of the runtime is one of these.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # releases the lock


@contextlib.asynccontextmanager
async def aflocked(path: Path) -> AsyncIterator[int]:
    """:func:`flocked` for async code: the wait for the lock runs off the event loop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock
