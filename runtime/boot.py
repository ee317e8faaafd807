"""Boot: a prepared kernel folder becomes a running container.

Either cold (``runc create`` then ``runc start``, with the network joined in
between) or from CRIU images (``runc restore``: a snapshot's, or a base's). Both
return the host pid of the container's init. The mounts are the caller's
(``rootfs.py``); what runc reads is written here: the OCI bundle, the CRIU config
and the network's action script.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import SandboxError

from . import bases, paths, pristine
from .bundle import CONTAINER_ROOT, SpecParams, make_spec, resources
from .drivers import Drivers
from .fsutil import give, read_json, write_json
from .limits import parse_size
from .network import Addresses
from .record import KernelRecord
from .rootfs import Rootfs, kernel_path

#: Sets a UTS namespace's hostname (Debian's hostname package is essential).
HOSTNAME_BINARY = "/bin/hostname"


def lazy_restore_size() -> int:
    """Memory images at least this big are restored lazily (see ``runc.restore``):
    ``$SANDBOX_KERNEL_LAZY_RESTORE`` (a size, or ``off``), default 256M."""
    value = os.environ.get("SANDBOX_KERNEL_LAZY_RESTORE", "256M")
    if value.strip().lower() == "off":
        return 1 << 62
    return parse_size(value, "lazy restore size")


def fresh_work(kdir: Path) -> Path:
    """An empty CRIU work folder (logs, stats, lazy-pages socket) for a kernel."""
    work = kdir / "criu-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


class Boot:
    """Writes a kernel's bundle and runs or restores its container."""

    def __init__(self, drivers: Drivers, rootfs: Rootfs) -> None:
        self.runc = drivers.runc
        self.criu = drivers.criu
        self.network = drivers.network
        self.cgroups = drivers.cgroups
        self.rootfs = rootfs

    def criu_config(self, kdir: Path, extra: str = "") -> None:
        """Write the kernel's CRIU config (its bundle names it): the options of every
        dump and restore, and ``extra``."""
        (kdir / "criu.conf").write_text(self.criu.BASE_CONFIG + extra)

    def write_bundle(
        self,
        kdir: Path,
        record: KernelRecord,
        argv: list[str],
        env: dict[str, str],
        connection: dict[str, Any],
    ) -> None:
        """Write what a start needs: the kernel's connection file (binding every
        interface of its own network namespace), its /etc files, the CRIU config and
        the OCI bundle. ``env`` is the kernel's environment before the runtime adds
        the user's names and ``PATH``."""
        self.write_connection(record, connection)
        self.rootfs.write_etc(kdir / "etc", record)
        env = {
            **env,
            "HOME": record.home,
            "USER": record.user,
            "LOGNAME": record.user,
            "HOSTNAME": record.hostname,
            "PATH": kernel_path(record, argv[0]),
        }
        spec = make_spec(
            SpecParams(
                argv=argv,
                env=env,
                cwd=record.cwd_inside,
                uid=record.uid,
                gid=record.gid,
                hostname=record.hostname,
                cgroups_path=f"/{paths.cgroup_of(record.container_id)}",
                limits=record.limits,
                fsize=record.limits.disk,
                init=paths.tini_binary(),
                binds=self.rootfs.binds(kdir, record),
                memory_swap=self.cgroups.swap_limit_supported(),
                criu_config=kdir / "criu.conf",
                root_id=CONTAINER_ROOT,
                cgroup_binds=self.rootfs.cgroup_binds(record),
                shm=record.shm,
            )
        )
        self.criu_config(kdir)
        write_json(kdir / "config.json", spec)

    def write_connection(self, record: KernelRecord, connection: dict[str, Any]) -> None:
        """Write the kernel's connection file (read-only, the kernel user's), binding
        every interface of its own network namespace."""
        inside = {k: v.decode() if isinstance(v, bytes) else v for k, v in connection.items()}
        inside["ip"] = "0.0.0.0"
        conn_path = self.rootfs.run_dir(record.kernel_id) / "connection.json"
        conn_path.unlink(missing_ok=True)
        write_json(conn_path, inside, mode=0o400)
        give(conn_path, record.uid, record.gid)

    async def run(self, kdir: Path, record: KernelRecord) -> int:
        """Start the kernel's container from its bundle; return its init's host pid.

        runc makes the namespaces; the runtime sets up the namespace's side of
        the network, then the kernel's process starts while the host's side is
        done (see ``network.attach``).

        Raises:
            CommandError: runc, ip or nft failed; the container is deleted again.
        """
        addr = Addresses.of(record.index)
        await self.network.remove_stale_veth(addr)
        self._current_limits(kdir, record)
        pid = await self.runc.create(record.container_id, kdir, kdir / "container.pid")
        try:
            egress = record.network == "egress"
            await self.network.attach(pid, addr, egress)
            steps = [self.runc.start(record.container_id), self.network.attach_host(addr, egress)]
            for result in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            with contextlib.suppress(SandboxError):
                await self.runc.delete(record.container_id)
            raise
        return pid

    async def restore(
        self,
        kdir: Path,
        record: KernelRecord,
        criu: str,
        images: Path,
        lazy_lock: Path | None = None,
    ) -> int:
        """``runc restore`` the kernel from the CRIU ``images``; return its init's pid.

        CRIU brings back the kernel's namespaces; an action script joins its
        network namespace to the host before the processes run again (see
        ``network.restore_script``). The images may be another kernel's (a base).
        With ``lazy_lock``, pages are served on demand while the lock is held (see
        ``runc.restore``).

        Raises:
            CommandError: the restore failed.
        """
        addr = Addresses.of(record.index)
        egress = record.network == "egress"
        await self.network.remove_stale_veth(addr)
        script = kdir / "criu-network.sh"
        text = self.network.restore_script(addr, egress) + _hostname_line(record.hostname)
        if not script.exists() or script.read_text() != text:
            # Written again whenever it changes (it names this process); nothing
            # is lost if a crash cuts the write short, so there is no fsync.
            script.write_text(text)
            script.chmod(0o700)
        self._current_limits(kdir, record)
        self.criu_config(kdir, f"action-script {script}\n")
        work = fresh_work(kdir)
        window = self.criu.userfaultfd_window() if lazy_lock else contextlib.nullcontext()
        try:
            wrapped, env = self.criu.restore_command(criu, paths.cgroup_of(record.container_id))
            async with window:
                pid = await self.runc.restore(
                    record.container_id, wrapped, kdir, images, work,
                    kdir / "container.pid", lazy_lock, env=env,
                )  # fmt: skip
        finally:
            self.criu_config(kdir)
        if egress:
            await self.network.allow_egress(addr.veth)
        return pid

    async def restore_base(self, kdir: Path, record: KernelRecord) -> int:
        """Restore the memory of the kernel's base (its files must be the base's by
        now); return its init's pid.

        Raises:
            SandboxError: CRIU is missing, the base is gone or damaged, or the
                restore failed.
        """
        assert record.base is not None
        criu = self.criu.criu_binary()
        await asyncio.to_thread(bases.verify, record.base)
        images = bases.base_dir(record.base) / "criu"
        if record.pristine_cwd and record.pristine_cwd != record.cwd_inside:
            # The template's working folder is mounted, and open, at the kernel's own.
            images = await asyncio.to_thread(
                pristine.relocated, bases.base_dir(record.base), record.pristine_cwd,
                record.cwd_inside,
            )  # fmt: skip
        return await self.restore(kdir, record, criu, images)

    def _current_limits(self, kdir: Path, record: KernelRecord) -> None:
        """Put the record's limits in the bundle: they may have changed live since it
        was written, and runc makes the new container's cgroup from it."""
        bundle = kdir / "config.json"
        spec = read_json(bundle)
        wanted = resources(record.limits, self.cgroups.swap_limit_supported())
        if spec["linux"].get("resources") != wanted:
            spec["linux"]["resources"] = wanted
            write_json(bundle, spec)


def _hostname_line(hostname: str) -> str:
    """The action script's line that names the restored kernel as itself: CRIU
    brings back the UTS namespace of the kernel that was dumped, and a base's is
    another kernel's."""
    uts = '--uts=/proc/"$CRTOOLS_INIT_PID"/ns/uts'
    return f"{paths.nsenter_binary()} {uts} {HOSTNAME_BINARY} {shlex.quote(hostname)}\n"
