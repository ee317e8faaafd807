"""The btrfs volume that holds kernels' writable layers and their snapshots.

Each kernel's writable layer (the overlay upper and work folders of its root
filesystem and of its working directory) is a btrfs subvolume. A snapshot of the
files is a read-only btrfs snapshot of that subvolume, and a restore is a writable
snapshot of it: both are instant, share every unchanged block (a snapshot costs only
what changed), and keep inode numbers. That last point is why: a restored process's
open files must be the same inodes it had, or programs that check them (SQLite, and
so IPython's history) refuse to write ("database moved"). A copy, or overlay layers
stacked from copies, cannot give that.

The volume is a sparse image file, loop-mounted on first use. Subvolumes are made
and removed with the btrfs ioctls, with no process per call.
"""

from __future__ import annotations

import fcntl
import os
import struct
import uuid
from pathlib import Path

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, RequirementMissing, SandboxError

from . import paths
from .fsutil import flocked
from .ioctl import (
    BTRFS_IOC_FS_INFO,
    BTRFS_IOC_QGROUP_LIMIT,
    BTRFS_IOC_QUOTA_CTL,
    BTRFS_IOC_SNAP_CREATE_V2,
    BTRFS_IOC_SNAP_DESTROY,
    BTRFS_IOC_SPACE_INFO,
    BTRFS_IOC_SUBVOL_CREATE,
    BTRFS_IOC_SYNC,
    BTRFS_VOL_ARGS_SIZE,
    LOOP_SET_DIRECT_IO,
)
from .limits import parse_size
from .mounts import mounts_under
from .process import run_sync

_RDONLY = 1 << 1  # BTRFS_SUBVOL_RDONLY
_ENABLE_SIMPLE_QUOTA = 4  # BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA (Linux 6.7)
_LIMIT_MAX_EXCL = 1 << 1  # BTRFS_QGROUP_LIMIT_MAX_EXCL
_COMPRESSION = "btrfs.compression"  # what `btrfs property set ... compression` sets
_DATA, _METADATA = 1, 4  # BTRFS_BLOCK_GROUP_DATA, _METADATA


def volume_dir() -> Path:
    """Where the volume is mounted."""
    return paths.state_dir() / "volume"


def image_path() -> Path:
    """The sparse file that holds the volume."""
    return paths.state_dir() / "volume.img"


def volume_size() -> int:
    """The volume's size in bytes: ``$SANDBOX_KERNEL_VOLUME_SIZE``, default 64G (sparse)."""
    return parse_size(os.environ.get("SANDBOX_KERNEL_VOLUME_SIZE", "64G"), "volume size")


def capacity() -> int:
    """Bytes the volume holds: its image's size once it is made, else the size
    :func:`ensure_volume` will make it."""
    try:
        return image_path().stat().st_size
    except OSError:  # not made yet (or not ours to look at)
        return volume_size()


def check_disk_size(disk: int | None) -> None:
    """Refuse a kernel's ``disk`` size (bytes) that the volume could never hold: the
    btrfs quota would accept it and the kernel would fill the volume, and with it
    every other kernel's room, first.

    Raises:
        ConfigError: naming the size, the volume's and the fix.
    """
    room = capacity()
    if disk is not None and disk > room:
        raise ConfigError(
            "disk size", format_size(disk),
            f"is larger than the volume that holds every kernel's files ({format_size(room)}); "
            f"use at most {format_size(room)}, or give a larger SANDBOX_KERNEL_VOLUME_SIZE "
            "before the volume is first made",
        )  # fmt: skip


def ensure_volume() -> Path:
    """Mount the volume (making it first if needed); return where it is mounted.

    Safe to call from many processes at once: they take turns on a lock file.

    Raises:
        RequirementMissing: mkfs.btrfs is not installed.
        CommandError: mkfs or mount failed.
    """
    target = volume_dir()
    if target.is_mount() and str(target) in _READY:
        return target
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    with flocked(paths.state_dir() / "volume.lock"):
        if target.is_mount():
            _set_up(target)
            return target
        image = image_path()
        if not image.exists():
            mkfs = _binary("mkfs.btrfs")
            partial = image.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            # 0600 from its first byte: the raw image holds every tenant's files and
            # the CRIU images of their memory (connection keys included).
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.truncate(volume_size())
            run_sync([mkfs, "-q", str(partial)], timeout=120)
            partial.rename(image)
        os.chmod(image, 0o600)  # a volume made by an older version was 0644
        target.mkdir(mode=0o700, exist_ok=True)
        run_sync(["mount", "-o", "loop", str(image), str(target)], timeout=60)
        _direct_io(target)
        _set_up(target)
    return target


