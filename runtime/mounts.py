"""Mounting and unmounting overlay filesystems with the mount(2) system call.

Called by the runtime when a kernel's root filesystem is put together and taken
apart. The calls go straight to libc: no ``mount`` process per kernel start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from sandbox_kernel.errors import SandboxError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MNT_DETACH = 2
MS_BIND, MS_REC = 0x1000, 0x4000


class MountError(SandboxError, OSError):
    """mount(2) or umount2(2) failed; carries the target and errno."""

    def __init__(self, action: str, target: Path, err: int, detail: str = "") -> None:
        self.target = target
        super().__init__(
            err,
            f"{action} {target} failed: {os.strerror(err)}" + (f" ({detail})" if detail else ""),
        )


def mount_overlay(target: Path, lower: Sequence[Path], upper: Path, work: Path) -> None:
    """Mount an overlay at ``target``: ``lower`` read-only, topmost first; writes go to ``upper``.

    ``work`` must be an empty folder on the same filesystem as ``upper``.

    Raises:
        MountError: the kernel refused the mount (errno and options in the message).
    """
    options = f"lowerdir={':'.join(str(p) for p in lower)},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", bytes(target), b"overlay", 0, options.encode()) != 0:
        raise MountError("mount overlay on", target, ctypes.get_errno(), options)


def bind(source: Path, target: Path) -> None:
    """Bind-mount ``source`` (and the mounts under it) at ``target``.

    Raises:
        MountError: the kernel refused the mount.
    """
    if _libc.mount(bytes(source), bytes(target), None, MS_BIND | MS_REC, None) != 0:
        raise MountError("bind-mount on", target, ctypes.get_errno(), str(source))


def unmount(target: Path) -> None:
    """Unmount ``target`` lazily; a target that is not mounted is fine.

    Raises:
        MountError: for any error other than "not mounted" or "does not exist".
    """
    if _libc.umount2(bytes(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise MountError("unmount", target, err)


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount in)."""
    found: list[Path] = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(prefix) or point.startswith(f"{prefix}/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
