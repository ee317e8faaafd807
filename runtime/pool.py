"""Warm pools: kernels restored and paused before anyone asks for them.

A kernelspec's ``pool`` setting (N, default 0) keeps N kernels of its configuration
restored from its pristine base (``pristine.py``) and frozen. A start then claims
one instead of making a kernel: it hands over the new key and the launch's
environment and thaws it; the frontend connects to the pool kernel's address.

- **Made under an id of their own.** Jupyter chooses a kernel's id before the
  provisioner runs, and every part of a kernel (its folder, layer, container and
  cgroup) is named by the id it was made under. A claim writes the Jupyter id as
  an alias of the pool kernel's (``store.py``); outside, the kernel is known by it
  (``KernelRecord.public_id``).
- **Whose.** A pool belongs to one user and one process, the Jupyter server that
  asked for it: its key (:func:`pool_key`) holds the owner's uid and pid, the
  kernel's configuration and the kernelspec's command. A start claims only a kernel
  of its own key, under the record's lock, so one kernel is never handed to two
  starts, nor to another user or server. Pool kernels run as the user they will
  serve and count against that user's kernel and memory quotas; a start that a
  quota would refuse removes one of the user's pool kernels first.
- **Until when.** Pool kernels go with the server that owns them: removed when it
  exits (``backends.py``), by the daemon when it stops, and by ``gc`` once the
  server is gone. A pool kernel whose Python environment changed since its base
  was made is removed instead of claimed.
- **Cost.** Each pool kernel holds an idle kernel's memory (see docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox_kernel.errors import ConfigError, SandboxError

from . import bases, pristine
from .callers import Caller
from .lifecycle import KernelConfig
from .quotas import check_kernel
from .record import KernelRecord, Start

if TYPE_CHECKING:
    from .service import KernelService

#: Most kernels one kernelspec may keep in its pool.
POOL_MAX = 8
#: How long a pool kernel may take to restore and wait to be claimed, in seconds.
READY_TIMEOUT = 30.0


def check_pool(value: object) -> int:
    """A pool size from a kernelspec or a caller.

    Raises:
        ConfigError: not a whole number from 0 to :data:`POOL_MAX`.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= POOL_MAX:
        raise ConfigError("pool", value, f"must be a whole number from 0 to {POOL_MAX}")
    return value


