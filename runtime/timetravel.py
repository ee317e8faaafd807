"""Time travel: automatic checkpoints, undo, and a crash as an error.

- **Checkpoints.** With autosave on (a kernelspec's ``autosave``, or ``%container
  autosave on``), the kernel's magic asks for a checkpoint each time the kernel
  goes idle after a cell: its reply is sent and no request waits (see the
  magic's ``autosave.py``). A checkpoint is a live snapshot named
  ``ckpt-<kernel id>-<cell>-<tag>``, a child of the one before (pages and blocks
  shared), saved in the background like any. It counts against the owner's
  snapshot quota; the oldest go first, past the kernel's ``retain`` (20) or when
  the quota is full. They are not listed with the named snapshots: ``%container
  history`` shows them, and the kernel's record keeps their list
  (``extra["checkpoints"]``: name, cell, next cell number, first line, time).
- **Undo.** ``%container undo [N]`` restores, in place, the checkpoint taken
  before the last N cells ran; ``--to CELL`` the one before cell CELL. Where Run
  All left no checkpoint between two cells, the closest earlier one is taken, and
  the message says which cell it is before.
- **A crash as an error.** When a kernel with a checkpoint dies by the OOM killer
  or a signal such as SIGSEGV, the provisioner asks :meth:`TimeTravel.recover`:
  the latest checkpoint is restored in place, and the cell that was running (its
  request, written by the magic at each cell's start to ``/run/sandbox/cell.json``)
  ends with an error that says why, instead of a dead kernel.
- **Whose.** A kernel's checkpoints go with it: removed when it is removed, at a
  restart (its cells are numbered afresh), and by ``gc`` once the kernel is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import stat
import time
from typing import TYPE_CHECKING, Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, SandboxError

from . import exits, saving, snapshots
from .record import KernelRecord

if TYPE_CHECKING:
    from .service import KernelService

log = logging.getLogger(__name__)

#: The names of checkpoints: never listed with the named snapshots.
CHECKPOINT_PREFIX = snapshots.CHECKPOINT_PREFIX
#: Checkpoints a kernel keeps unless its kernelspec says otherwise.
RETAIN = 20
#: The file in the kernel's run folder naming the cell under way (written by the
#: magic); read by the runtime at most this big.
CELL_FILE = "cell.json"
CELL_FILE_MAX = 64 * 1024
#: The first line of a cell kept with its checkpoint, at most this long.
LINE_MAX = 120


#: In the kernel's run folder while autosave is on (root's, the kernel reads it):
#: the magic asks for checkpoints only then, without a request to learn it.
AUTOSAVE_FILE = "autosave"


def show_autosave(run_dir: Any, on: bool) -> None:
    """Make the kernel see whether autosave is on (see :data:`AUTOSAVE_FILE`)."""
    path = os.path.join(str(run_dir), AUTOSAVE_FILE)
    if on:
        with open(path, "w") as handle:
            handle.write("on\n")
        os.chmod(path, 0o644)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def checkpoints_of(record: KernelRecord) -> list[dict[str, Any]]:
    """The kernel's checkpoints, oldest first (as its record keeps them)."""
    found = record.extra.get("checkpoints")
    return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []


def autosave_on(record: KernelRecord) -> bool:
    return bool(record.extra.get("autosave"))


