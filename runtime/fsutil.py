"""Durable file writes (temp file, fsync, rename, fsync of the directory), draft
folders renamed into place whole, and locks."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
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


def give(path: Path, uid: int, gid: int, follow: bool = True) -> None:
    """Make ``uid``:``gid`` the owner of ``path`` (not of a symlink's target unless
    ``follow``). A runtime that is not root (the unit tests) cannot, and its files
    stay its own."""
    if os.geteuid() == 0:
        os.chown(path, uid, gid, follow_symlinks=follow)


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
    """:func:`flocked` for async code. The wait for the lock blocks a thread of its
    own, never one of the event loop's default pool: a snapshot holds a kernel's lock
    for seconds and needs that pool to finish, so waiters parked there could take
    every thread and the holder would wait for them forever (seen: six operations
    queued on locks froze a server of twenty kernels). A waiter that is cancelled
    leaves the lock to its thread, which drops it once it has it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    waiter = _LockWaiter(fd, asyncio.get_running_loop())
    try:
        await waiter.acquire()
    except BaseException:
        waiter.abandon()  # closes fd now, or has its thread close it
        raise
    try:
        yield fd
    finally:
        os.close(fd)  # releases the lock


class _LockWaiter:
    """Takes an ``flock`` in a thread of its own and reports to an event loop."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self._state = threading.Lock()
        self._abandoned = False
        self._finished = False  # the thread is past flock (taken or failed)

    async def acquire(self) -> None:
        threading.Thread(target=self._wait, name="flock waiter", daemon=True).start()
        await self.done

    def _wait(self) -> None:
        error: OSError | None = None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:
            error = err
        with self._state:
            self._finished = True
            if self._abandoned:
                os.close(self.fd)
                return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(self._settle, error)

    def _settle(self, error: OSError | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)

    def abandon(self) -> None:
        """The waiter gave up: close the descriptor if the thread is done with it,
        else let the thread close it when flock returns."""
        with self._state:
            self._abandoned = True
            finished = self._finished
        if finished:
            os.close(self.fd)


def lock_held(path: Path) -> bool:
    """Whether some holder has an ``flock`` on ``path`` right now; the probe keeps none.

    Unlike :func:`flocked`, a missing file is not made: the callers (gc looking for
    abandoned drafts, a delete waiting for a page server) probe locks that others
    make, and a missing one means something of its own to them.

    Raises:
        FileNotFoundError: there is no ``path``.
        OSError: it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock, if this probe took it
    return False


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class DraftFolder:
    """A folder built hidden beside its final place, then renamed into place whole.

    The draft is ``parent/.<name>.XXXXXXXX`` (mode 0700, from ``mkdtemp``): listings
    skip dot names, so a crash leaves nothing half-written in view, and gc finds
    the leftovers by that pattern (``snapshots.leftovers``). The caller fills
    :attr:`path` and fsyncs what it writes there; :meth:`commit` renames the draft
    to its target and fsyncs the parent. :meth:`discard` removes it with
    ``remove`` (default: the tree, errors ignored); a draft that holds a btrfs
    subvolume needs one that deletes the subvolume first (``snapshots.purge``).

    With ``lock``, an ``flock`` on ``<draft>/.lock`` is held from creation to commit
    or discard, across calls: gc leaves a locked draft alone, and the lock goes
    with this process if it dies. The lock file is removed on commit.

    As a context manager, a draft not committed when the block ends is discarded.
    Used by ``snapshots.Draft`` and ``bases.make_base``.

    Raises:
        OSError: ``parent`` is missing or not writable (from the constructor).
    """

    def __init__(
        self,
        parent: Path,
        name: str,
        *,
        lock: bool = False,
        remove: Callable[[Path], None] = _remove_tree,
    ) -> None:
        self.path = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
        self._remove = remove
        self._lock = lock
        self._held = contextlib.ExitStack()
        self._done = self._committed = False
        if lock:
            try:
                self._held.enter_context(flocked(self.path / ".lock"))
            except BaseException:
                _remove_tree(self.path)
                raise

    @property
    def committed(self) -> bool:
        """Whether the draft has been renamed into place."""
        return self._committed

    def commit(self, target: Path) -> None:
        """Rename the draft to ``target`` and fsync ``target``'s parent.

        Raises:
            OSError: the rename failed (``target`` exists and is not an empty folder,
                or is on another filesystem); the draft is left for the caller to
                discard.
        """
        os.rename(self.path, target)
        self._done = self._committed = True
        try:
            fsync_dir(target.parent)
            if self._lock:
                (target / ".lock").unlink(missing_ok=True)
        finally:
            self._held.close()  # releases the lock

    def discard(self) -> None:
        """Remove the draft and release its lock; after a commit or discard, nothing."""
        if self._done:
            return
        self._done = True
        try:
            self._remove(self.path)
        finally:
            self._held.close()  # releases the lock

    def __enter__(self) -> DraftFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()