def pool_key(caller: Caller, config: KernelConfig, spec: str) -> str:
    """The pool a kernel of ``config``, asked for by ``caller`` with a kernelspec whose
    command and environment digest to ``spec``, is taken from."""
    data = {
        "owner": [caller.uid, caller.pid],
        "uid": config.uid,
        "gid": config.gid,
        "image": config.image,
        "limits": config.limits.to_dict(),
        "network": config.network,
        "cwd": config.cwd,
        "executable": config.executable,
        "shm": config.shm,
        "spec": spec,
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class _Pool:
    """What a pool is filled with: the configuration and size from the last start
    that asked for it, and that start's command, environment and connection."""

    config: KernelConfig
    size: int
    launch: tuple[list[str], dict[str, str], dict[str, Any]] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Pools:
    """The warm pools of one kernel service (the daemon's, or a root server's)."""

    def __init__(self, service: KernelService) -> None:
        self.service = service
        self._pools: dict[str, _Pool] = {}
        #: The fills under way, and the server (pid) each is for.
        self._tasks: dict[asyncio.Task[None], int] = {}

    # ---- what is in a pool --------------------------------------------------------

    def members(self, key: str) -> list[KernelRecord]:
        """The kernels of pool ``key`` not claimed yet, ready or on their way."""
        return [
            r for r in self.service.runtime.records()
            if r.pooled and r.extra["pool"].get("key") == key
        ]  # fmt: skip

    def ask(self, key: str, config: KernelConfig, size: int) -> None:
        """A start of ``config`` wants pool ``key`` to hold ``size`` kernels."""
        pool = self._pools.get(key)
        if pool is None:
            self._pools[key] = _Pool(config, size)
        else:
            pool.config, pool.size = config, size

    # ---- a start takes one --------------------------------------------------------

    async def claim(self, caller: Caller, jupyter_id: str, key: str) -> KernelRecord | None:
        """Hand a ready kernel of pool ``key`` to the start of kernel ``jupyter_id``:
        its record, now known by that id, or None if the pool has none ready."""
        svc = self.service
        for record in await asyncio.to_thread(self.members, key):
            kid = record.kernel_id
            channel = svc.channels.get(kid)
            if (
                channel is None or channel.server.claim is None
                or record.belongs_to != caller.uid or record.owner.get("pid") != caller.pid
            ):  # fmt: skip
                continue
            if await asyncio.to_thread(_stale, record):
                svc.log.info("pool kernel %s: its environment changed; removed", kid)
                await self._remove(kid)
                continue

            def take(current: KernelRecord, kid: str = kid) -> bool:
                pool = current.extra.get("pool")
                if not isinstance(pool, dict) or pool.get("key") != key or not pool.get("ready"):
                    return False  # another start took it
                del current.extra["pool"]
                current.extra["alias"] = jupyter_id
                current.extra["claimed"] = {"pid": pool.get("pid")}
                current.extra["pool_of"] = key  # its restarts refill the pool too
                return True

            if await svc.runtime.store.aupdate(kid, take):
                await asyncio.to_thread(svc.runtime.store.alias, jupyter_id, kid)
                return svc.runtime.record(kid)
        return None

    async def hand_over(
        self, record: KernelRecord, env: dict[str, str], connection: dict[str, Any]
    ) -> tuple[KernelRecord, int | None, str]:
        """Make claimed kernel ``record`` the launched kernel: give it the launch's
        key and environment, thaw it, and wait until it has taken them. Returns its
        record, its host pid and a warning (it started cold instead) or ""."""
        # Here: service.py imports this module.
        from .service import BASE_CONFIRM_TIMEOUT, expect_new_kernel

        svc = self.service
        kid = record.kernel_id
        channel = svc.channels[kid]
        server = channel.server
        await asyncio.to_thread(svc.runtime.lifecycle.boot.write_connection, record, connection)
        expect_new_kernel(server, record, env)
        server.heard.clear()
        warning = ""
        try:
            await svc.runtime.drivers.runc.resume(record.container_id)
        except SandboxError as err:  # its process is gone, say
            warning = f"the kernel taken from the pool could not be thawed ({err})"
        assert server.claim is not None
        if not warning and not server.claim.done():
            server.claim.set_result(None)
        if not warning and not await channel.heard_within(BASE_CONFIRM_TIMEOUT):
            warning = (
                f"the kernel taken from the pool did not take its new key within "
                f"{BASE_CONFIRM_TIMEOUT:.0f} s"
            )
        pid: int | None
        if warning:
            pid = await svc.runtime.start_cold(kid, warning)
        else:
            # Thawing keeps the process: the pid it had when it was made.
            pid = record.extra["claimed"].get("pid") or await svc.runtime.container_pid(kid)

        def launched(current: KernelRecord) -> KernelRecord:
            current.extra.pop("claimed", None)
            return current

        record = await svc.runtime.store.aupdate(kid, launched)
        server.claim = None
        return record, pid, warning

    # ---- filling ------------------------------------------------------------------

    def fill_later(
        self, key: str, argv: list[str], env: dict[str, str], connection: dict[str, Any]
    ) -> None:
        """Bring pool ``key`` up to its size in the background, with kernels launched
        as this start was (``argv``, ``env``; ``connection`` with another key)."""
        pool = self._pools.get(key)
        if pool is None or pool.size == 0:
            return
        pool.launch = (list(argv), dict(env), dict(connection))
        task = asyncio.get_running_loop().create_task(self._fill(key, pool))
        self._tasks[task] = pool.config.caller.pid if pool.config.caller else 0
        task.add_done_callback(lambda done: self._tasks.pop(done, None))

    async def _fill(self, key: str, pool: _Pool) -> None:
        async with pool.lock:
            while len(await asyncio.to_thread(self.members, key)) < pool.size:
                try:
                    await self._add(key, pool)
                except (SandboxError, OSError) as err:
                    self.service.log.warning("the pool of %s is not filled: %s",
                                             pool.config.image, err)  # fmt: skip
                    return

    async def _add(self, key: str, pool: _Pool) -> None:
        """Make one pool kernel: prepared as the start's, restored from its pristine
        base with a key nobody has, left waiting to be claimed, and frozen.

        Raises:
            SandboxError: it could not be made (a quota, no pristine base, a failed
                restore); nothing of it is left.
        """
        from .service import _pristine  # here: service.py imports this module

        svc = self.service
        config = pool.config
        assert pool.launch is not None and config.caller is not None
        argv, env, connection = pool.launch
        kid = str(uuid.uuid4())
        quota = svc.config.quota_for(config.caller)
        async with svc.user_lock(config.caller.uid):
            check_kernel(quota, config.limits, svc.running_limits(config.caller.uid))
            record = await svc.runtime.prepare(kid, config)
        try:

            def pooled(current: KernelRecord) -> KernelRecord:
                current.extra["pool"] = {"key": key, "ready": False}
                return current

            record = await svc.runtime.store.aupdate(kid, pooled)
            record = await _pristine(svc, record, argv, env)
            if record.base is None:
                raise ConfigError("pool", pool.size, f"needs a pristine base: {record.base_note}")
            channel = await svc.open_channel(record, listen=False)
            loop = asyncio.get_running_loop()
            channel.server.claim = loop.create_future()
            channel.server.arrival = {}
            placeholder = {**connection, "key": secrets.token_hex(32)}
            pid = await svc.runtime.start(kid, argv, env, placeholder)
            record = svc.runtime.record(kid)
            if record.start is not Start.BASE:
                raise ConfigError("pool", pool.size, f"needs a pristine base: {record.base_note}")
            await svc.open_channel(record, listen=True)
            try:
                await asyncio.wait_for(channel.server.asked.wait(), READY_TIMEOUT)
            except TimeoutError:
                raise ConfigError(
                    "pool", pool.size,
                    f"kernel {kid} did not wait to be claimed within {READY_TIMEOUT:.0f} s",
                ) from None  # fmt: skip
            await svc.runtime.drivers.runc.pause(record.container_id)

            def ready(current: KernelRecord) -> KernelRecord:
                current.extra["pool"].update(ready=True, pid=pid)
                return current

            await svc.runtime.store.aupdate(kid, ready)
        except BaseException:
            await self._remove(kid)
            raise

    # ---- emptying -----------------------------------------------------------------

    async def _remove(self, kid: str) -> None:
        with contextlib.suppress(SandboxError, OSError):
            await self.service.close_channel(kid)
            await self.service.runtime.remove(kid)

    async def evict(self, uid: int) -> bool:
        """Remove one of user ``uid``'s pool kernels (a start of theirs needs its
        room); whether there was one."""
        for record in await asyncio.to_thread(self.service.runtime.records):
            if record.pooled and record.belongs_to == uid:
                await self._remove(record.kernel_id)
                return True
        return False

    async def drain(self, owner_pid: int | None = None) -> list[str]:
        """Remove every pool kernel not claimed yet (of the server ``owner_pid`` only,
        if given), after the fills under way; their ids."""
        fills = [t for t, pid in self._tasks.items() if owner_pid in (None, pid)]
        for task in fills:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*fills, return_exceptions=True)
        removed = []
        for record in await asyncio.to_thread(self.service.runtime.records):
            if record.pooled and owner_pid in (None, record.owner.get("pid")):
                await self._remove(record.kernel_id)
                removed.append(record.kernel_id)
        return removed


