"""Snapshots saved after the kernel runs again: staging in memory, saving in the background.

A big kernel's CRIU dump written straight to the snapshot volume keeps the kernel
frozen at the volume's pace (1 GB: about 1 s here), and checksumming and syncing
the images after keep the cell waiting longer still. So, where the machine can
spare the memory, CRIU dumps into a *staging* folder on a tmpfs (``/dev/shm``,
root's alone, 0700), the kernel is thawed, and the cell returns. A worker thread
then copies the images into the snapshot's hidden draft on the volume (sharing the
parent's unchanged pages by reflink, hashing each byte as it passes), fsyncs them
and renames the draft into place: the same atomic commit as before.

Until then the snapshot is *saving*: listed with ``saving``, counted against its
owner's quota, and waited for by anything that reads it (a restore, a delete, a
base made from it). A crash while saving leaves a hidden draft and a staging
folder, both unlocked, which ``gc`` removes; nothing half-written is listed. A
save that fails (the volume full, say) lists nothing and is remembered, so the
kernel's next listing says so.

One worker per process saves in submission order, so a child is saved after its
parent (it shares the parent's pages). It is not a daemon thread: a process that
exits normally (the CLI, a Jupyter server stopped with Ctrl-C) first finishes the
saves it started.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_kernel.display import format_size

from .fsutil import flocked, lock_held

log = logging.getLogger(__name__)

#: Prefix of staging folders under :func:`staging_root`.
STAGING_PREFIX = "sandbox-kernel-staging."
#: Memory always left free for everything else: the larger of this and a tenth of RAM.
RESERVE_BYTES = 1 << 30
#: Failed saves remembered per owner, for the kernel's next listing.
FAILURES_KEPT = 20


def staging_root() -> Path:
    """Where staging folders go: ``$SANDBOX_KERNEL_STAGING`` (a tmpfs), default
    ``/dev/shm``."""
    return Path(os.environ.get("SANDBOX_KERNEL_STAGING", "/dev/shm"))


def _is_tmpfs(folder: Path) -> bool:
    best, kind = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (str(folder) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind == "tmpfs"


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    found = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            found[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return found


def spare_bytes() -> int:
    """Memory a staging folder may take now: what the machine has available, less
    the reserve and what staged dumps not yet saved hold, and no more than the
    tmpfs has free."""
    info = meminfo()
    reserve = max(RESERVE_BYTES, info.get("MemTotal", 0) // 10)
    root = staging_root()
    try:
        st = os.statvfs(root)
    except OSError:
        return 0
    room = st.f_bavail * st.f_frsize
    return max(0, min(info.get("MemAvailable", 0) - reserve, room) - staged_bytes())


class Staging:
    """A root-only folder on a tmpfs for one dump; locked while in use.

    ``images`` is where CRIU writes. :meth:`remove` frees the memory.
    """

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.path = Path(tempfile.mkdtemp(dir=staging_root(), prefix=STAGING_PREFIX))
        self.images = self.path / "criu"
        self._lock = flocked(self.path / ".lock")
        try:
            self._lock.__enter__()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        with _state:
            _staged[self.path] = expected

    def remove(self) -> None:
        """Delete the folder and its images; release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.__exit__(None, None, None)
        with _state:
            _staged.pop(self.path, None)


def stage(expected: int) -> tuple[Staging | None, str]:
    """A staging folder for a dump of about ``expected`` bytes, or None and why not
    (no tmpfs, or not enough memory to spare: the dump then goes to the volume)."""
    if os.environ.get("SANDBOX_KERNEL_STAGING") == "off":
        return None, "staging is off (SANDBOX_KERNEL_STAGING=off)"
    root = staging_root()
    if not _is_tmpfs(root):
        return None, f"{root} is not a tmpfs"
    spare = spare_bytes()
    if expected > spare:
        return None, (
            f"the kernel holds {format_size(expected)}, more than the "
            f"{format_size(spare)} of memory the machine can spare"
        )
    try:
        return Staging(expected), ""
    except OSError as err:
        return None, f"{root}: {err.strerror}"


