"""A kernel's life: prepare, start (cold or from a base), stop, remove; its limits and use.

The provisioner drives it through the :class:`~sandbox_kernel.runtime.runtime.Runtime`
facade. Every change to a record goes through :meth:`KernelStore.update`, under
the record's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, KernelNotFound, SandboxError

from . import bases, classes, hostpath, layers, paths
from .boot import Boot
from .bundle import CONTAINER_ROOT
from .callers import Caller, as_caller
from .cgroups import Usage
from .drivers import Drivers
from .limits import Limits
from .network import Addresses, check_mode
from .portable import misfit_host
from .pyenv import merge_prefixes, package_dirs, python_prefixes
from .record import KernelRecord, Start
from .rootfs import Rootfs, check_cwd
from .store import KernelStore, private_folder

#: The kernel's ZMQ ports inside its own network namespace; no other process uses them.
#: What each limit is called in messages.
_LIMIT_NAMES = {"memory": "memory limit", "cpus": "cpu limit", "pids": "pids limit"}


@dataclass(frozen=True)
class KernelConfig:
    """How to build one kernel container. Set by the kernelspec through the provisioner.

    Attributes:
        image: image name, e.g. ``host``.
        limits: memory, CPU, pids and disk limits.
        network: ``none`` or ``egress``.
        uid, gid: the unprivileged user the kernel runs as.
        cwd: the notebook's working directory, visible at the same path inside
            (except for a kernel started from a base: see ``bases.py``).
        executable: the kernel's Python; its environment is bound in read-only.
        base: the id of the base snapshot new kernels start from, or empty.
        class_name: the class the kernel belongs to (its current base wins over
            ``base``), or empty.
        pristine: without a base or class, whether the first start restores the
            configuration's pristine base (see ``pristine.py``) instead of starting
            Python.
        shm: the size of /dev/shm in bytes; None: the memory limit.
        caller: who asked (see ``service.py``): the kernel is theirs, their process
            owns it, and ``cwd`` and ``executable`` are opened with their
            credentials. None: this process.
    """

    image: str
    limits: Limits
    network: str
    uid: int
    gid: int
    cwd: str
    executable: str
    base: str = ""
    caller: Caller | None = None
    shm: int | None = None
    class_name: str = ""
    pristine: bool = True


def default_uid(cwd: str, fallback: int = 65534) -> int:
    """The user a kernel runs as when the kernelspec names none.

    When the server is not root, that is the server's own user. When it is root,
    the owner of the working directory, unless that is root too: then ``fallback``.
    """
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        owner = os.stat(cwd).st_uid
    except OSError:
        owner = 0
    return owner if owner != 0 else fallback


def check_caller_access(config: KernelConfig, cwd: hostpath.Identity) -> None:
    """Refuse a working folder the caller cannot read and enter, or a Python they
    cannot run. Called as the caller (see :func:`~.callers.as_caller`).

    Raises:
        ConfigError: naming the path and the fix.
    """
    try:
        fd = os.open(config.cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(
            "working directory", config.cwd,
            f"cannot be read by you ({err.strerror}); start from a folder you own",
        ) from None  # fmt: skip
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (cwd.dev, cwd.ino) or not os.access(
            ".", os.X_OK, dir_fd=fd, effective_ids=True
        ):
            raise ConfigError(
                "working directory", config.cwd,
                "cannot be entered by you, or changed while it was checked; "
                "start from a folder you own",
            )  # fmt: skip
    finally:
        os.close(fd)
    if not os.access(config.executable, os.X_OK, effective_ids=True):
        raise ConfigError(
            "kernel executable", config.executable,
            "cannot be run by you; point the kernelspec at a Python you can run",
        )  # fmt: skip


def _process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_token(pid: int | None = None) -> dict[str, int]:
    """Identifies process ``pid`` (default: this one) even after its pid is reused:
    pid and start time."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": _process_start(pid) or 0}


def owner_alive(owner: dict[str, int]) -> bool:
    """Whether the process that ``owner`` names still runs."""
    return _process_start(owner.get("pid", 0)) == owner.get("start")


def _user_name(uid: int) -> str:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return "kernel"
    return name if name.isidentifier() else "kernel"


def _show(key: str, value: float | None) -> str:
    if value is None:
        return "unlimited"
    return format_size(int(value)) if key == "memory" else f"{value:g}"