#: Volumes this process has set up (a mounted volume may come from an older version).
_READY: set[str] = set()


def _set_up(target: Path) -> None:
    """The volume's folders, its compressed store and its quotas, where missing.

    The volume's root and its folders are root's alone (0700): every kernel's layer,
    snapshots and bases are below, and no other host user may read or plant files
    there. Modes are set again on a volume an older version made.
    """
    os.chmod(image_path(), 0o600)
    os.chmod(target, 0o700)
    for sub in ("kernels", "snapshots", "bases", "run"):
        (target / sub).mkdir(mode=0o700, exist_ok=True)
        os.chmod(target / sub, 0o700)
    compress(target / "snapshots")
    _enable_quotas(target)
    _READY.add(str(target))


def _fsid(target: Path) -> str:
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        info = bytearray(1024)
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, info)
    finally:
        os.close(fd)
    return str(uuid.UUID(bytes=bytes(info[16:32])))


def quotas_enabled(target: Path | None = None) -> bool:
    """Whether the volume counts each subvolume's bytes (btrfs simple quotas)."""
    target = target or volume_dir()
    try:
        mode = Path(f"/sys/fs/btrfs/{_fsid(target)}/qgroups/mode").read_text().strip()
    except OSError:
        return False
    return mode == "squota"


def _enable_quotas(target: Path) -> None:
    """Turn on btrfs simple quotas, which enforce each kernel's ``disk`` size.

    Simple quotas (Linux 6.7) charge each block to the subvolume that wrote it, so
    a kernel's layer pays for its own writes and not for the blocks it shares with
    the snapshot or base it came from. They set a feature flag on the volume that
    btrfs-progs older than 6.7 do not know (``btrfs check`` refuses it); the
    runtime needs neither. Where the kernel cannot, the disk size is not enforced
    and ``sandbox-kernel doctor`` says so.
    """
    if quotas_enabled(target):
        return
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_QUOTA_CTL, bytearray(struct.pack("=QQ", _ENABLE_SIMPLE_QUOTA, 0)))
    except OSError:
        pass
    finally:
        os.close(fd)


def limit_subvolume(path: Path, size: int) -> bool:
    """Let subvolume ``path`` hold at most ``size`` bytes of its own (data and
    metadata); writes beyond fail with EDQUOT. False where quotas are off.

    Raises:
        SandboxError: the kernel refused the limit.
    """
    if not quotas_enabled():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # qgroupid 0: the subvolume's own qgroup; then flags, max_rfer, max_excl, rsv x2.
        args = bytearray(struct.pack("=QQQQQQ", 0, _LIMIT_MAX_EXCL, 0, size, 0, 0))
        fcntl.ioctl(fd, BTRFS_IOC_QGROUP_LIMIT, args)
    except OSError as err:
        raise SandboxError(f"btrfs: cannot limit {path} to {size} bytes: {err.strerror}") from err
    finally:
        os.close(fd)
    return True


def compress(folder: Path) -> None:
    """Have btrfs compress (zstd) what is written below ``folder`` from now on.

    The snapshot store is compressed: a kernel's memory (Python objects, pointers,
    small integers) shrinks several times, and btrfs stores data that does not
    compress (random arrays) as it is. New folders inherit the setting.
    """
    try:
        if os.getxattr(folder, _COMPRESSION) == b"zstd":
            return
    except OSError:
        pass
    os.setxattr(folder, _COMPRESSION, b"zstd")