def leftover_stagings() -> list[Path]:
    """Staging folders a crashed process left (unlocked, root's)."""
    found = []
    for path in sorted(staging_root().glob(f"{STAGING_PREFIX}*")):
        try:
            st = path.lstat()
            if st.st_uid != 0 or not path.is_dir() or path.is_symlink():
                continue
            if not lock_held(path / ".lock"):
                found.append(path)
        except FileNotFoundError:
            try:
                if time.time() - path.lstat().st_mtime > 60:
                    found.append(path)
            except OSError:
                continue
        except OSError:
            continue
    return found


# ---- the saves under way --------------------------------------------------------------


@dataclass(eq=False)
class Saving:
    """A snapshot whose images are being saved: its ``meta`` (as listed meanwhile),
    and, once ``done`` is set, the final meta or the ``error``."""

    owner: str
    name: str
    meta: dict[str, Any]
    job: Callable[[], dict[str, Any]]
    on_end: Callable[[Saving], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    result: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until saved; the final meta.

        Raises:
            TimeoutError: still saving after ``timeout`` seconds.
            The save's own error, if it failed.
        """
        if not self.done.wait(timeout):
            raise TimeoutError(f"snapshot {self.name!r} is still being saved")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


_state = threading.Lock()
_saving: dict[tuple[str, str], Saving] = {}
_queue: collections.deque[Saving] = collections.deque()
_worker: threading.Thread | None = None
_failed: dict[str, collections.deque[dict[str, Any]]] = {}
_staged: dict[Path, int] = {}


def staged_bytes() -> int:
    """What the staging folders of this process hold (as expected at their dump)."""
    with _state:
        return sum(_staged.values())


def submit(saving: Saving) -> Saving:
    """Queue a save; it is listed as saving at once."""
    global _worker
    with _state:
        _saving[(saving.owner, saving.name)] = saving
        _queue.append(saving)
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, name="sandbox-kernel-saver")
            _worker.start()
    return saving


def _work() -> None:
    global _worker
    while True:
        with _state:
            if not _queue:
                _worker = None
                return
            saving = _queue.popleft()
        try:
            saving.result = saving.job()
        except BaseException as err:  # kept for whoever waits
            saving.error = err
            log.warning("snapshot %s of owner %s was not saved: %s", saving.name, saving.owner, err)
            with _state:
                kept = _failed.setdefault(saving.owner, collections.deque(maxlen=FAILURES_KEPT))
                kept.append({
                    "name": saving.name, "error": str(err), "time": time.time(),
                    "kernel_id": saving.meta.get("kernel_id"),
                })  # fmt: skip
        finally:
            with _state:
                _saving.pop((saving.owner, saving.name), None)
            if saving.on_end is not None:
                try:
                    saving.on_end(saving)
                except Exception:  # a report must not stop the worker
                    log.exception("reporting the save of %s failed", saving.name)
            saving.done.set()  # after the report: who waits sees its effects


def find(owner: str, name: str) -> Saving | None:
    """The save under way of ``owner``'s snapshot ``name``, if any."""
    with _state:
        return _saving.get((owner, name))


def saving(owner: str) -> list[Saving]:
    """``owner``'s saves under way, in the order they were taken."""
    with _state:
        return [s for (o, _), s in _saving.items() if o == owner]


def wait(owner: str, name: str, timeout: float | None = None) -> None:
    """Wait for a save of ``owner``'s ``name`` under way, if any (not its outcome:
    a failed save simply leaves no snapshot)."""
    found = find(owner, name)
    if found is not None and not found.done.wait(timeout):
        raise TimeoutError(f"snapshot {name!r} is still being saved")


def wait_all(timeout: float | None = None) -> bool:
    """Wait for every save under way; whether they all ended in time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _state:
            left = list(_saving.values())
        if not left:
            return True
        for item in left:
            rest = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not item.done.wait(rest):
                return False


def failures(owner: str, since: float = 0.0) -> list[dict[str, Any]]:
    """``owner``'s saves that failed after ``since`` (a time), oldest first:
    ``{"name", "error", "time"}``."""
    with _state:
        return [f for f in _failed.get(owner, ()) if f["time"] > since]
