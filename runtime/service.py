"""The kernel service: every operation on kernels, with who may do what.

One :class:`KernelService` runs where the root work is done: inside the daemon
(``sandbox-kernel daemon``), serving every user of a shared machine, or inside a
root Jupyter server that runs its kernels itself (the in-process mode). Both
reach it the same way, :meth:`KernelService.call` with an operation's name and
plain JSON data, so the one path is tested in either mode.

Each call names its :class:`~.callers.Caller`. A caller sees and acts on their own
kernels, snapshots and bases only (another's look like none at all); root, or a
member of the config's admin group, sees everything. A non-root caller's kernel
runs as that caller, and the paths they name are opened as them (see
``callers.py``). Quotas (``quotas.py``) hold them to the config's limits.

The service also keeps each kernel's control server (the ``%container``
channel, :class:`ControlChannel`) for the kernel's whole life, and tells
subscribers of events: a kernel started, restored, stopped or removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import pwd
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, KernelNotFound, QuotaError, SandboxError

from . import bases, exits, portable, shared, snapshots
from .callers import Caller, as_caller
from .control import ControlServer, write_credentials
from .fsutil import write_json
from .lifecycle import KernelConfig
from .limits import Limits, parse_size
from .network import Addresses
from .pool import Pools, check_pool, pool_key
from .quotas import DaemonConfig, check_kernel, check_limits
from .record import KernelRecord, Start
from .runtime import Runtime
from .timetravel import TimeTravel, show_autosave

#: How long a kernel restored from a base has to confirm it took its new key.
BASE_CONFIRM_TIMEOUT = 10.0

Progress = Callable[[str], None]
Event = dict[str, Any]
#: An operation: (service, caller, args, progress) -> result.
Handler = Callable[["KernelService", Caller, dict[str, Any], Progress | None], Awaitable[Any]]


class Args(dict[str, Any]):
    """An operation's arguments: one that is missing is a clear error."""

    def __missing__(self, key: str) -> Any:
        raise ConfigError("argument", key, "is missing from the request")


@dataclass(frozen=True)
class Op:
    """One operation of the service.

    Attributes:
        handler: the method that carries it out.
        admin: only root or the admin group may call it.
    """

    handler: Handler
    admin: bool = False


OPS: dict[str, Op] = {}


def _op(name: str, admin: bool = False) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        OPS[name] = Op(handler, admin)
        return handler

    return register


class ControlChannel:
    """One kernel's control server and its credentials: made at the kernel's first
    prepare, listening from its first start, kept across restarts (the kernel keeps
    its address), closed when the kernel is removed."""

    def __init__(self, service: KernelService, record: KernelRecord, runtime: Any) -> None:
        host = Addresses.of(record.index).host_ip
        run_dir = service.runtime.run_dir(record.kernel_id)
        token = write_credentials(run_dir, host, record.kernel_id, record.uid, record.gid)
        # The service's restore and reset tell subscribers of the new process.
        self.server = ControlServer(
            runtime, record.kernel_id, host, record.kernel_ip, token, _told_already,
            log=service.log,
        )  # fmt: skip

    async def listen(self) -> None:
        """Start serving, if not yet (the veth exists once the container is up)."""
        if not self.server.listening:
            await self.server.start()

    async def heard_within(self, seconds: float) -> bool:
        """Whether the kernel made a good request within ``seconds``."""
        try:
            await asyncio.wait_for(self.server.heard.wait(), seconds)
        except TimeoutError:
            return False
        return True


async def _told_already(pid: int) -> None:
    """The control server's ``on_new_process``: nothing left to do (see above)."""


class _Governed:
    """The runtime as one kernel's control server sees it: a limit the kernel's
    magic asks for is held to its owner's quotas too, and its snapshots, restores
    and resets go the service's one way (logged, and told as events)."""

    def __init__(self, service: KernelService, kernel_id: str) -> None:
        self._service = service
        self._kernel_id = kernel_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service.runtime, name)

    async def update_limits(
        self, kernel_id: str, limits: Limits, /, operator: bool = False
    ) -> Limits:
        record = self._service.runtime.record(kernel_id)
        self._service.check_limits_quota(self._service.owner_of(record), record, limits)
        return await self._service.runtime.update_limits(kernel_id, limits, operator)

    async def snapshot(
        self, kernel_id: str, name: str, message: str = "", /, *, progress: Progress | None = None
    ) -> dict[str, Any]:
        return await self._service.snapshot(kernel_id, name, message, progress=progress)

    def snapshot_listing(self, kernel_id: str, /) -> dict[str, Any]:
        """The kernel's snapshots, and for a kernel of a cluster (``shared``) those
        its owner's kernels published on other nodes, which a restore fetches."""
        listing: dict[str, Any] = self._service.runtime.snapshot_listing(kernel_id)
        record = self._service.runtime.record(kernel_id)
        folder = record.extra.get("shared_store")
        if folder:
            here = {m["name"] for m in listing["snapshots"]}
            with as_caller(Caller.of_user(record.belongs_to, record.gid)):
                published = shared.entries(Path(str(folder)))
            listing["shared"] = [
                {"name": e["name"], "created": e.get("created"), "node": e.get("node")}
                for e in published
                if not e.get("checkpoint") and e["name"] not in here
            ]
        return listing

    async def restore(self, kernel_id: str, name: str, /) -> dict[str, Any]:
        return await self._service.restore(kernel_id, name)

    async def reset(self, kernel_id: str, /, pristine: bool = False) -> dict[str, Any]:
        return await self._service.reset(kernel_id, pristine)

    async def checkpoint(self, kernel_id: str, cell: int, next_count: int, line: str, /) -> Any:
        return await self._service.timetravel.checkpoint(kernel_id, cell, next_count, line)

    async def autosave(self, kernel_id: str, state: str | None, /) -> dict[str, Any]:
        return await self._service.timetravel.set_autosave(kernel_id, state)

    async def name_latest(
        self, kernel_id: str, name: str, message: str, next_count: int, /
    ) -> dict[str, Any] | None:
        meta = await self._service.timetravel.name_latest(kernel_id, name, message, next_count)
        if meta is not None:
            self._service.emit({"event": "snapshot", "kernel_id": kernel_id, "name": name})
        return meta

    def history(self, kernel_id: str, /) -> dict[str, Any]:
        return self._service.timetravel.history(kernel_id)

    def undo_target(
        self, kernel_id: str, n: int | None, to: int | None, next_count: int | None, /
    ) -> tuple[str, int]:
        return self._service.timetravel.undo_target(kernel_id, n, to, next_count)

    async def class_call(self, kernel_id: str, op: str, args: dict[str, Any], /) -> Any:
        """A class operation asked from the kernel's notebook, as the kernel's owner;
        a class published from a notebook gets the kernel's limits and network."""
        record = self._service.runtime.record(kernel_id)
        if op == "class_publish":
            args = {"limits": record.ceiling.to_dict(), "network": record.network, **args}
        return await self._service.call(self._service.owner_of(record), op, args)