def _direct_io(target: Path) -> None:
    """Have the loop device under ``target`` write to its image file with direct I/O.

    Otherwise every block is cached twice (btrfs's page cache and the image file's),
    and the image file's dirty pages throttle the next big write: consecutive
    snapshots of a 500 MB kernel kept it frozen for 2 s instead of 0.6 s. Where the
    host filesystem cannot do direct I/O, the loop device stays as it is.
    """
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(target):
            device = fields[fields.index("-") + 2]
            if device.startswith("/dev/loop"):
                try:
                    fd = os.open(device, os.O_RDONLY)
                except OSError:
                    return
                try:
                    fcntl.ioctl(fd, LOOP_SET_DIRECT_IO, 1)
                except OSError:
                    pass
                finally:
                    os.close(fd)
            return


def _binary(name: str) -> str:
    for folder in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if Path(folder, name).exists():
            return f"{folder}/{name}"
    raise RequirementMissing(name, "apt-get install -y btrfs-progs")


def _vol_args(name: str, fd: int = 0, flags: int = 0, v2: bool = False) -> bytearray:
    encoded = name.encode()
    if not encoded or len(encoded) > 4000 or "/" in name:
        raise SandboxError(f"bad subvolume name {name!r}")
    # v2: fd, transid, flags, 4 x u64 (qgroup inherit), then the name; v1: fd, name.
    head = struct.pack("=qQQ32x", fd, 0, flags) if v2 else struct.pack("=q", fd)
    return bytearray(head + encoded + b"\0" * (BTRFS_VOL_ARGS_SIZE - len(head) - len(encoded)))


def _in_parent(path: Path, request: int, args: bytearray) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.ioctl(fd, request, args)
    except OSError as err:
        raise SandboxError(f"btrfs: cannot make or remove {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def create_subvolume(path: Path) -> None:
    """Make an empty subvolume at ``path``.

    Raises:
        SandboxError: the kernel refused (for example ``path`` exists).
    """
    _in_parent(path, BTRFS_IOC_SUBVOL_CREATE, _vol_args(path.name))


def snapshot_subvolume(source: Path, target: Path, readonly: bool) -> None:
    """Make ``target`` a snapshot of subvolume ``source`` (same inodes, shared blocks).

    Raises:
        SandboxError: the kernel refused.
    """
    # The runtime's own folders, never a symlink: a base's or snapshot's files.
    src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        flags = _RDONLY if readonly else 0
        _in_parent(target, BTRFS_IOC_SNAP_CREATE_V2, _vol_args(target.name, src, flags, v2=True))
    finally:
        os.close(src)


def delete_subvolume(path: Path) -> None:
    """Delete the subvolume at ``path`` with everything in it; one that is gone is fine.

    Mounts below it (a kernel's overlays) are left to the caller to unmount first.

    Raises:
        SandboxError: the kernel refused (for example something is mounted below it).
    """
    if not path.exists():
        return
    if mounts_under(path):
        raise SandboxError(f"cannot delete {path}: something is still mounted below it")
    _in_parent(path, BTRFS_IOC_SNAP_DESTROY, _vol_args(path.name))


def is_subvolume(path: Path) -> bool:
    """Whether ``path`` is the root of a btrfs subvolume (its inode number is 256)."""
    try:
        return path.stat().st_ino == 256
    except OSError:
        return False


def bytes_used(sync: bool = True) -> int:
    """Bytes the volume's data and metadata take on disk, after compression and with
    shared blocks counted once (what ``btrfs filesystem df`` calls used).

    With ``sync`` (the default) the running transaction is committed first, so
    blocks written or freed a moment ago are counted.
    """
    fd = os.open(ensure_volume(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        if sync:
            fcntl.ioctl(fd, BTRFS_IOC_SYNC)
        head = bytearray(struct.pack("=QQ", 0, 0))
        fcntl.ioctl(fd, BTRFS_IOC_SPACE_INFO, head)
        count = struct.unpack("=QQ", head)[1]
        args = bytearray(struct.pack("=QQ", count, 0) + b"\0" * (24 * count))
        fcntl.ioctl(fd, BTRFS_IOC_SPACE_INFO, args)
    finally:
        os.close(fd)
    used = 0
    for i in range(struct.unpack_from("=QQ", args)[1]):
        flags, _total, used_bytes = struct.unpack_from("=QQQ", args, 16 + 24 * i)
        if flags & (_DATA | _METADATA):
            used += used_bytes
    return used