def _stale(record: KernelRecord) -> bool:
    """Whether the pristine base a pool kernel was restored from is stale now."""
    try:
        meta = bases.load(str(record.base))
    except ConfigError:
        return True
    return pristine.is_stale(meta)


def _owned_by(record: KernelRecord, pid: int) -> bool:
    return (record.pooled or bool(record.extra.get("claimed"))) and record.owner.get("pid") == pid


async def drain_owned(pid: int) -> list[str]:
    """Remove every pool kernel of the server ``pid``, with a runtime of its own.
    Their ids."""
    from .runtime import Runtime  # here: runtime.py imports the service's parts

    runtime = Runtime()
    removed = []
    for record in await asyncio.to_thread(runtime.records):
        if _owned_by(record, pid):
            with contextlib.suppress(SandboxError, OSError):
                await runtime.remove(record.kernel_id)
                removed.append(record.kernel_id)
    return removed


def drain_at_exit() -> None:
    """``atexit``: remove this process's pool kernels, which nobody can claim now.

    By a child process: at exit this one can start no thread, and the runtime's
    removal runs blocking steps in threads.
    """
    from .store import KernelStore

    pid = os.getpid()
    if not any(_owned_by(r, pid) for r in KernelStore().records()):
        return
    code = f"import asyncio; from {__name__} import drain_owned; asyncio.run(drain_owned({pid}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:  # at exit: the log may be gone, stderr is not
        print(f"sandbox-kernel: could not remove this server's pool kernels: {done.stderr}",
              file=sys.stderr)  # fmt: skip