def read_cell(run_dir: Any, uid: int) -> dict[str, Any] | None:
    """The cell under way as the kernel wrote it (``cell.json`` in its run folder),
    or None. The kernel's own file, so hostile: opened without following a
    symlink, a regular file of the kernel's user, at most :data:`CELL_FILE_MAX`
    bytes, and only its ``header``, ``ident``, ``count`` and ``peers`` kept, checked."""
    path = os.path.join(str(run_dir), CELL_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_size > CELL_FILE_MAX:
            return None
        data = os.read(fd, CELL_FILE_MAX + 1)
    finally:
        os.close(fd)
    try:
        cell = json.loads(data)
    except ValueError:
        return None
    if not isinstance(cell, dict):
        return None
    header, ident, count = cell.get("header"), cell.get("ident"), cell.get("count")
    if not isinstance(header, dict) or not isinstance(header.get("msg_id"), str):
        return None
    if not isinstance(ident, list) or not all(isinstance(i, str) for i in ident):
        return None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        count = None
    found: dict[str, Any] = {"parent": {"header": header}, "ident": ident, "count": count}
    peers = cell.get("peers")
    if isinstance(peers, dict):
        found["peers"] = {
            k: v for k, v in peers.items()
            if k in ("shell", "iopub") and isinstance(v, int) and not isinstance(v, bool)
        }  # fmt: skip
    return found


class TimeTravel:
    """The checkpoints, undo and recovery of one kernel service's kernels."""

    def __init__(self, service: KernelService) -> None:
        self.service = service
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, kernel_id: str) -> asyncio.Lock:
        return self._locks.setdefault(kernel_id, asyncio.Lock())

    # ---- autosave -----------------------------------------------------------------

    async def set_autosave(self, kernel_id: str, state: str | None) -> dict[str, Any]:
        """Turn autosave ``on`` or ``off`` (None: leave it); its state and the
        kernel's checkpoints, for ``%container autosave``."""
        runtime = self.service.runtime
        if state not in (None, "", "on", "off", "status"):
            raise ConfigError("autosave", state, "is not on, off or status")
        if state in ("on", "off"):

            def turn(current: KernelRecord) -> None:
                current.extra["autosave"] = state == "on"
                current.extra.pop("autosave_off_because", None)

            await runtime.store.aupdate(kernel_id, turn)
            show_autosave(runtime.run_dir(kernel_id), state == "on")
        record = runtime.record(kernel_id)
        return {
            "autosave": autosave_on(record),
            "why_off": record.extra.get("autosave_off_because", ""),
            "checkpoints": len(checkpoints_of(record)),
            "retain": int(record.extra.get("retain") or RETAIN),
        }

    async def _turn_off(self, kernel_id: str, why: str) -> None:
        def off(current: KernelRecord) -> None:
            current.extra["autosave"] = False
            current.extra["autosave_off_because"] = why

        await self.service.runtime.store.aupdate(kernel_id, off)
        show_autosave(self.service.runtime.run_dir(kernel_id), False)
        self.service.runtime.append_log(kernel_id, f"autosave turned off: {why}")

    # ---- checkpoints --------------------------------------------------------------

    async def checkpoint(
        self, kernel_id: str, cell: int, next_count: int, line: str
    ) -> dict[str, Any]:
        """Checkpoint the idle kernel after cell ``cell`` (its next cell is numbered
        ``next_count``). ``{"autosave": False, "warning": ...}`` when autosave is
        off, or turned itself off now (the volume is full, say)."""
        runtime = self.service.runtime
        record = runtime.record(kernel_id)
        if not autosave_on(record):
            return {"autosave": False}
        owner = str(record.uid)
        mine = {c["name"] for c in checkpoints_of(record)}
        lost = [f for f in saving.failures(owner) if f.get("name") in mine]
        if lost:
            # One of its checkpoints could not be saved (the volume is full, say):
            # autosave stops, says why once, and the kernel runs on.
            await self._forget(kernel_id, {f["name"] for f in lost})
            why = f"a checkpoint could not be saved: {lost[-1]['error']}"
            await self._turn_off(kernel_id, why)
            return {"autosave": False, "warning": why}
        name = f"{CHECKPOINT_PREFIX}{record.kernel_id}-{cell}-{secrets.token_hex(2)}"
        retain = int(record.extra.get("retain") or RETAIN)
        async with self._lock(kernel_id):
            await self._prune(kernel_id, owner, retain - 1)
            await self._skip_lost_parent(kernel_id, owner)
            while True:
                try:
                    meta = await runtime.snapshot(
                        kernel_id, name, line[:LINE_MAX], True, None, False
                    )
                    break
                except snapshots.QuotaExceeded as err:
                    # The oldest checkpoint makes room; with none left, autosave stops.
                    if not await self._prune(kernel_id, owner, len(self._names(kernel_id)) - 1):
                        why = f"the snapshot quota is full ({err.problem})"
                        await self._turn_off(kernel_id, why)
                        return {"autosave": False, "warning": why}
                except SandboxError as err:
                    why = f"a checkpoint failed: {err}"
                    await self._turn_off(kernel_id, why)
                    return {"autosave": False, "warning": why}
            entry = {
                "name": name, "cell": cell, "next": next_count,
                "line": line[:LINE_MAX], "time": time.time(),
            }  # fmt: skip

            def add(current: KernelRecord) -> None:
                current.extra["checkpoints"] = [*checkpoints_of(current), entry]

            await runtime.store.aupdate(kernel_id, add)
        return {
            "autosave": True, "name": name, "paused_seconds": meta.get("paused_seconds"),
            "saving": bool(meta.get("saving")),
        }  # fmt: skip

    async def _skip_lost_parent(self, kernel_id: str, owner: str) -> None:
        """If the checkpoint the kernel descends from was lost (its runtime was
        killed while saving it), make that one's parent the kernel's: the next
        checkpoint then shares its pages, and undo's line of states goes on. Then
        note the parent of the checkpoint about to be taken."""
        record = self.service.runtime.record(kernel_id)
        lost = record.snapshot
        mended: dict[str, str | None] = {}
        if lost and lost.startswith(f"{CHECKPOINT_PREFIX}{record.kernel_id}-"):
            saved = set(await asyncio.to_thread(snapshots.names, owner, True))
            if lost not in saved:
                before = record.extra.get("checkpoint_parent")
                mended["snapshot"] = before if before in saved else None
                self.service.runtime.append_log(
                    kernel_id, f"checkpoint {lost} was lost (its save was cut short)"
                )
                await self._forget(kernel_id, {lost})

        def note(current: KernelRecord) -> None:
            if mended:
                current.snapshot = mended["snapshot"]
            current.extra["checkpoint_parent"] = current.snapshot

        await self.service.runtime.store.aupdate(kernel_id, note)

    def _names(self, kernel_id: str) -> list[str]:
        return [c["name"] for c in checkpoints_of(self.service.runtime.record(kernel_id))]

    async def _prune(self, kernel_id: str, owner: str, keep: int) -> bool:
        """Delete the kernel's oldest checkpoints until ``keep`` are left; whether any
        was deleted. Named snapshots are never touched."""
        runtime = self.service.runtime
        kept = checkpoints_of(runtime.record(kernel_id))
        drop = kept[: max(0, len(kept) - max(keep, 0))]
        for entry in drop:
            await asyncio.to_thread(_delete, owner, entry["name"])
        if drop:
            await self._forget(kernel_id, {e["name"] for e in drop})
        return bool(drop)

    async def _forget(self, kernel_id: str, names: set[str]) -> None:
        """Take checkpoints ``names`` off the kernel's list."""

        def forget(current: KernelRecord) -> None:
            current.extra["checkpoints"] = [
                c for c in checkpoints_of(current) if c.get("name") not in names
            ]

        await self.service.runtime.store.aupdate(kernel_id, forget)

    async def drop_all(self, record: KernelRecord) -> None:
        """Delete every checkpoint of the kernel (at its removal or restart)."""
        if not checkpoints_of(record):
            return
        owner = str(record.uid)
        for entry in checkpoints_of(record):
            await asyncio.to_thread(_delete, owner, entry["name"])
        with contextlib.suppress(SandboxError, OSError):

            def clear(current: KernelRecord) -> None:
                current.extra.pop("checkpoints", None)

            await self.service.runtime.store.aupdate(record.kernel_id, clear)

    # ---- what is kept -------------------------------------------------------------

    def history(self, kernel_id: str) -> dict[str, Any]:
        """The kernel's checkpoints, oldest first, each with its cell, first line,
        time and the bytes it added (its memory not shared with the one before, and
        its files); for ``%container history``. Blocks: read from the store."""
        record = self.service.runtime.record(kernel_id)
        owner = str(record.uid)
        rows = []
        for entry in checkpoints_of(record):
            try:
                meta = snapshots.load(owner, entry["name"], wait=False)
            except SandboxError:
                continue  # its save failed: not kept
            added = int(meta.get("memory_bytes", 0)) - int(meta.get("shared_bytes", 0))
            rows.append({
                **entry, "added_bytes": max(added, 0) + int(meta.get("layer_bytes", 0)),
                "saving": bool(meta.get("saving")),
            })  # fmt: skip
        return {"checkpoints": rows, "autosave": autosave_on(record)}

    def undo_target(
        self, kernel_id: str, n: int | None, to: int | None, next_count: int | None
    ) -> tuple[str, int]:
        """The checkpoint an undo goes back to, and the cell it is the state before:
        before the last ``n`` cells (the asking cell's next number is
        ``next_count``), or before cell ``to``.

        Raises:
            ConfigError: no checkpoint is that old, or the arguments do not fit.
        """
        record = self.service.runtime.record(kernel_id)
        if to is None:
            if next_count is None:
                raise ConfigError("undo", n, "needs the cell's number")
            steps = 1 if n is None else n
            if steps < 1:
                raise ConfigError("undo", steps, "must go back at least 1 cell")
            # The asking cell is next_count - 1; the last ``steps`` cells before it.
            to = next_count - 1 - steps
        owner = str(record.uid)
        saved = set(snapshots.names(owner, every=True))
        kept = [c for c in checkpoints_of(record) if c["name"] in saved]
        # Cell numbers never repeat, undone or not: the checkpoint taken just before
        # cell ``to`` is the one. Where there is none (Run All took none between two
        # cells), the closest earlier one of the kernel's own line of states: an
        # earlier undo left checkpoints of cells it undid, which are not its past.
        found = [c for c in kept if c["next"] == to]
        if not found:
            line = _lineage(owner, record.snapshot)
            found = [c for c in kept if c["next"] <= to and c["name"] in line]
        if not found:
            oldest = min((c["next"] for c in checkpoints_of(record)), default=None)
            hint = (
                f"the oldest kept is before cell {oldest}" if oldest is not None
                else "none is kept yet (is autosave on? `%container autosave`)"
            )  # fmt: skip
            raise ConfigError("undo", f"to before cell {to}", f"has no checkpoint; {hint}")
        best = found[-1]
        return str(best["name"]), int(best["next"])

    async def name_latest(
        self, kernel_id: str, name: str, message: str, next_count: int
    ) -> dict[str, Any] | None:
        """``%container snapshot NAME`` in a cell that runs nothing else, right after
        a checkpoint (its next cell is the asking one, ``next_count - 1``): the
        checkpoint's images and files, shared, under ``name``, instead of a new
        dump. Its meta, or None where the kernel may have changed since."""
        runtime = self.service.runtime
        record = runtime.record(kernel_id)
        kept = checkpoints_of(record)
        if not kept or kept[-1]["next"] != next_count - 1:
            return None
        latest = kept[-1]["name"]
        if record.snapshot != latest:
            return None  # restored or snapshotted since
        owner = str(record.uid)
        started = time.monotonic()
        async with runtime.store.exclusive(kernel_id):
            try:
                meta = await asyncio.to_thread(snapshots.copy, owner, latest, name, message)
            except snapshots.SnapshotNotFound:
                return None  # its save failed
            meta["seconds"] = round(time.monotonic() - started, 4)
            meta["paused_seconds"] = 0.0

            def parent(current: KernelRecord) -> None:
                current.snapshot = name

            await runtime.store.aupdate(kernel_id, parent)
        return meta

    # ---- a crash ------------------------------------------------------------------

    async def recover(self, kernel_id: str) -> dict[str, Any] | None:
        """After the kernel's process died by the OOM killer or a signal: restore its
        latest checkpoint in place, and have the cell that was running end with an
        error saying why. ``{"pid", "text"}``, or None where there is nothing to do
        (no checkpoint, autosave off, or the process ended otherwise)."""
        svc = self.service
        runtime = svc.runtime
        record = runtime.record(kernel_id)
        if not autosave_on(record) or not checkpoints_of(record):
            return None
        if await runtime.container_pid(kernel_id) is not None:
            return None  # it runs: nothing died
        oom = runtime.oom_killed(kernel_id)
        tail = ""
        with contextlib.suppress(OSError):
            tail = runtime.log_path(kernel_id).read_text(errors="replace")[-20000:]
        sig = exits.signal_in_log(tail)
        if not oom and not sig:
            return None
        ended = exits.describe(oom, sig, record.limits.memory)
        owner = str(record.uid)
        saved = set(snapshots.names(owner, every=True))
        usable = [c for c in checkpoints_of(record) if c["name"] in saved]
        if not usable:
            return None
        latest = usable[-1]
        cell = read_cell(runtime.run_dir(kernel_id), record.uid)
        limit = format_size(record.limits.memory) if record.limits.memory else "none"
        if oom:
            ename = "MemoryError"
            text = (
                f"this cell needed more than the kernel's memory limit ({limit}); the kernel is "
                f"back at its state before this cell. Raise the limit with %container limits "
                f"--memory ..."
            )
        else:
            assert sig is not None
            ename = sig.name
            text = (
                f"the kernel's process was killed by {sig.name} (a crash in native code, say); "
                "the kernel is back at its state before this cell"
            )
        pending: dict[str, Any] = {
            "kind": "crash", "name": latest["name"], "ename": ename, "evalue": text,
            "count": (cell or {}).get("count") or latest["next"],
        }  # fmt: skip
        if cell is not None:
            pending.update(parent=cell["parent"], ident=cell["ident"])
            if "peers" in cell:
                pending["peers"] = cell["peers"]
        channel = svc.channels.get(kernel_id)
        if channel is not None:
            channel.server.pending = pending
        if ended is not None:
            runtime.append_log(kernel_id, ended["text"])
        done = await svc.restore(kernel_id, latest["name"])
        # What follows is the restored process's: its end is not this one's.
        runtime.append_log(kernel_id, f"{exits.SPAWNED} (checkpoint {latest['name']} restored)")
        return {"pid": done["pid"], "text": f"{ename}: {text}"}


def _lineage(owner: str, name: str | None) -> set[str]:
    """Snapshot ``name`` and its parents, as far as they are kept. A snapshot that is
    a copy (``%container snapshot NAME`` naming a checkpoint) brings in the one it
    was copied from: the same state."""
    found: set[str] = set()
    while name and name not in found:
        found.add(name)
        try:
            meta = snapshots.load(owner, name, wait=False)
        except SandboxError:
            break
        copied = meta.get("copied_from")
        if isinstance(copied, str):
            found.add(copied)
        parent = meta.get("parent")
        name = parent if isinstance(parent, str) else None
    return found


def _delete(owner: str, name: str) -> None:
    try:
        snapshots.delete(owner, name)
    except SandboxError:
        pass  # gone already
    except OSError as err:
        if err.errno != errno.ENOENT:
            log.warning("checkpoint %s could not be deleted: %s", name, err)
