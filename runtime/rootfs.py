"""One kernel's filesystems: its writable layer, run folder, mounts and binds.

A kernel's folder ``kernels/<kernel_id>/`` holds:

- ``record.json``: what the kernel is (see ``record.py``);
- ``rootfs/`` and ``mnt/cwd/``: where the two overlays are mounted;
- ``mnt/prefix-N``: its Python prefixes, bound there first (see :meth:`Rootfs.mount`);
- ``run/``: the run folder's mount point, at /run/sandbox inside;
- ``etc/``: its own passwd, group, hosts, hostname and resolv.conf;
- ``config.json``: the OCI bundle runc runs (see ``boot.py``).

Its writable layer (the ``root`` and ``cwd`` overlay uppers, with their work
folders) is the btrfs subvolume ``volume/kernels/<kernel_id>``, held to the
kernel's ``disk`` size; its run folder is ``volume/run/<kernel_id>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, SandboxError

from . import hostpath, layers, paths, volume
from .bundle import RUN_DIR, Bind
from .drivers import Drivers
from .fsutil import give
from .pyenv import home_template
from .record import KernelRecord

#: Working directories a kernel may not be started in: they would shadow the system.
FORBIDDEN_CWDS = (Path("/"), Path("/usr"), Path("/etc"), Path("/proc"), Path("/sys"),
                  Path("/dev"), Path("/run"), Path("/boot"))  # fmt: skip
#: The kernel's run folder (its log) holds at most this many bytes: a btrfs quota,
#: on the volume rather than the host's root filesystem.
LOG_CAP = 64 << 20
#: Past this size the log is trimmed to its last :data:`LOG_KEEP` bytes.
LOG_TRIM_AT = 48 << 20
LOG_KEEP = 8 << 20
#: The v1 controllers whose files tell a kernel its limits and use (Python tools
#: read the CPU quota and the memory limit there); the others are not bound.
SHOWN_CONTROLLERS = {"memory", "cpu", "cpuacct", "cpuset", "pids"}


def layer_dir(kernel_id: str) -> Path:
    """Kernel ``kernel_id``'s writable layer: a subvolume of the runtime's btrfs volume."""
    return volume.volume_dir() / "kernels" / kernel_id


def run_dir(kernel_id: str) -> Path:
    """Kernel ``kernel_id``'s run folder: a subvolume of the volume, held to
    :data:`LOG_CAP` bytes, bound at ``kernels/<id>/run`` and from there at
    /run/sandbox inside. It outlives restarts, restores and resets."""
    return volume.volume_dir() / "run" / kernel_id


def check_cwd(cwd: str) -> tuple[Path, hostpath.Identity]:
    """Validate a kernel's working directory at its first start; return it and the
    identity every later mount of it is checked against (see ``hostpath.py``).

    Raises:
        ConfigError: it is relative, missing, a symlink or a system folder.
    """
    path = Path(cwd)
    if not path.is_absolute():
        raise ConfigError("working directory", cwd, "is not an existing absolute folder")
    identity, real = hostpath.first_use(cwd, "working directory")
    if real in FORBIDDEN_CWDS or any(real.is_relative_to(p) for p in FORBIDDEN_CWDS[1:]):
        raise ConfigError("working directory", cwd, "is a system folder; start from your notebooks")
    if real.is_relative_to(paths.state_dir()):
        raise ConfigError("working directory", cwd, "is inside the runtime's state")
    return path, identity


def checked_cwd(record: KernelRecord) -> contextlib.AbstractContextManager[Path]:
    """The kernel's working folder, checked against its first start (see hostpath.py).

    Raises:
        ConfigError: it was moved or replaced, or the record has no identity for it.
    """
    identity = _identity(record, record.cwd_identity, record.cwd)
    return hostpath.checked(record.cwd, identity, "working directory")


def checked_prefix(record: KernelRecord, index: int) -> contextlib.AbstractContextManager[Path]:
    """The kernel's Python prefix number ``index``, checked against its first start."""
    path = record.python_prefixes[index]
    known = record.prefix_identities
    identity = _identity(record, known[index] if known is not None else None, path)
    return hostpath.checked(path, identity, "Python prefix")


def _identity(
    record: KernelRecord, identity: hostpath.Identity | None, path: str
) -> hostpath.Identity:
    """``identity``, which a record of an earlier version may lack until it is adopted.

    Raises:
        ConfigError: it is missing.
    """
    if identity is None:
        raise ConfigError(
            "folder", path,
            f"has no identity on record for kernel {record.kernel_id} (its server is "
            "older than this runtime); restart the kernel",
        )  # fmt: skip
    return identity