class KernelService:
    """Carries out operations for callers. ``config`` holds the admin group and the
    quotas (the daemon's); the in-process mode has none."""

    def __init__(
        self,
        runtime: Runtime | None = None,
        config: DaemonConfig | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.runtime = runtime or Runtime()
        self.config = config or DaemonConfig()
        self.log = log or logging.getLogger("sandbox_kernel.service")
        self.channels: dict[str, ControlChannel] = {}
        # One making of each pristine base at a time (see pristine_make.py).
        self.pristine_locks: dict[str, asyncio.Lock] = {}
        #: In this process (a root Jupyter server's kernels): its user is the operator.
        self.in_process = config is None
        self._subscribers: list[Callable[[Event], None]] = []
        self._user_locks: dict[int, asyncio.Lock] = {}
        #: Kernels restored before anyone asked (see ``pool.py``).
        self.pools = Pools(self)
        #: Checkpoints, undo and recovery from a crash (see ``timetravel.py``).
        self.timetravel = TimeTravel(self)

    # ---- calls -----------------------------------------------------------------------

    async def call(
        self,
        caller: Caller,
        op: str,
        args: dict[str, Any],
        progress: Progress | None = None,
    ) -> Any:
        """Carry out ``op`` with ``args`` for ``caller``; its result (plain data).

        Raises:
            ConfigError: no such operation, bad arguments, or an admin operation
                asked by someone else.
            SandboxError: the operation failed; its message is for the caller.
        """
        found = OPS.get(op)
        if found is None:
            raise ConfigError("operation", op, f"is not known; use one of {', '.join(OPS)}")
        if found.admin and not self.config.is_admin(caller):
            raise ConfigError("operation", op, "is for root (or the admin group) only")
        if not isinstance(args, dict):
            raise ConfigError("arguments of", op, "must be an object")
        try:
            return await found.handler(self, caller, Args(args), progress)
        except TypeError as err:  # e.g. a limit the caller named that is none
            raise ConfigError("arguments of", op, f"do not fit it ({err})") from None

    # ---- who may see what ------------------------------------------------------------

    def owner_of(self, record: KernelRecord) -> Caller:
        """The user a kernel belongs to, as a caller (for their quotas)."""
        return Caller.of_user(record.belongs_to, record.gid)

    def sees(self, caller: Caller, record: KernelRecord) -> bool:
        return self.config.is_admin(caller) or record.belongs_to == caller.uid

    def kernel(self, caller: Caller, kernel_id: object) -> KernelRecord:
        """The record of ``caller``'s kernel ``kernel_id``: another user's kernel is
        not found, exactly as one that does not exist.

        Raises:
            KernelNotFound, ConfigError (a malformed id).
        """
        if not isinstance(kernel_id, str):
            raise ConfigError("kernel id", kernel_id, "is not a kernel id")
        record = self.runtime.record(kernel_id)
        if not self.sees(caller, record) or record.pooled:
            # A pool kernel is nobody's until a start claims it.
            raise KernelNotFound(kernel_id)
        return record

    def snapshot_owner(self, caller: Caller, owner: object = None) -> str:
        """Whose snapshots ``caller`` means: their own, or any for an admin."""
        if owner is None or owner == "":
            return str(caller.uid)
        text = str(owner)
        if not text.isdigit():
            raise ConfigError("owner", owner, "is not a uid; use a number, e.g. 1000")
        if int(text) != caller.uid and not self.config.is_admin(caller):
            raise ConfigError("owner", owner, "is another user; you can act on your own only")
        return str(int(text))

    # ---- quotas ----------------------------------------------------------------------

    def user_lock(self, uid: int) -> asyncio.Lock:
        """The lock under which one user's new kernels are counted against their quota."""
        return self._user_locks.setdefault(uid, asyncio.Lock())

    def running_limits(self, uid: int, but: str = "") -> list[Limits]:
        """The limits of every kernel ``uid`` has, but kernel ``but``."""
        return [
            r.limits for r in self.runtime.records() if r.belongs_to == uid and r.kernel_id != but
        ]

    def check_limits_quota(self, owner: Caller, record: KernelRecord, change: Limits) -> None:
        """Refuse a change of a kernel's limits past its owner's quotas."""
        quota = self.config.quota_for(owner)
        others = self.running_limits(owner.uid, but=record.kernel_id)
        check_limits(quota, record.limits.merged(change), others)

    def snapshot_quota(self, owner: str) -> tuple[int | None, int | None]:
        """The snapshot quotas of ``owner`` (a uid): ``snapshots.QUOTA_SOURCE``."""
        if not owner.isdigit():
            return None, None
        quota = self.config.quota_for(Caller.of_user(int(owner), int(owner)))
        return quota.snapshot_bytes, quota.snapshots

    def notice_for_next_start(self, record: KernelRecord) -> None:
        """Put the news of the last process's end (once) where the next one finds it:
        ``/run/sandbox/notice.json``; without news, remove an old notice. The record
        is written only when there is news."""
        kernel_id = record.kernel_id
        notice = self.runtime.run_dir(kernel_id) / exits.NOTICE
        last = record.extra.get("last_exit")
        if not last or last.get("shown"):
            notice.unlink(missing_ok=True)
            return

        def shown(current: KernelRecord) -> None:
            current.extra["last_exit"] = {**current.extra["last_exit"], "shown": True}

        self.runtime.store.update(kernel_id, shown)
        write_json(notice, last, mode=0o644)

    # ---- snapshots, restores, resets: one way for the CLI and the magic ---------------
    # Each is logged at INFO for operators (owner: the uid the kernel's snapshots are
    # kept under) and told to subscribers.

    async def snapshot(
        self,
        kernel_id: str,
        name: str,
        message: str = "",
        live: bool = True,
        progress: Progress | None = None,
        wait: bool = False,
        keep_frozen: bool = False,
    ) -> dict[str, Any]:
        meta = await self.runtime.snapshot(
            kernel_id, name, message, live, progress, wait, keep_frozen
        )
        self.log.info(
            "snapshot %s of kernel %s (owner %s): %s, memory %s, files %s, %.2f s",
            meta["name"], kernel_id, self._owner_text(kernel_id), meta["mode"],
            format_size(meta["memory_bytes"]), format_size(meta["file_bytes"]), meta["seconds"],
        )  # fmt: skip
        self.emit({"event": "snapshot", "kernel_id": kernel_id, "name": meta["name"]})
        return meta

    async def restore(self, kernel_id: str, name: str, arriving: bool = False) -> dict[str, Any]:
        started = time.monotonic()
        try:
            done = await self.runtime.restore(kernel_id, name, arriving)
        except snapshots.SnapshotNotFound:
            # A kernel of a cluster: the snapshot may have been taken on another node.
            if not await self.fetch_shared(kernel_id, name):
                raise
            done = await self.runtime.restore(kernel_id, shared.local_name(name), arriving)
        self.log.info(
            "restored kernel %s (owner %s) to snapshot %s: %s, %.2f s%s",
            kernel_id, self._owner_text(kernel_id), name, done.get("mode"),
            time.monotonic() - started, f" ({done['reason']})" if done.get("reason") else "",
        )  # fmt: skip
        self.emit({"event": "process", "kernel_id": kernel_id, "pid": done["pid"]})
        return done

    async def fetch_shared(self, kernel_id: str, name: str) -> list[str]:
        """Import snapshot ``name`` from the kernel's shared store (a cluster's), as
        its owner; the names imported, none where the kernel has no shared store or
        the store lacks it."""
        record = self.runtime.record(kernel_id)
        folder = record.extra.get("shared_store")
        if not folder:
            return []
        snapshots.check_name(name)
        # Read as whoever started the kernel (its store is theirs; a root server's
        # kernel may run as another uid), into the store of the uid it runs as.
        starter = Caller.of_user(record.belongs_to, record.gid)
        try:
            names = await asyncio.to_thread(
                shared.fetch, starter, record.uid, record.gid, str(folder), name
            )
        except snapshots.SnapshotNotFound:
            return []
        for moved in (n for n in names if snapshots.is_moved(n)):
            await self.runtime.store.aupdate(kernel_id, functools.partial(_carries, name=moved))
        self.log.info("kernel %s: fetched %s from the shared store %s",
                      kernel_id, ", ".join(names), folder)  # fmt: skip
        return names

    async def reset(self, kernel_id: str, pristine: bool = False) -> dict[str, Any]:
        started = time.monotonic()
        channel = self.channels.get(kernel_id)
        if channel is not None:
            # The new process learns what happened from it (a cell that asked for the
            # reset has put its own there): it numbers its cells afresh.
            record = self.runtime.record(kernel_id)
            # A pristine base is a fresh kernel on the image's files to its user.
            to_base = record.base and not pristine and not record.pristine_cwd
            channel.server.pending = {
                **(channel.server.pending or {}), "kind": "reset",
                "to": "base" if to_base else "image",
            }  # fmt: skip
        done = await self.runtime.reset(kernel_id, pristine)
        record = self.runtime.record(kernel_id)
        kind = "pristine base" if record.pristine_cwd else "base"
        to = {"base": f"its {kind} {record.base}", "files": f"its {kind} {record.base}'s files"}
        self.log.info(
            "reset kernel %s (owner %s) to %s, %.2f s%s",
            kernel_id, self._owner_text(kernel_id), to.get(done["to"], "the image's files"),
            time.monotonic() - started, f" ({done['note']})" if done.get("note") else "",
        )  # fmt: skip
        self.emit({"event": "process", "kernel_id": kernel_id, "pid": done["pid"]})
        return done

    def _owner_text(self, kernel_id: str) -> str:
        try:
            return str(self.runtime.record(kernel_id).uid)
        except (SandboxError, OSError):
            return "?"

    # ---- events ----------------------------------------------------------------------

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` with each event from now on; returns the unsubscribe,
        which may be called more than once (jupyter_client cleans a kernel up twice
        when nbclient shuts it down: ``shutdown_kernel``, then ``cleanup_resources``)."""
        self._subscribers.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(listener)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Tell every subscriber. An event names its kernel and the kernel's owner."""
        kernel_id = event.get("kernel_id")
        if kernel_id:
            with contextlib.suppress(SandboxError, OSError):
                record = self.runtime.record(kernel_id)
                event["kernel_id"] = record.public_id  # the id Jupyter knows
                event.setdefault("owner_uid", record.belongs_to)
        for listener in list(self._subscribers):
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the others
                self.log.exception("an event listener failed")

    # ---- control channels ------------------------------------------------------------

    async def open_channel(self, record: KernelRecord, listen: bool) -> ControlChannel:
        """The kernel's control channel, made if it has none."""
        channel = self.channels.get(record.kernel_id)
        if channel is None:
            governed = _Governed(self, record.kernel_id)
            channel = await asyncio.to_thread(ControlChannel, self, record, governed)
            self.channels[record.kernel_id] = channel
        if listen:
            await channel.listen()
        return channel

    async def close_channel(self, kernel_id: str) -> None:
        channel = self.channels.pop(kernel_id, None)
        if channel is not None:
            await channel.server.close()

    async def adopt_all(self) -> list[str]:
        """Take up every kernel that runs (a restarted daemon): thaw what a dead
        snapshot left frozen, finish a restore cut short, serve its control channel.
        Returns the ids taken up."""
        taken = []
        for record in await asyncio.to_thread(self.runtime.records):
            kid = record.kernel_id
            if record.pooled or record.extra.get("claimed"):
                # Its wait to be claimed was this process's predecessor's.
                with contextlib.suppress(SandboxError, OSError):
                    await self.runtime.remove(kid)
                continue
            try:
                await self.runtime.thaw_if_stale(kid)
                pid = await self.runtime.finish_restore(kid)
                if pid is None:
                    pid = await self.runtime.container_pid(kid)
                if pid is None:
                    continue
                await self.open_channel(self.runtime.record(kid), listen=True)
                taken.append(kid)
            except (SandboxError, OSError) as err:
                self.log.warning("kernel %s could not be taken up: %s", kid, err)
        return taken

    async def close_gone_channels(self) -> None:
        """Close the channels of kernels that are gone (``gc`` removed them)."""
        for kid in list(self.channels):
            if not self.runtime.store.exists(kid):
                await self.close_channel(kid)

    async def close(self) -> None:
        await self.pools.drain()
        for kid in list(self.channels):
            await self.close_channel(kid)


# ---- a kernel's life: the provisioner's operations --------------------------------------


def _config(caller: Caller, data: dict[str, Any]) -> KernelConfig:
    """The kernel config a caller sent. A non-root caller's kernel runs as them."""
    uid, gid = data.get("uid"), data.get("gid")
    if not caller.is_root:
        if uid not in (None, caller.uid):
            raise ConfigError(
                "kernel_uid", uid, f"is not yours; your kernels run as you (uid {caller.uid})"
            )
        if gid not in (None, caller.gid, *caller.groups):
            raise ConfigError(
                "kernel_gid", gid, f"is no group of yours; use {caller.gid} or leave it unset"
            )
        uid = caller.uid
        gid = caller.gid if gid is None else gid
    for what, value in (("kernel_uid", uid), ("kernel_gid", gid)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(what, value, "is not a user or group id")
    assert isinstance(uid, int) and isinstance(gid, int)
    strings = ("image", "network", "cwd", "executable")
    for key in strings:
        if not isinstance(data.get(key), str):
            raise ConfigError(key, data.get(key), "must be a string")
    shm = data.get("shm")
    return KernelConfig(
        shm=parse_size(shm, "shm size") if shm not in (None, "") else None,
        image=data["image"],
        limits=Limits.parse(**(data.get("limits") or {})),
        network=data["network"],
        uid=uid,
        gid=gid,
        cwd=data["cwd"],
        executable=data["executable"],
        base=str(data.get("base") or ""),
        class_name=str(data.get("class_name") or ""),
        pristine=data.get("pristine") is not False,
        caller=caller,
    )


def _kernel_info(record: KernelRecord) -> dict[str, Any]:
    return {
        "kernel_id": record.public_id,
        "internal_id": record.kernel_id,
        "pooled": bool(record.extra.get("claimed")),
        "kernel_ip": record.kernel_ip,
        "uid": record.uid,
        "gid": record.gid,
        "start": record.start.value,
        "base": record.base,
        "base_note": record.base_note,
        "describe": record.describe(),
        "limits": record.limits.to_dict(),
    }


@_op("prepare")
async def _prepare(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    kernel_id = args["kernel_id"]
    if not isinstance(kernel_id, str):
        raise ConfigError("kernel id", kernel_id, "is not a kernel id")
    svc.runtime.kernel_dir(kernel_id)  # checks its form
    config = _config(caller, args["config"])
    size, key = _pool_of(caller, config, args["config"])
    if svc.runtime.store.exists(kernel_id):
        svc.kernel(caller, kernel_id)  # a restart: the caller's own kernel
        kernel_id = svc.runtime.store.resolve(kernel_id)
        record = await svc.runtime.prepare(kernel_id, config)
    else:
        if size:
            svc.pools.ask(key, config, size)
            claimed = await svc.pools.claim(caller, kernel_id, key)
            if claimed is not None:
                if args["config"].get("autosave"):
                    claimed = await _turn_autosave_on(svc, claimed.kernel_id, args["config"])
                return _kernel_info(claimed)
        quota = svc.config.quota_for(caller)
        if quota.kernels is None and quota.memory_total is None:
            check_limits(quota, config.limits, [])
            record = await svc.runtime.prepare(kernel_id, config)
        else:
            # Counted and made under the user's lock: two starts at once cannot
            # both take the last place. The user's pool kernels make room.
            async with svc.user_lock(caller.uid):
                while True:
                    try:
                        check_kernel(quota, config.limits, svc.running_limits(caller.uid))
                        break
                    except QuotaError:
                        if not await svc.pools.evict(caller.uid):
                            raise
                record = await svc.runtime.prepare(kernel_id, config)
        if size:
            record = await svc.runtime.store.aupdate(kernel_id, lambda r: _pool_mark(r, key))
        if args["config"].get("autosave"):
            record = await _turn_autosave_on(svc, kernel_id, args["config"])
    store = args["config"].get("shared_store")
    if store:
        folder = shared.check_store(store)
        record = await svc.runtime.store.aupdate(
            record.kernel_id, lambda r: r.extra.update(shared_store=folder) or r
        )
    if record.belongs_to != caller.uid and not caller.is_root:
        raise KernelNotFound(kernel_id)
    try:
        await svc.open_channel(record, listen=False)
    except BaseException:
        await svc.runtime.remove(kernel_id)
        raise
    return _kernel_info(record)


def _pool_of(caller: Caller, config: KernelConfig, data: dict[str, Any]) -> tuple[int, str]:
    """The pool size a start asks for and the key of its pool (see ``pool.py``)."""
    pool = data.get("pool") or {}
    if not isinstance(pool, dict):
        raise ConfigError("pool", pool, "must be an object with a size and a spec")
    size = check_pool(pool.get("size", 0))
    if size and (config.base or config.class_name or not config.pristine):
        raise ConfigError(
            "pool", size,
            "keeps kernels restored from the pristine base: a kernelspec with a base or "
            "a class, or with the pristine base off, cannot have one; set pool 0",
        )  # fmt: skip
    return size, pool_key(caller, config, str(pool.get("spec") or ""))


def _pool_mark(record: KernelRecord, key: str) -> KernelRecord:
    record.extra["pool_of"] = key
    return record


async def _turn_autosave_on(
    svc: KernelService, kernel_id: str, config: dict[str, Any]
) -> KernelRecord:
    """A new kernel of a kernelspec with autosave: on, in its record and for its magic."""
    retain = config.get("retain")
    record = await svc.runtime.store.aupdate(kernel_id, lambda r: _autosave_on(r, retain))
    show_autosave(svc.runtime.run_dir(record.kernel_id), True)
    return record


def _autosave_on(record: KernelRecord, retain: object) -> KernelRecord:
    record.extra["autosave"] = True
    if isinstance(retain, int) and not isinstance(retain, bool):
        if not 1 <= retain <= 1000:
            raise ConfigError("autosave_keep", retain, "must be from 1 to 1000 checkpoints")
        record.extra["retain"] = retain
    return record


@_op("launch")
async def _launch(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Start the prepared kernel; a kernel restored from a base must take its new
    key (its magic calls the control server with it) or starts cold instead. A
    kernel claimed from a pool only takes its key and environment."""
    record = svc.kernel(caller, args["kernel_id"])
    kid = record.kernel_id
    argv, env = args["argv"], args["env"]
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise ConfigError("argv", argv, "must be a list of strings")
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        raise ConfigError("env", "...", "must map names to strings")
    connection = dict(args["connection"])
    pool = record.extra.get("pool_of")
    if record.extra.get("claimed") and kid in svc.channels:
        record, pid, warning = await svc.pools.hand_over(record, env, connection)
        svc.emit({"event": "started", "kernel_id": kid, "pid": pid})
        if isinstance(pool, str):
            svc.pools.fill_later(pool, argv, env, connection)
        return {**_kernel_info(record), "pid": pid, "warning": warning}
    await asyncio.to_thread(svc.notice_for_next_start, record)
    # A new process numbers its cells afresh: the last one's checkpoints are no use.
    await svc.timetravel.drop_all(record)
    if (
        record.base is None and not record.class_name and not record.base_note
        and record.extra.get("pristine") is None
    ):  # fmt: skip
        # A kernelspec without a base: its first start restores its pristine base.
        record = await _pristine(svc, record, argv, env)
    channel = svc.channels.get(kid)
    if channel is not None and record.wants_base:
        expect_new_kernel(channel.server, record, env)
    pid = await svc.runtime.start(kid, argv, env, connection)
    record = svc.runtime.record(kid)  # the start says how it went
    channel = await svc.open_channel(record, listen=True)
    warning = ""
    if record.start is Start.BASE and not await channel.heard_within(BASE_CONFIRM_TIMEOUT):
        warning = (
            f"the kernel restored from base {record.base} did not take its new key within "
            f"{BASE_CONFIRM_TIMEOUT:.0f} s (is the sandbox_kernel.magics extension loaded?)"
        )
        pid = await svc.runtime.start_cold(kid, warning)
        record = svc.runtime.record(kid)
    elif record.start is Start.COLD and record.base_note:
        warning = record.base_note
    svc.emit({"event": "started", "kernel_id": kid, "pid": pid})
    if isinstance(pool, str):
        svc.pools.fill_later(pool, argv, env, connection)
    return {**_kernel_info(record), "pid": pid, "warning": warning}


def expect_new_kernel(server: ControlServer, record: KernelRecord, env: dict[str, str]) -> None:
    """Tell kernel ``record``'s next process from a base (a start, or a pool kernel
    handed over) that it is a new kernel: it numbers its cells from 1. From a
    pristine base, it moves to its own folder and launch environment ``env`` too
    (kept for its resets)."""
    server.pending = {"kind": "base", "count": 1}
    if record.pristine_cwd:
        server.arrival = {"cwd": record.cwd_inside, "was_cwd": record.pristine_cwd, "env": env}


async def _pristine(
    svc: KernelService, record: KernelRecord, argv: list[str], env: dict[str, str]
) -> KernelRecord:
    """At a kernel's first launch: take its pristine base, made if need be, or say
    in its record why it starts cold. Marks the record either way (``pristine``):
    a restart keeps what the first launch chose, and the kernel's files."""
    from .pristine_make import find_or_make  # here: it imports this module's types

    kid = record.kernel_id
    if (svc.runtime.kernel_dir(kid) / "container.pid").exists():
        # Started before (a kernel of an earlier version, restarted): its files
        # are its user's, and a base would replace them. It goes on starting cold.
        meta, why = None, ""
    else:
        meta, why = await find_or_make(svc, record, argv, env)
    if meta is not None:
        record = await asyncio.to_thread(svc.runtime.lifecycle.use_pristine, kid, meta)
    elif why:
        svc.runtime.rootfs.append_log(kid, f"starting cold: {why}")

    def mark(current: KernelRecord) -> KernelRecord:
        current.extra["pristine"] = meta["id"] if meta else ""
        if why:
            current.base_note = why
        return current

    return await svc.runtime.store.aupdate(kid, mark)


@_op("drain_pools")
async def _drain_pools(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Remove the pool kernels the caller's process asked for (a server at its
    exit: nobody can claim them now); their ids."""
    return await svc.pools.drain(owner_pid=caller.pid)


@_op("stop")
async def _stop(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    record = svc.kernel(caller, args["kernel_id"])
    await svc.runtime.stop(record.kernel_id)
    svc.emit({"event": "stopped", "kernel_id": record.public_id})


@_op("remove")
async def _remove(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    try:
        record = svc.kernel(caller, args["kernel_id"])
    except KernelNotFound:
        return None  # gone already: fine
    owner = record.belongs_to
    await svc.close_channel(record.kernel_id)
    await svc.timetravel.drop_all(record)
    await svc.runtime.remove(record.kernel_id)
    for name in record.extra.get("moved") or []:  # it carried the kernel between nodes
        with contextlib.suppress(SandboxError, OSError):
            await asyncio.to_thread(snapshots.delete, str(record.uid), name)
    svc.emit({"event": "removed", "kernel_id": record.public_id, "owner_uid": owner})


@_op("pid")
async def _pid(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """The host pid of the kernel's init once no restore is in progress (None if it
    runs no more); ``finish``: first finish a restore cut short."""
    record = svc.kernel(caller, args["kernel_id"])
    pid = None
    if args.get("finish"):
        pid = await svc.runtime.finish_restore(record.kernel_id)
    if pid is None:
        pid = await svc.runtime.container_pid(record.kernel_id)
    return pid


@_op("recover")
async def _recover(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """After the kernel's process died unasked: bring it back from its latest
    checkpoint if it has one and died by the OOM killer or a signal (see
    ``timetravel.py``); ``{"pid", "text"}``, or None."""
    record = svc.kernel(caller, args["kernel_id"])
    done = await svc.timetravel.recover(record.kernel_id)
    if done is not None:
        svc.log.warning("kernel %s: %s; restored from its latest checkpoint",
                        record.public_id, done["text"])  # fmt: skip
    return done


@_op("tend")
async def _tend(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Thaw a kernel a dead snapshot left frozen, and keep its log under its cap."""
    record = svc.kernel(caller, args["kernel_id"])
    await svc.runtime.thaw_if_stale(record.kernel_id)
    await asyncio.to_thread(svc.runtime.trim_log, record.kernel_id)


@_op("ended")
async def _ended(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Why the kernel's process ended: ``{"oom", "signal", "text", "log_tail"}``
    (``text`` empty for an exit by itself). An OOM kill or a signal is written to the
    kernel's log and kept in its record, so the next start tells the user."""
    record = svc.kernel(caller, args["kernel_id"])
    kid = record.kernel_id
    tail = await asyncio.to_thread(_log_tail, svc, kid, 40)
    oom = svc.runtime.oom_killed(kid)
    sig = exits.signal_in_log(tail)
    if args.get("asked") and not oom:
        sig = None  # a shutdown or kill that was asked for is no news
    last = exits.describe(oom, sig, record.limits.memory)
    if last is not None:
        await asyncio.to_thread(svc.runtime.append_log, kid, last["text"])
        await svc.runtime.store.aupdate(kid, lambda r: r.extra.update(last_exit=last))
    return {
        "oom": last["text"] if oom and last else "",
        "signal": last["signal"] if last else "",
        "text": last["text"] if last else "",
        "log_tail": "\n".join(tail.splitlines()[-20:]),
    }


def _log_tail(svc: KernelService, kernel_id: str, lines: int | None) -> str:
    try:
        text = svc.runtime.log_path(kernel_id).read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err.strerror})"
    kept = text.splitlines()
    if lines is not None:
        kept = kept[-lines:] if lines > 0 else []
    return "\n".join(kept)


@_op("adopt")
async def _adopt(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Make the caller's process the kernel's owner (a restarted Jupyter server);
    the kernel's pid."""
    record = svc.kernel(caller, args["kernel_id"])
    kid = record.kernel_id
    await asyncio.to_thread(svc.runtime.lifecycle.adopt, kid, caller.pid)
    pid = await svc.runtime.container_pid(kid)
    if pid is not None:
        await svc.open_channel(svc.runtime.record(kid), listen=True)
    return pid


# ---- what a person asks: the CLI's operations -----------------------------------------


def _usage(svc: KernelService, record: KernelRecord) -> dict[str, Any] | None:
    use = svc.runtime.usage(record)
    return None if use is None else dict(use.__dict__)


@_op("kernels")
async def _kernels(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """The caller's kernels (every kernel for an admin), with their use now."""
    records = await asyncio.to_thread(svc.runtime.records)
    return [
        {
            **r.to_dict(),
            "kernel_id": r.public_id,
            "internal_id": r.kernel_id,
            "pooled": r.pooled,
            "owner_uid": r.belongs_to,
            "usage": await asyncio.to_thread(_usage, svc, r),
        }
        for r in records
        if svc.sees(caller, r)
    ]


@_op("logs")
async def _logs(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    record = svc.kernel(caller, args["kernel_id"])
    tail = args.get("tail")
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int)):
        raise ConfigError("--tail", tail, "is not a number of lines")
    return await asyncio.to_thread(_log_tail, svc, record.kernel_id, tail)


@_op("limits")
async def _limits(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Show or change a kernel's limits. Root and admins may go above the kernel's
    ceiling; its owner may move within it, and within their quotas."""
    record = svc.kernel(caller, args["kernel_id"])
    change = Limits.parse(**(args.get("limits") or {}))
    if change == Limits():
        return record.limits.to_dict()
    operator = svc.config.is_admin(caller)
    if not caller.is_root:
        svc.check_limits_quota(svc.owner_of(record), record, change)
    limits = await svc.runtime.update_limits(record.kernel_id, change, operator=operator)
    return limits.to_dict()


@_op("snapshot")
async def _snapshot(
    svc: KernelService, caller: Caller, args: dict[str, Any], progress: Progress | None
) -> Any:
    record = svc.kernel(caller, args["kernel_id"])
    snapshots.check_user_name(args["name"])
    return await svc.snapshot(
        record.kernel_id, args["name"], str(args.get("message") or ""),
        live=bool(args.get("live", True)), progress=progress,
        wait=bool(args.get("wait", True)),
    )  # fmt: skip


@_op("restore")
async def _restore(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    record = svc.kernel(caller, args["kernel_id"])
    notice = args.get("notice")
    channel = svc.channels.get(record.kernel_id)
    if notice and channel is not None:
        # What the restored process tells the notebook at its next cell.
        channel.server.pending = {"kind": "notice", "text": str(notice)[:2000]}
    return await svc.restore(record.kernel_id, args["name"], bool(args.get("arriving")))


@_op("reset")
async def _reset(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    record = svc.kernel(caller, args["kernel_id"])
    return await svc.reset(record.kernel_id, bool(args.get("pristine")))


@_op("diff")
async def _diff(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    record = svc.kernel(caller, args["kernel_id"])
    return await asyncio.to_thread(svc.runtime.diff, record.kernel_id, args.get("name"))


@_op("snapshots")
async def _snapshots(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """``[[owner, meta], ...]``: of one kernel's owner, else the caller's (every
    owner's for an admin)."""

    def listing() -> list[list[Any]]:
        if args.get("kernel_id"):
            owners = [str(svc.kernel(caller, args["kernel_id"]).uid)]
        elif svc.config.is_admin(caller):
            records = svc.runtime.records()
            owners = sorted({str(r.uid) for r in records} | set(snapshots.owners()))
        else:
            owners = [str(caller.uid)]
        # Not checkpoints: `%container history` shows those.
        return [
            [owner, meta]
            for owner in owners
            for meta in snapshots.listing(owner)
            if not (snapshots.is_checkpoint(meta["name"]) or snapshots.is_moved(meta["name"]))
        ]

    return await asyncio.to_thread(listing)


_NOT_KEPT = "is not kept; `sandbox-kernel snapshots` lists those you may delete"


@_op("delete_snapshot")
async def _delete_snapshot(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Delete snapshot ``name`` of ``owner`` (a uid), else of the kernel's owner,
    else the caller's own (an admin's: the one user who has one of that name). No
    live kernel is needed. Returns the owner."""
    name = snapshots.check_name(args["name"])
    owner = await _owner_of(svc, caller, name, args)
    await asyncio.to_thread(snapshots.delete, owner, name)
    return owner


async def _owner_of(svc: KernelService, caller: Caller, name: str, args: dict[str, Any]) -> str:
    """Whose snapshot ``name`` the caller means: ``owner`` (a uid), else the owner of
    ``kernel_id``, else the caller's own (an admin's: the one user who has one of
    that name)."""
    if args.get("owner") not in (None, ""):
        return svc.snapshot_owner(caller, args["owner"])
    if args.get("kernel_id"):
        return str(svc.kernel(caller, args["kernel_id"]).uid)
    if svc.config.is_admin(caller):
        having = [o for o in snapshots.owners() if name in snapshots.names(o)]
        if not having:
            raise ConfigError("snapshot", name, _NOT_KEPT)
        if len(having) > 1:
            raise ConfigError(
                "snapshot", name,
                f"is kept by users {', '.join(having)}; say whose with --owner UID",
            )  # fmt: skip
        return having[0]
    owner = str(caller.uid)
    kept = owner in await asyncio.to_thread(snapshots.owners)
    if not kept or name not in await asyncio.to_thread(snapshots.names, owner):
        raise ConfigError("snapshot", name, _NOT_KEPT)
    return owner


def _export_path(path: object, what: str) -> str:
    """A file path a caller named for an export or import: absolute, plain text."""
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise ConfigError(what, path, "must be an absolute path (the CLI makes it one)")
    return path


def _in_thread(progress: Progress | None) -> Callable[[str], None]:
    """``progress`` as a worker thread may call it."""
    if progress is None:
        return lambda _: None
    loop = asyncio.get_running_loop()

    def say(text: str) -> None:
        loop.call_soon_threadsafe(progress, text)

    return say


@_op("export_snapshot")
async def _export_snapshot(
    svc: KernelService, caller: Caller, args: dict[str, Any], progress: Progress | None
) -> Any:
    """Write snapshot ``name`` (the caller's; an admin may name ``owner``) to the new
    file ``path``, made by the caller, readable by them alone; against its parent
    ``since`` if given (see ``portable.py``)."""
    name = snapshots.check_name(args["name"])
    owner = await _owner_of(svc, caller, name, args)
    since = args.get("since") or None
    if since is not None:
        since = snapshots.check_name(str(since))
    path = _export_path(args["path"], "export file")
    return await _export_to(caller, owner, name, path, since, _in_thread(progress))


async def _export_to(
    caller: Caller, owner: str, name: str, path: str, since: str | None,
    say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Write snapshot ``name`` of ``owner`` to the new file ``path``, made by
    ``caller`` and readable by them alone; nothing is left if it fails."""

    def run() -> dict[str, Any]:
        with as_caller(caller):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)  # fmt: skip
            except FileExistsError:
                raise ConfigError(
                    "export file", path, "exists; choose another name or remove it"
                ) from None
            except OSError as err:
                raise ConfigError(
                    "export file", path, f"cannot be made by you ({err.strerror})"
                ) from None
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as out:
                done = portable.export(owner, name, out, since, say)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with as_caller(caller), contextlib.suppress(OSError):
                os.unlink(path)  # nothing half-written is left
            raise
        return {"name": name, "owner": owner, "bytes": done.bytes,
                "parent_bytes": done.parent_bytes, "since": since}  # fmt: skip

    return await asyncio.to_thread(run)


@_op("import_snapshot")
async def _import_snapshot(
    svc: KernelService, caller: Caller, args: dict[str, Any], progress: Progress | None
) -> Any:
    """Read the exported snapshot in file ``path`` (opened as the caller) into the
    store of the caller (an admin may name ``owner``), as ``name`` (default its
    own); kernels in host folder ``cwd`` see it."""
    owner = svc.snapshot_owner(caller, args.get("owner"))
    path = _export_path(args["path"], "import file")
    name = args.get("name") or None
    parent_name = args.get("parent_name") or None
    if parent_name is not None:
        parent_name = snapshots.check_name(str(parent_name))
    # A kernel moving here: the snapshot is kept as long as that kernel is.
    carried = svc.kernel(caller, args["kernel_id"]) if args.get("kernel_id") else None
    if (name is not None and snapshots.is_moved(str(name))) != (carried is not None):
        raise ConfigError(
            "snapshot name", name, f"must start with {snapshots.MOVED_PREFIX!r} exactly "
            "when it carries a kernel (kernel_id); choose another",
        )  # fmt: skip
    cwd = args.get("cwd") or None
    if cwd is not None:
        cwd = _export_path(cwd, "--cwd")
    uid = int(owner)
    gid = caller.gid if uid == caller.uid else _primary_gid(uid)
    if carried is not None:  # the kernel's own store (a root server's kernel runs as another)
        uid, gid = carried.uid, carried.gid
    say = _in_thread(progress)

    def run() -> dict[str, Any]:
        with as_caller(caller):
            try:
                # Not blocking on a FIFO put there: only a regular file is read.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as err:
                raise ConfigError(
                    "import file", path, f"cannot be read by you ({err.strerror})"
                ) from None
        with os.fdopen(fd, "rb", buffering=1 << 20) as source:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError("import file", path, "is not a regular file")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return portable.import_(uid, gid, source, name, cwd, say, parent_name)

    meta = await asyncio.to_thread(run)
    if carried is not None:
        await svc.runtime.store.aupdate(carried.kernel_id, lambda r: _carries(r, meta["name"]))
    return meta


def _carries(record: KernelRecord, name: str) -> None:
    record.extra["moved"] = [*(record.extra.get("moved") or []), name]


@_op("move_out")
async def _move_out(
    svc: KernelService, caller: Caller, args: dict[str, Any], progress: Progress | None
) -> Any:
    """One step of moving the kernel to another node (``sandbox_kernel/migrate.py``):
    snapshot it as ``name`` (a ``moved-`` name, deleted with the kernel) and write it
    to the new file ``path`` as the caller, against ``since`` if given. With
    ``final`` the kernel stays frozen afterwards (``thaw`` lets it go on here if
    the move fails); else it runs on."""
    record = svc.kernel(caller, args["kernel_id"])
    name = snapshots.check_name(str(args["name"]))
    if not snapshots.is_moved(name):
        raise ConfigError("snapshot name", name, f"must start with {snapshots.MOVED_PREFIX!r}")
    since = args.get("since") or None
    if since is not None:
        since = snapshots.check_name(str(since))
    path = _export_path(args["path"], "export file")
    final = bool(args.get("final"))
    started = time.monotonic()
    await svc.runtime.store.aupdate(record.kernel_id, lambda r: _carries(r, name))
    meta = await svc.snapshot(record.kernel_id, name, "moving to another node",
                              wait=True, progress=progress, keep_frozen=final)  # fmt: skip
    dumped = time.monotonic()
    try:
        if meta["mode"] != "live":
            raise ConfigError(
                "kernel", record.public_id,
                f"cannot move with its memory: {meta.get('reason') or 'CRIU could not dump it'}",
            )  # fmt: skip
        done = await _export_to(caller, str(record.uid), name, path, since, _in_thread(progress))
    except BaseException:
        if final:
            await svc.runtime.drivers.runc.resume(record.container_id)
        raise
    return {**done, "memory_bytes": meta["memory_bytes"], "paused_seconds": meta["paused_seconds"],
            "snapshot_seconds": round(dumped - started, 4),
            "export_seconds": round(time.monotonic() - dumped, 4)}  # fmt: skip


@_op("fetch")
async def _fetch(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Import snapshot ``name`` from the kernel's shared store (see ``shared.py``);
    the name the kernel restores it by."""
    record = svc.kernel(caller, args["kernel_id"])
    names = await svc.fetch_shared(record.kernel_id, str(args["name"]))
    if not names:
        raise snapshots.SnapshotNotFound(str(args["name"]), [])
    return names[-1]


@_op("thaw")
async def _thaw(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Let a kernel whose move failed after its last snapshot run on here."""
    record = svc.kernel(caller, args["kernel_id"])
    await svc.runtime.drivers.runc.resume(record.container_id)


@_op("kernel_snapshots")
async def _kernel_snapshots(
    svc: KernelService, caller: Caller, args: dict[str, Any], _: Any
) -> Any:
    """What the kernel's node keeps of it, for the cluster's shared store: the
    snapshots it took and its checkpoints, saved ones only, oldest first:
    ``[{"name", "parent", "created", "checkpoint"}]``."""
    record = svc.kernel(caller, args["kernel_id"])
    owner = str(record.uid)

    def listing() -> list[dict[str, Any]]:
        found = []
        for meta in snapshots.listing(owner):
            name = meta["name"]
            if meta.get("saving") or snapshots.is_moved(name):
                continue
            if meta.get("kernel_id") != record.kernel_id:
                continue
            found.append({"name": name, "parent": meta.get("parent"),
                          "created": meta.get("created", 0.0),
                          "checkpoint": snapshots.is_checkpoint(name)})  # fmt: skip
        return sorted(found, key=lambda m: m["created"])

    return await asyncio.to_thread(listing)


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


@_op("bases")
async def _bases(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """The base snapshots the caller made (every base for an admin)."""
    metas = await asyncio.to_thread(bases.listing)
    admin = svc.config.is_admin(caller)
    return [m for m in metas if admin or str(m.get("snapshot_owner")) == str(caller.uid)]


@_op("delete_base")
async def _delete_base(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    base_id = args["base_id"]
    meta = await asyncio.to_thread(bases.load, base_id)
    if not svc.config.is_admin(caller) and str(meta.get("snapshot_owner")) != str(caller.uid):
        raise ConfigError("base", base_id, "is not known; `sandbox-kernel bases` lists yours")
    await asyncio.to_thread(bases.delete, base_id)


@_op("gc", admin=True)
async def _gc(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    removed = await svc.runtime.gc(dry_run=bool(args.get("dry_run")))
    await svc.close_gone_channels()
    return removed


@_op("whoami")
async def _whoami(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Who the service takes the caller for, and their quotas."""
    quota = svc.config.quota_for(caller)
    return {
        "uid": caller.uid, "gid": caller.gid, "pid": caller.pid,
        "admin": svc.config.is_admin(caller), "served_by": os.getpid(),
        "quota": {k: quota.show(k) for k in quota.__dataclass_fields__},
    }  # fmt: skip


# The class operations register themselves in OPS (they need the names above).
from . import class_ops  # noqa: E402, F401
