"""The service's class operations: publish a class, reset or list its kernels.

Registered in the service's table (``service.OPS``) when ``service.py`` is imported.
A class belongs to the user who published it first: only they (or an admin)
publish it again, reset its kernels or list them. Publishing needs root, an admin,
the daemon config's ``teacher_group``, or a service in a root Jupyter server's own
process (whose user is the operator), since a class's kernelspec is seen by every
user of the machine.
"""

from __future__ import annotations

import asyncio
import pwd
import time
from typing import Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, SandboxError

from . import bases, classes
from .callers import Caller
from .limits import Limits
from .service import KernelService, _op

#: Kernels of one class reset at once: each restore is mostly I/O.
RESETS_AT_ONCE = 4
#: The longest display name of a class's kernelspec (every user's launcher shows it).
MAX_DISPLAY_NAME = 80


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _own_class(svc: KernelService, caller: Caller, name: object) -> dict[str, Any]:
    """Class ``name``, if ``caller`` owns it or is an admin; another's is not found."""
    meta = classes.load(classes.check_name(name))
    if meta["owner_uid"] != caller.uid and not svc.config.is_admin(caller):
        raise ConfigError(
            "class", name, "does not exist; `sandbox-kernel class ps` lists your classes"
        )
    return meta


def _spec_config(args: dict[str, Any]) -> dict[str, Any]:
    """The provisioner settings of a class's kernelspec from the publish request."""
    from sandbox_kernel.kernelspec import provisioner_config

    limits = Limits.parse(**(args.get("limits") or {}))
    defaults = Limits.parse(memory="2G", cpus="1", pids="512", disk="10G")
    merged = defaults.merged(limits)
    network = str(args.get("network") or "none")
    config = provisioner_config("host", merged, network)
    del config["image"]  # the base's
    return config


@_op("class_publish")
async def _class_publish(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Make or replace class ``name``'s base from the caller's live snapshot
    ``snapshot``, and write its kernelspec. A replaced base is deleted once no kernel
    uses it (running kernels keep theirs until they restart or are reset)."""
    name = classes.check_name(args["name"])
    if not (svc.in_process or svc.config.may_teach(caller)):
        raise ConfigError(
            "class publish", name,
            "needs root, an admin or the daemon's teacher_group; ask your operator",
        )  # fmt: skip
    try:
        _own_class(svc, caller, name)
    except ConfigError:
        if any(m["name"] == name for m in await asyncio.to_thread(classes.listing)):
            raise ConfigError("class", name, "is another user's; choose another name") from None
    if args.get("owner") is None and svc.config.is_admin(caller):
        # An admin's: the one user who has a snapshot of that name.
        owner = await asyncio.to_thread(bases.find_owner, str(args["snapshot"]))
    else:
        owner = svc.snapshot_owner(caller, args.get("owner"))
    config = _spec_config(args)
    shown = str(args.get("display_name") or "")
    if len(shown) > MAX_DISPLAY_NAME or not shown.isprintable():
        raise ConfigError(
            "--display-name", shown[:MAX_DISPLAY_NAME],
            f"must be printable and at most {MAX_DISPLAY_NAME} characters",
        )  # fmt: skip
    started = time.monotonic()
    meta, replaced = await asyncio.to_thread(
        classes.publish, name, caller.uid, owner, args["snapshot"], shown
    )
    base = await asyncio.to_thread(bases.load, meta["base"])
    folder = await asyncio.to_thread(
        classes.write_kernelspec, meta, classes.kernelspec(meta, base, config)
    )
    await asyncio.to_thread(
        classes.retire_unused, {r.base for r in svc.runtime.records() if r.base}
    )
    svc.log.info(
        "class %s published by uid %s: base %s from snapshot %s (memory %s), kernelspec %s, %.2f s",
        name, caller.uid, meta["base"], meta["snapshot"], format_size(base["memory_bytes"]),
        folder, time.monotonic() - started,
    )  # fmt: skip
    svc.emit({"event": "class", "action": "publish", "name": name, "owner_uid": caller.uid})
    return {**meta, "kernelspec_dir": str(folder), "replaced": replaced}


@_op("class_reset")
async def _class_reset(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Reset every running kernel of class ``name`` to the class's current base; one
    row per kernel, with the error of any that failed (the others go on)."""
    meta = _own_class(svc, caller, args["name"])
    records = [r for r in svc.runtime.records() if r.class_name == meta["name"]]
    gate = asyncio.Semaphore(RESETS_AT_ONCE)

    async def reset(kernel_id: str, uid: int) -> dict[str, Any]:
        row: dict[str, Any] = {"kernel_id": kernel_id, "user": _user(uid)}
        async with gate:
            try:
                if await svc.runtime.container_pid(kernel_id) is None:
                    return {**row, "to": "", "error": "not running"}
                done = await svc.reset(kernel_id)
            except SandboxError as err:
                return {**row, "to": "", "error": str(err)}
        return {**row, "to": done["to"], "error": done.get("note", "")}

    started = time.monotonic()
    rows = await asyncio.gather(*(reset(r.kernel_id, r.belongs_to) for r in records))
    used = {r.base for r in svc.runtime.records() if r.base}
    await asyncio.to_thread(classes.retire_unused, used)
    svc.log.info(
        "class %s reset by uid %s: %d kernels, %d failed, %.2f s",
        meta["name"], caller.uid, len(rows), sum(1 for r in rows if r["to"] == ""),
        time.monotonic() - started,
    )  # fmt: skip
    svc.emit({"event": "class", "action": "reset", "name": meta["name"], "owner_uid": caller.uid})
    return rows


@_op("class_ps")
async def _class_ps(svc: KernelService, caller: Caller, args: dict[str, Any], _: Any) -> Any:
    """Without ``name``: the caller's classes (every class for an admin). With it:
    that class and its kernels, each with its user, base and memory in use."""
    if not args.get("name"):
        admin = svc.config.is_admin(caller)
        metas = await asyncio.to_thread(classes.listing)
        records = svc.runtime.records()
        return {
            "classes": [
                {**m, "kernels": sum(1 for r in records if r.class_name == m["name"])}
                for m in metas
                if admin or m["owner_uid"] == caller.uid
            ]
        }
    meta = _own_class(svc, caller, args["name"])
    rows = []
    for record in svc.runtime.records():
        if record.class_name != meta["name"]:
            continue
        use = svc.runtime.usage(record)
        rows.append({
            "kernel_id": record.kernel_id, "user": _user(record.belongs_to),
            "start": record.start.value, "base": record.base,
            "current": record.base == meta["base"], "created": record.created,
            "memory_bytes": use.memory if use else None, "note": record.base_note,
        })  # fmt: skip
    return {"class": meta, "kernels": rows}