def check_folders(record: KernelRecord) -> None:
    """Check the user's folders of a running kernel before an operation stops it, so
    that one which could not mount them again leaves the kernel running.

    Raises:
        ConfigError: a folder was moved or replaced (see hostpath.py).
    """
    with checked_cwd(record):
        pass
    for i in range(len(record.python_prefixes)):
        with checked_prefix(record, i):
            pass


def check_disk(record: KernelRecord, inherited: int, what: str) -> None:
    """Refuse to bring ``inherited`` bytes of files into a kernel whose ``disk`` they
    fill.

    Raises:
        ConfigError: naming both sizes; nothing was touched.
    """
    disk = record.limits.disk
    if disk and inherited >= disk:
        raise ConfigError(
            what, format_size(inherited),
            f"holds that much in files, more than this kernel's disk size "
            f"({format_size(disk)}); nothing was restored. Use a kernelspec with a larger "
            "--disk",
        )  # fmt: skip


def tree_sizes(root: Path) -> tuple[int, int]:
    """In one walk below ``root``: the bytes in its regular files, and the bytes of
    blocks its files and folders take (sparse holes excluded)."""
    size = blocks = 0
    for path in root.rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
        blocks += st.st_blocks * 512
    return size, blocks


def allocated_bytes(root: Path) -> int:
    """Bytes of blocks the files and folders below ``root`` take (sparse holes excluded)."""
    return tree_sizes(root)[1]


def tree_bytes(root: Path) -> int:
    """Bytes in the regular files below ``root``."""
    return tree_sizes(root)[0]


def inherited_bytes(meta: dict[str, object], folder: Path) -> int:
    """The blocks of the files of the snapshot or base in ``folder`` (from its meta,
    or counted for one taken before the meta kept them)."""
    if "layer_bytes" in meta:
        return int(str(meta["layer_bytes"]))
    return allocated_bytes(folder / "files")