def check_ceiling(change: Limits, ceiling: Limits) -> None:
    """Refuse a change a kernel asked for that goes above its ceiling.

    Raises:
        ConfigError: naming the limit, the value, the ceiling and who can go above.
    """
    for key, what in _LIMIT_NAMES.items():
        wanted, top = getattr(change, key), getattr(ceiling, key)
        if wanted is not None and top is not None and wanted > top:
            raise ConfigError(
                what, _show(key, wanted),
                f"is above this kernel's ceiling of {_show(key, top)} (its kernelspec's); "
                "a kernel may lower its limits or raise them back up to that. An operator "
                "can go above it with `sandbox-kernel limits KERNEL_ID`",
            )  # fmt: skip


def raised(ceiling: Limits, change: Limits) -> Limits:
    """The ceiling after an operator's change: raised to any value above it."""
    higher = {}
    for key in _LIMIT_NAMES:
        wanted, top = getattr(change, key), getattr(ceiling, key)
        if wanted is not None and top is not None and wanted > top:
            higher[key] = wanted
    return ceiling.merged(Limits(**higher))


def fitting_base(
    config: KernelConfig, prefixes: list[str]
) -> tuple[dict[str, Any] | None, str, str]:
    """The base a new kernel can start from: (its meta or None, why not, the
    in-container path of the working folder)."""
    base_id = config.base
    try:
        if config.class_name:
            # A class's base is shared with every user of the class: a user other
            # than the teacher gets their own copy (bases.for_user).
            base_id = classes.current_base(config.class_name)
            meta = bases.for_user(base_id, config.uid, config.gid)
        elif not base_id:
            return None, "", config.cwd
        else:
            meta = bases.load(base_id)
    except (SandboxError, OSError) as err:
        return None, str(err), config.cwd
    why = misfit(meta, config.image, config.uid, config.gid, config.executable, prefixes)
    if why:
        return None, why, config.cwd
    return meta, "", str(meta["cwd_inside"])


def misfit(
    meta: dict[str, Any], image: str, uid: int, gid: int, executable: str, prefixes: list[str]
) -> str:
    """Why base ``meta`` cannot be restored into a kernel of these settings, or "":
    its process finds the mounts it was dumped with, and keeps its user."""
    wanted = {
        "image": image, "uid": uid, "gid": gid,
        "executable": executable, "python_prefixes": prefixes,
    }  # fmt: skip
    for key, value in wanted.items():
        if key not in meta:
            return "its snapshot is older than base snapshots; take it again"
        if meta[key] != value:
            return f"its {key.replace('_', ' ')} is {meta[key]!r}, not {value!r}"
    return misfit_host(meta.get("host"))


def follow_class(
    store: KernelStore, record: KernelRecord, log: Callable[[str], None]
) -> KernelRecord:
    """Before a class kernel's restart or reset: take its class's current base, if
    it was published again since and fits this kernel's mounts and user (else the
    kernel keeps its own base, and ``log`` says why). Blocks."""
    if not record.class_name:
        return record
    try:
        meta = bases.for_user(classes.current_base(record.class_name), record.uid, record.gid)
    except (SandboxError, OSError) as err:
        log(f"keeps its base: {err}")
        return record
    base_id = meta["id"]
    if base_id == record.base:
        return record
    why = misfit(
        meta, record.image, record.uid, record.gid, record.executable, record.python_prefixes
    )
    if not why and (meta["layers"] != record.layers or meta["cwd_inside"] != record.cwd_inside):
        why = "its files or working folder are mounted elsewhere than this kernel's"
    if why:
        log(f"keeps its base: the class {record.class_name}'s new base does not fit: {why}")
        return record

    def take(current: KernelRecord) -> KernelRecord:
        current.base = base_id
        return current

    return store.update(record.kernel_id, take)


