"""Finding or making a kernel's pristine base at its first launch (see ``pristine.py``).

Called by the service's ``launch`` operation. The first launch of a configuration
makes the base from a template kernel, which the service starts, hears from,
snapshots and removes, all before that launch goes on; launches of the same
configuration meanwhile (in this process or another) wait for it on a lock and
then find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox_kernel.errors import SandboxError

from . import bases, paths, pristine, snapshots
from .checkpoint import criu_binary
from .fsutil import aflocked
from .lifecycle import KernelConfig
from .ports import KERNEL_PORTS
from .record import KernelRecord

if TYPE_CHECKING:
    from .service import KernelService

#: How long a template kernel has to load the ``%container`` magic.
TEMPLATE_TIMEOUT = 60.0
#: After a failed making, the configuration's kernels start cold this long before
#: the next try (seconds).
RETRY_AFTER = 3600.0


async def find_or_make(
    svc: KernelService, record: KernelRecord, argv: list[str], env: dict[str, str]
) -> tuple[dict[str, Any] | None, str]:
    """The pristine base kernel ``record`` launched with ``argv`` and ``env`` can start
    from, made if there is none: (its meta, "") or (None, why not)."""
    try:
        criu = await asyncio.to_thread(criu_binary)
        data = await asyncio.to_thread(pristine.inputs, record, argv, env, criu)
    except (SandboxError, OSError) as err:
        return None, f"no pristine base: {err}"
    key = pristine.fingerprint(data)
    meta = await asyncio.to_thread(pristine.find, key)
    if meta is not None:
        return meta, ""
    folder = paths.state_dir() / "pristine"
    failed = folder / f"{key}.failed"
    why = _recent_failure(failed)
    if why:
        return None, why
    lock = svc.pristine_locks.setdefault(key, asyncio.Lock())
    async with lock:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        async with aflocked(folder / f"{key}.lock"):  # another process's launches
            meta = await asyncio.to_thread(pristine.find, key)
            if meta is not None:
                return meta, ""
            why = _recent_failure(failed)
            if why:
                return None, why
            try:
                return await _make(svc, record, argv, env, key, data), ""
            except (SandboxError, OSError) as err:
                svc.log.warning("could not make a pristine base for %s: %s",
                                record.describe(), err)  # fmt: skip
                # Not tried again for a while: a kernel that never loads the magic
                # would cost every start the template's timeout.
                with contextlib.suppress(OSError):
                    failed.write_text(str(err))
                return None, f"its pristine base could not be made: {err}"


def _recent_failure(marker: Path) -> str:
    """Why this configuration's pristine base could not be made, if that was
    less than :data:`RETRY_AFTER` ago; else ""."""
    try:
        age = time.time() - marker.stat().st_mtime
        text = marker.read_text()[:500]
    except OSError:
        return ""
    if age > RETRY_AFTER:
        return ""
    return f"its pristine base could not be made {age / 60:.0f} min ago: {text}"


async def _make(
    svc: KernelService,
    record: KernelRecord,
    argv: list[str],
    env: dict[str, str],
    key: str,
    data: dict[str, Any],
) -> dict[str, Any]:
    """Start a template kernel like ``record`` in an empty folder, snapshot it once
    its magic is up, make the snapshot a base, remove the rest; the base's meta."""
    started = time.monotonic()
    runtime = svc.runtime
    kid = str(uuid.uuid4())
    config = KernelConfig(
        image=record.image, limits=record.ceiling, network=record.network,
        uid=record.uid, gid=record.gid, cwd=str(await asyncio.to_thread(pristine.template_cwd)),
        executable=record.executable, shm=record.shm,
    )  # fmt: skip
    owner, name = str(record.uid), pristine.SNAPSHOT_PREFIX + key[:16]
    template: KernelRecord | None = None
    try:
        template = await runtime.prepare(kid, config)
        channel = await svc.open_channel(template, listen=False)
        connection = {
            **KERNEL_PORTS, "ip": template.kernel_ip, "transport": "tcp",
            "key": secrets.token_hex(32), "signature_scheme": "hmac-sha256", "kernel_name": "",
        }  # fmt: skip
        await runtime.start(kid, argv, env, connection)
        await channel.listen()
        if not await channel.heard_within(TEMPLATE_TIMEOUT):
            raise SandboxError(
                f"the template kernel did not load the %container magic within "
                f"{TEMPLATE_TIMEOUT:.0f} s; its log: {runtime.log_path(kid)}"
            )
        await runtime.snapshot(kid, name)
        extra = {"pristine": {"key": key, "inputs": data}}
        meta = await asyncio.to_thread(bases.make_base, owner, name, extra)
    finally:
        with contextlib.suppress(SandboxError, OSError):
            if name in await asyncio.to_thread(snapshots.names, owner, True):
                await asyncio.to_thread(snapshots.delete, owner, name)
        if template is not None:
            await svc.close_channel(kid)
            with contextlib.suppress(SandboxError, OSError):
                await runtime.remove(kid)
    svc.log.info(
        "made pristine base %s for %s in %.2f s",
        meta["id"], record.describe(), time.monotonic() - started,
    )  # fmt: skip
    return meta