class Rootfs:
    """Makes, mounts and removes the filesystems of kernels. Used by lifecycle and
    snapshotting; holds no state but its drivers."""

    def __init__(
        self,
        drivers: Drivers,
        make_home: Callable[[str, Path, int, int], Path | None] = home_template,
    ) -> None:
        self.volume = drivers.volume
        self.mounts = drivers.mounts
        self.cgroups = drivers.cgroups
        #: ``(executable, store, uid, gid) -> folder``: a home with IPython's profile made.
        self.make_home = make_home

    def layer_dir(self, kernel_id: str) -> Path:
        """See :func:`layer_dir`."""
        return self.volume.volume_dir() / "kernels" / kernel_id

    def run_dir(self, kernel_id: str) -> Path:
        """See :func:`run_dir`."""
        return self.volume.volume_dir() / "run" / kernel_id

    # ---- the run folder and its log -------------------------------------------------

    def make_run_dir(self, record: KernelRecord) -> None:
        """Make the kernel's run folder with an empty log and cell file that the
        kernel's user owns."""
        folder = self.run_dir(record.kernel_id)
        self.volume.delete_subvolume(folder)
        self.volume.create_subvolume(folder)
        os.chmod(folder, 0o755)  # entered from the kernel's user namespace, through its bind
        self.volume.limit_subvolume(folder, LOG_CAP)
        log = folder / "kernel.log"
        log.touch(0o600)
        give(log, record.uid, record.gid)
        # The cell under way, which the kernel rewrites in place (it cannot make files
        # here) for the runtime to answer after a crash (see timetravel.py).
        cell = folder / "cell.json"
        cell.touch(0o600)
        give(cell, record.uid, record.gid)

    def trim_log(self, kernel_id: str) -> bool:
        """Keep the last :data:`LOG_KEEP` bytes of the kernel's log once it passes
        :data:`LOG_TRIM_AT`, in place: the kernel appends to the same inode, and what
        it writes meanwhile lands after the kept tail. True if it was trimmed; one
        stat otherwise."""
        log = self.run_dir(kernel_id) / "kernel.log"
        try:
            if log.stat().st_size <= LOG_TRIM_AT:
                return False
        except OSError:
            return False
        # At its quota btrfs refuses even a truncate (it needs metadata room): the cap
        # is lifted for the moment of the trim.
        with contextlib.suppress(SandboxError):
            self.volume.limit_subvolume(log.parent, 2 * LOG_CAP)
        try:
            with open(log, "r+b") as handle:
                handle.seek(-LOG_KEEP, os.SEEK_END)
                tail = handle.read(LOG_KEEP)
                handle.truncate(0)
            # Appended, as the kernel's own writes are: neither overwrites the other.
            with open(log, "ab") as handle:
                stamp = time.strftime("%H:%M:%S")
                note = f"[sandbox-kernel {stamp}] log trimmed to its last {format_size(LOG_KEEP)}\n"
                handle.write(note.encode() + tail[tail.find(b"\n") + 1 :])
        except OSError:
            return False
        finally:
            with contextlib.suppress(SandboxError):
                self.volume.limit_subvolume(log.parent, LOG_CAP)
        return True

    def append_log(self, kernel_id: str, line: str) -> None:
        """Append a line from the runtime to the kernel's log, marked as such."""
        self.trim_log(kernel_id)
        with open(self.run_dir(kernel_id) / "kernel.log", "a") as log:
            log.write(f"[sandbox-kernel {time.strftime('%H:%M:%S')}] {line}\n")

    # ---- the writable layer ---------------------------------------------------------

    def make_layer(self, kdir: Path, record: KernelRecord, fresh: bool = False) -> None:
        """Make the kernel's writable layer: the base's files (unless ``fresh``), else
        an empty layer with a new home. Blocks: call it in a thread."""
        from . import bases

        for sub in ("rootfs", "mnt/cwd", "run", "etc"):
            (kdir / sub).mkdir(parents=True, exist_ok=True)
        if record.base and not fresh:
            self.layer_from(record, bases.base_dir(record.base), bases.load(record.base))
            return
        self._empty_layer(record)
        home = self.layer_dir(record.kernel_id) / "root" / record.home.lstrip("/")
        home.parent.mkdir(parents=True)
        os.chmod(home.parent, 0o755)
        template = self.make_home(
            record.executable, paths.state_dir() / "homes", record.uid, record.gid
        )
        if template is None:
            home.mkdir()
        else:
            shutil.copytree(template, home, symlinks=True)
        for path in [home, *home.rglob("*")]:
            give(path, record.uid, record.gid, follow=False)

    def layer_from(self, record: KernelRecord, folder: Path, meta: dict[str, object]) -> None:
        """Replace the kernel's writable layer by a writable snapshot of the files of
        the snapshot or base in ``folder``, limited to ``disk`` less what it inherits.
        Blocks: call it in a thread.

        The new layer is made beside the old one and only then takes its place, so
        one that cannot be made (the snapshot deleted at that moment) leaves the
        kernel its files. gc removes a ``.KERNEL_ID.new`` that a crash left.
        """
        layer = self.layer_dir(record.kernel_id)
        fresh = layer.with_name(f".{layer.name}.new")
        self.volume.delete_subvolume(fresh)
        self.volume.snapshot_subvolume(folder / "files", fresh, readonly=False)
        try:
            self.volume.delete_subvolume(layer)
            os.rename(fresh, layer)
        except BaseException:
            self.volume.delete_subvolume(fresh)
            raise
        self.limit_layer(record, inherited_bytes(meta, folder))

    def _empty_layer(self, record: KernelRecord) -> None:
        """Make the kernel's writable layer: a new, empty subvolume."""
        layer = self.layer_dir(record.kernel_id)
        self.volume.delete_subvolume(layer)
        self.volume.create_subvolume(layer)
        self.limit_layer(record)
        for sub in ("root", "root.work", "cwd", "cwd.work"):
            (layer / sub).mkdir()
        # The merged working directory takes its owner from the upper layer's root,
        # so the kernel's user can write there even when the host folder is root's.
        give(layer / "cwd", record.uid, record.gid)

    def limit_layer(self, record: KernelRecord, inherited: int = 0) -> None:
        """Hold the kernel's writable layer to its ``disk`` size (btrfs quota).

        A layer made from a snapshot or a base starts with ``inherited`` bytes of
        files that simple quotas charge to the layer that first wrote them, not to
        this one: they are taken off the limit, so restores cannot grow a kernel's
        files past ``disk`` one snapshot at a time.
        """
        disk = record.limits.disk
        if disk:
            limit = max(disk - inherited, 1 << 20)
            self.volume.limit_subvolume(self.layer_dir(record.kernel_id), limit)

    # ---- mounts ---------------------------------------------------------------------

    def binds(self, kdir: Path, record: KernelRecord) -> list[Bind]:
        """The bundle's bind mounts: /usr, the Python prefixes, the working folder,
        the run folder and the kernel's own /etc files."""
        binds = [Bind(Path("/usr"), "/usr")]
        binds += [Bind(prefix_point(kdir, i), p) for i, p in enumerate(record.python_prefixes)]
        binds.append(Bind(kdir / "mnt/cwd", record.cwd_inside, readonly=False))
        binds.append(Bind(kdir / "run", RUN_DIR, readonly=False))
        binds += [Bind(kdir / "etc" / n, f"/etc/{n}") for n in layers.PER_KERNEL_ETC]
        return binds

    def cgroup_binds(self, record: KernelRecord) -> list[Bind] | None:
        """The kernel's own cgroup in the v1 hierarchies of :data:`SHOWN_CONTROLLERS`,
        each bound at the hierarchy's path inside (where a cgroup namespace would show
        it); None on a pure v2 machine, whose cgroupfs a user namespace may mount.
        Every bind is one more mount for runc at each start and for CRIU at each dump
        and restore, hence only these."""
        points = self.cgroups.hierarchies()
        if not points:
            return None
        rel = paths.cgroup_of(record.container_id)
        shown = [p for p in points if set(p.name.split(",")) & SHOWN_CONTROLLERS]
        return [Bind(point / rel, str(point)) for point in shown]

    def mount(self, kdir: Path, record: KernelRecord) -> None:
        """Mount the kernel's root and working-folder overlays, its run folder and its
        Python prefixes under ``kdir``; on failure nothing stays mounted.

        The prefixes are bound here first, because a restore opens the sources of the
        container's binds from inside its user namespace: a prefix in a home folder
        that only its owner may enter (``/root/.pyenv/...``) can be reached from there
        only through a mount point in the kernel's own folder.

        Raises:
            ConfigError: a user's folder was moved or replaced (see hostpath.py).
            MountError: a mount failed.
        """
        lower = [layers.layer_path(d) for d in record.layers]
        layer = self.layer_dir(record.kernel_id)
        try:
            self.mounts.mount_overlay(kdir / "rootfs", lower, layer / "root", layer / "root.work")
            self.mounts.bind(self.run_dir(record.kernel_id), kdir / "run")
            # The user's folders are mounted through descriptors checked against the
            # kernel's first start, never by path (see hostpath.py).
            with checked_cwd(record) as cwd:
                self.mounts.mount_overlay(
                    kdir / "mnt/cwd", [cwd], layer / "cwd", layer / "cwd.work"
                )
            for i in range(len(record.python_prefixes)):
                point = prefix_point(kdir, i)
                point.mkdir(exist_ok=True)
                with checked_prefix(record, i) as source:
                    self.mounts.bind(source, point)
        except BaseException:
            self.unmount(kdir)
            raise

    def unmount(self, kdir: Path) -> None:
        """Unmount everything below ``kdir``, deepest first."""
        for point in self.mounts.mounts_under(kdir):
            self.mounts.unmount(point)

    def remove(self, kdir: Path) -> None:
        """Remove a kernel's folder, writable layer and run folder. Blocks (the
        layer can hold gigabytes): async code calls it in a thread."""
        self.unmount(kdir)
        self.volume.delete_subvolume(self.layer_dir(kdir.name))
        self.volume.delete_subvolume(self.run_dir(kdir.name))
        shutil.rmtree(kdir, ignore_errors=True)

    # ---- /etc -----------------------------------------------------------------------

    @staticmethod
    def write_etc(etc: Path, record: KernelRecord) -> None:
        """The kernel's own passwd, group, hostname, hosts and resolv.conf."""
        user, uid, gid, home = record.user, record.uid, record.gid, record.home
        passwd = "root:x:0:0:root:/root:/bin/sh\n"
        group = "root:x:0:\n"
        if uid != 65534:
            passwd += f"{user}:x:{uid}:{gid}::{home}:/bin/sh\n"
            group += f"{user}:x:{gid}:\n"
        nobody_home = home if uid == 65534 else "/nonexistent"
        passwd += f"nobody:x:65534:65534:nobody:{nobody_home}:/usr/sbin/nologin\n"
        group += "nogroup:x:65534:\n"
        files = {
            "passwd": passwd,
            "group": group,
            "hostname": f"{record.hostname}\n",
            "hosts": f"127.0.0.1\tlocalhost\n{record.kernel_ip}\t{record.hostname}\n",
            "resolv.conf": _host_resolv() if record.network == "egress" else "",
        }
        for name, text in files.items():
            (etc / name).write_text(text)


def prefix_point(kdir: Path, index: int) -> Path:
    """Where the kernel's Python prefix number ``index`` is bound (see ``Rootfs.mount``)."""
    return kdir / "mnt" / f"prefix-{index}"


def kernel_path(record: KernelRecord, executable: str) -> str:
    """The kernel's ``PATH``: its Python's folder, its prefixes' ``bin``, the system's."""
    bins = [str(Path(executable).parent)]
    bins += [f"{p}/bin" for p in record.python_prefixes if f"{p}/bin" not in bins]
    return ":".join([*bins, "/usr/local/bin", "/usr/bin", "/bin"])


def _host_resolv() -> str:
    try:
        return Path("/etc/resolv.conf").read_text()
    except OSError:
        return ""