class Lifecycle:
    """Prepares, starts, stops and removes kernels, and changes their limits."""

    def __init__(self, drivers: Drivers, store: KernelStore, rootfs: Rootfs, boot: Boot) -> None:
        self.drivers = drivers
        self.store = store
        self.rootfs = rootfs
        self.boot = boot

    # ---- prepare --------------------------------------------------------------------

    def prepare(self, kernel_id: str, config: KernelConfig) -> KernelRecord:
        """Make the kernel's folder, layers and address; return its record. A kernel
        that has a record already (a restart) is adopted as it is. Blocks: the
        facade runs it in a thread.

        Raises:
            ConfigError, ImageNotFound: the configuration cannot be used; nothing is made.
        """
        kdir = self.store.kernel_dir(kernel_id)
        if self.store.exists(kernel_id):
            return self.adopt(kernel_id, config.caller.pid if config.caller else None)
        record = self._new_record(kernel_id, config)
        paths.state_dir().mkdir(parents=True, exist_ok=True)
        private_folder(paths.kernels_dir())
        if kdir.exists():
            raise ConfigError(
                "kernel id", kernel_id, "has a folder but no record; run `sandbox-kernel gc`"
            )
        private_folder(kdir)
        try:
            record.index = self.drivers.network.reserve_index(kernel_id)
            record.kernel_ip = Addresses.of(record.index).kernel_ip
            self.store.create(record)
            self.drivers.volume.ensure_volume()
            self.rootfs.make_run_dir(record)
            self.rootfs.make_layer(kdir, record)
        except BaseException:
            self.rootfs.remove(kdir)
            if record.index >= 0:
                self.drivers.network.release_index(record.index)
            raise
        return record

    def _new_record(self, kernel_id: str, config: KernelConfig) -> KernelRecord:
        """The record of a new kernel, from its checked configuration; its address
        is not reserved yet (``index`` -1)."""
        layers.check_image_name(config.image)
        check_mode(config.network)
        self.drivers.volume.check_disk_size(config.limits.disk)
        for what, value in (("kernel_uid", config.uid), ("kernel_gid", config.gid)):
            if value == CONTAINER_ROOT:
                raise ConfigError(
                    what, str(value),
                    "is the host id that root inside every kernel maps to; choose another",
                )  # fmt: skip
        # The caller's paths are opened as the caller; this package's own folders
        # (bound in so the kernel finds the magic) as root.
        own = package_dirs()
        with as_caller(config.caller):
            cwd, cwd_identity = check_cwd(config.cwd)
            if config.caller is not None and not config.caller.is_root:
                check_caller_access(config, cwd_identity)
            prefixes = merge_prefixes([*python_prefixes(config.executable), *own])
            theirs = {
                p: hostpath.first_use(str(p), "Python prefix")[0] for p in prefixes if p not in own
            }
        identities = [
            theirs.get(p) or hostpath.first_use(str(p), "Python prefix")[0] for p in prefixes
        ]
        image_layers = layers.image_layers(config.image)
        base, why_cold, inside = fitting_base(config, [str(p) for p in prefixes])
        if base is not None and base["layers"][1:] != image_layers:
            base, why_cold, inside = None, "its image's files differ from this kernel's", str(cwd)
        # A base brings its own mount-point layer: the mounts are the ones it was
        # dumped with (a kernel from a pristine base has its folder's in its files).
        points = base["layers"][0] if base else layers.mountpoint_layer([*prefixes, Path(inside)])
        user = _user_name(config.uid)
        return KernelRecord(
            kernel_id=kernel_id, container_id=paths.container_id(kernel_id),
            hostname=f"kernel-{kernel_id[:8]}", image=config.image,
            layers=[points, *image_layers], executable=config.executable,
            python_prefixes=[str(p) for p in prefixes], prefix_identities=identities,
            cwd=str(cwd), cwd_identity=cwd_identity, cwd_inside=inside,
            # The ceiling is what the kernel may raise its limits back up to: the
            # kernelspec's. Only an operator goes above (see update_limits).
            limits=config.limits, ceiling=config.limits,
            network=config.network, index=-1, kernel_ip="",
            uid=config.uid, gid=config.gid, user=user, home=f"/home/{user}",
            created=time.time(),
            owner=owner_token(config.caller.pid if config.caller else None),
            owner_uid=config.caller.uid if config.caller else config.uid, shm=config.shm,
            class_name=config.class_name or None,
            base=base["id"] if base else None, base_note=why_cold,
            # A kernel with no base to try says so from the start: one write less.
            start=Start.PENDING if base or why_cold else Start.IMAGE,
            extra={} if config.pristine else {"pristine": ""},
        )  # fmt: skip

    def adopt(self, kernel_id: str, pid: int | None = None) -> KernelRecord:
        """Make process ``pid`` (default: this one) the owner of a kernel another
        process started.

        Called by ``load_provisioner_info`` when a restarted server re-adopts its
        kernels; ``gc`` leaves kernels with a live owner alone.
        """

        def take(record: KernelRecord) -> KernelRecord:
            record.owner = owner_token(pid)
            record.adopt()
            return record

        return self.store.update(kernel_id, take)

    # ---- start and stop -------------------------------------------------------------

    async def start(
        self, kernel_id: str, argv: list[str], env: dict[str, str], connection: dict[str, Any]
    ) -> int:
        """Start kernel ``kernel_id`` (prepared before) running ``argv``; return its host
        pid. A kernel with a base (a class kernel) restores it at every start: a
        restart lands on the base's files and memory, as a reset does. Where the
        base fails, the kernel starts cold and says why.

        Raises:
            CommandError: runc, ip or nft failed; mounts made so far are undone.
        """
        kdir = self.store.kernel_dir(kernel_id)
        record = self.store.load(kernel_id)
        if record.wants_base and record.start is not Start.PENDING and not record.pristine_cwd:
            # A pristine base's kernel keeps its files, as a cold kernel's restart does.
            record = await asyncio.to_thread(self._base_files_again, kdir, record)
        await asyncio.to_thread(self._ready, kdir, record, argv, env, connection)
        try:
            if record.wants_base:
                return (await self.start_from_base(kdir, record))[0]
            pid = await self.boot.run(kdir, record)
            if record.start is Start.PENDING:  # else it says so already
                await self.store.aupdate(kernel_id, lambda r: r.started_cold())
            return pid
        except BaseException:
            # Undo what was done; the error that stopped the start is the one raised.
            with contextlib.suppress(SandboxError):
                await self.drivers.runc.delete(record.container_id)
            self.rootfs.unmount(kdir)
            raise

    def use_pristine(self, kernel_id: str, meta: dict[str, Any]) -> KernelRecord:
        """Before a kernel's first start: make pristine base ``meta`` its base (see
        ``pristine.py``). Its files become the base's; its working folder stays its
        own (the base's images are relocated to it at each restore). Blocks."""

        def take(record: KernelRecord) -> KernelRecord:
            record.base, record.base_note = meta["id"], ""
            record.layers = list(meta["layers"])
            record.pristine_cwd = str(meta["cwd_inside"])
            record.start = Start.PENDING
            return record

        record = self.store.update(kernel_id, take)
        self.rootfs.layer_from(record, bases.base_dir(meta["id"]), meta)
        return record

    def _base_files_again(self, kdir: Path, record: KernelRecord) -> KernelRecord:
        """Before a class kernel's restart: its files go back to the base's, which the
        base's memory expects. A base that is gone leaves them (the start then falls
        back to cold and says why). Blocks: in a thread."""
        record = follow_class(
            self.store, record, lambda text: self.rootfs.append_log(record.kernel_id, text)
        )
        assert record.base is not None
        try:
            meta = bases.load(record.base)
        except ConfigError:
            return record
        self.rootfs.unmount(kdir)
        self.rootfs.layer_from(record, bases.base_dir(record.base), meta)

        def from_the_base(current: KernelRecord) -> KernelRecord:
            current.snapshot = None  # the next snapshot's parent: none but the base
            return current

        return self.store.update(record.kernel_id, from_the_base)

    def _ready(
        self,
        kdir: Path,
        record: KernelRecord,
        argv: list[str],
        env: dict[str, str],
        connection: dict[str, Any],
    ) -> None:
        """Write the kernel's bundle and mount its filesystems. Blocks: in a thread."""
        # A new process: no frontend connections to wait for (see restoring.PEERS).
        (self.rootfs.run_dir(record.kernel_id) / "peers.json").unlink(missing_ok=True)
        self.rootfs.trim_log(record.kernel_id)  # room for the files below
        self.boot.write_bundle(kdir, record, argv, env, connection)
        self.rootfs.mount(kdir, record)

    async def start_from_base(
        self, kdir: Path, record: KernelRecord, what: str = "started"
    ) -> tuple[int, str]:
        """Start the kernel (its files the base's, mounted) by restoring its base's
        memory; cold where that fails, with the reason in the record's ``base_note``
        and the kernel's log (``what`` names the start there). Returns (the host pid,
        the reason it started cold or ""). Also a reset's (``Restorer``)."""
        try:
            # The restored process has its stdio open on the log (see bundle.py).
            pid = await self.boot.restore_base(kdir, record)
        except SandboxError as err:
            note = f"the base could not be restored: {err}"
            self.rootfs.append_log(record.kernel_id, f"{what} cold: {note}")
            with contextlib.suppress(SandboxError):
                await self.drivers.runc.delete(record.container_id)
            pid = await self.boot.run(kdir, record)
            await self.store.aupdate(record.kernel_id, lambda r: r.started_cold(note))
            return pid, note
        await self.store.aupdate(record.kernel_id, lambda r: r.started_from_base())
        return pid, ""

    async def start_cold(self, kernel_id: str, note: str) -> int:
        """Replace kernel ``kernel_id``'s process by a cold start on the same files
        (a base restore that went wrong); return the new host pid."""
        async with self.store.exclusive(kernel_id):
            record = self.store.load(kernel_id)
            await self.drivers.runc.delete(record.container_id)
            await self.store.aupdate(kernel_id, lambda r: r.started_cold(note))
            self.rootfs.append_log(kernel_id, f"started cold: {note}")
            return await self.boot.run(self.store.kernel_dir(kernel_id), record)

    async def stop(self, kernel_id: str) -> None:
        """Kill and delete the container and unmount its filesystems.

        The writable layer and the network stay, for a restart. Called by the
        provisioner's ``cleanup(restart=True)`` and by :meth:`remove`.
        """
        record = self.store.load(kernel_id)
        try:
            await self.drivers.runc.delete(record.container_id)
        finally:
            await asyncio.to_thread(self.rootfs.unmount, self.store.kernel_dir(kernel_id))

    async def remove(self, kernel_id: str) -> None:
        """Remove every trace of kernel ``kernel_id``: container, mounts, netns, veth,
        cgroup, addresses and its writable layer. A kernel that is gone is fine.
        """
        try:
            record = self.store.load(kernel_id)
        except KernelNotFound:
            return
        kernel_id = record.kernel_id  # ``kernel_id`` may be its alias
        # Every step runs even if one before it failed; the first error is raised last.
        errors: list[BaseException] = []
        try:
            await self.stop(kernel_id)
        except SandboxError as err:
            errors.append(err)
        try:
            addr = Addresses.of(record.index)
            await self.drivers.network.destroy(addr, egress=record.network == "egress")
        except SandboxError as err:
            errors.append(err)
        self.drivers.network.release_index(record.index)
        # The writable layer can hold gigabytes: delete it off the event loop.
        await asyncio.to_thread(self.rootfs.remove, self.store.kernel_dir(kernel_id))
        if record.public_id != kernel_id:
            self.store.unalias(record.public_id)
        if errors:
            raise errors[0]

    async def container_pid(self, kernel_id: str) -> int | None:
        """The host pid of the kernel's init if its container runs, else None.

        Waits for a snapshot or restore of the kernel in progress to finish first.
        """
        record = self.store.load(kernel_id)
        async with self.store.exclusive(kernel_id):
            pass
        state = await self.drivers.runc.state(record.container_id)
        if not state or state.get("status") not in ("running", "created", "paused"):
            return None
        pid = state.get("pid")
        return int(pid) if pid else None

    # ---- limits and use -------------------------------------------------------------

    async def update_limits(self, kernel_id: str, limits: Limits, operator: bool = False) -> Limits:
        """Change the limits of a running kernel; only the limits ``limits`` sets.

        Returns the kernel's limits after the change, which also apply after a
        restart or a restore. The disk size can only be set at start. Needs no
        operation lock: a snapshot running meanwhile keeps the change.

        The kernel itself (through its control server, ``operator`` False) may lower
        a limit, or raise it back up to its ceiling: the kernelspec's values, kept in
        the kernel's record where the kernel cannot reach. An operator (the CLI as
        root) may go above; the ceiling then rises with the new value.

        Raises:
            ConfigError: a disk size was given, memory below what the kernel uses, or
                (not ``operator``) a limit above the ceiling.
            CommandError: runc refused the change; the record is unchanged.
        """
        if limits.disk is not None:
            raise ConfigError(
                "disk size",
                format_size(limits.disk),
                "can only be set when the kernel starts; reinstall the kernelspec",
            )
        record = self.store.load(kernel_id)
        if not operator:
            check_ceiling(limits, record.ceiling)
        use = self.usage(record)
        if limits.memory and use and use.memory and limits.memory < use.memory:
            raise ConfigError(
                "memory limit", format_size(limits.memory),
                f"is below what the kernel uses now ({format_size(use.memory)}); "
                "free memory first or choose a larger limit",
            )  # fmt: skip
        swap = self.drivers.cgroups.swap_limit_supported()
        await self.drivers.runc.update(record.container_id, limits, swap)

        def apply(current: KernelRecord) -> Limits:
            current.limits = current.limits.merged(limits)
            current.ceiling = raised(current.ceiling, limits)
            return current.limits

        return await self.store.aupdate(kernel_id, apply)

    def usage(self, record: KernelRecord) -> Usage | None:
        """What the kernel uses now, against its limits; None if its container is gone."""
        return self.drivers.cgroups.usage(paths.cgroup_of(record.container_id))
