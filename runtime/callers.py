"""Who asks: a caller of the daemon, known from the kernel, and root acting as them.

The daemon learns a caller's uid, gid and pid from its socket (``SO_PEERCRED``),
which the kernel fills in when the caller connects: nothing the caller writes can
change it. Its groups come from the system's user database, not from the caller.

Paths a caller names (their working folder, their Python) are opened by the
daemon *as the caller*: :func:`as_caller` sets the current thread's filesystem
uid, gid and groups to the caller's for the duration of a block. Linux checks
file access against these, and changing the filesystem uid away from 0 also drops
the thread's ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH``, so root then opens
only what the caller could open. The calls are made as raw system calls: glibc's
wrappers of ``setgroups`` would change every thread of the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import platform
import pwd
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from sandbox_kernel.errors import SandboxError

#: x86_64 and aarch64 numbers of the system calls :func:`as_caller` makes.
_SYSCALLS = {
    "x86_64": {"setgroups": 116, "setfsuid": 122, "setfsgid": 123},
    "aarch64": {"setgroups": 159, "setfsuid": 151, "setfsgid": 152},
}
#: Most supplementary groups kept for a caller.
MAX_GROUPS = 64


@dataclass(frozen=True)
class Caller:
    """One caller: the ids the kernel reported for its socket.

    Attributes:
        uid, gid, pid: from ``SO_PEERCRED``.
        groups: the supplementary groups of ``uid`` in the user database.
    """

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = field(default=())

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def name(self) -> str:
        """The user's name, or the uid as text."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def in_group(self, name: str) -> bool:
        """Whether the caller is in group ``name`` (primary or supplementary)."""
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            return False
        return gid == self.gid or gid in self.groups

    @classmethod
    def of_process(cls) -> Caller:
        """This process as a caller (the in-process mode: a root server)."""
        return cls(os.getuid(), os.getgid(), os.getpid(), tuple(os.getgroups()))

    @classmethod
    def of_user(cls, uid: int, gid: int) -> Caller:
        """User ``uid`` as a caller with no process (whose quotas, whose kernel): its
        primary group from the user database, else ``gid``."""
        with contextlib.suppress(KeyError):
            gid = pwd.getpwuid(uid).pw_gid
        return cls(uid, gid, 0, groups_of(uid, gid))

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Caller:
        """The caller at the other end of unix socket ``sock``, from the kernel."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return cls(uid, gid, pid, groups_of(uid, gid))


def groups_of(uid: int, gid: int) -> tuple[int, ...]:
    """The supplementary groups of ``uid`` in the user database (none if unknown)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return ()
    return tuple(sorted(set(os.getgrouplist(name, gid))))[:MAX_GROUPS]


class _Syscalls:
    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise SandboxError(f"acting as a caller is not supported on {platform.machine()}")
        self.numbers = numbers
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def call(self, name: str, *args: object) -> int:
        return int(self.libc.syscall(self.numbers[name], *args))

    def setgroups(self, groups: tuple[int, ...]) -> None:
        array = (ctypes.c_uint * max(len(groups), 1))(*groups)
        if self.call("setgroups", ctypes.c_size_t(len(groups)), array) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def setfsuid(self, uid: int) -> None:
        self.call("setfsuid", ctypes.c_uint(uid))

    def setfsgid(self, gid: int) -> None:
        self.call("setfsgid", ctypes.c_uint(gid))


_syscalls: _Syscalls | None = None


@contextlib.contextmanager
def as_caller(caller: Caller | None) -> Iterator[None]:
    """Within the block, this thread opens files as ``caller`` (None or root: as
    itself). Blocking: used in the daemon's worker threads, never on its event loop.

    If the thread's own ids cannot be put back, the process ends: a root thread
    left with a user's groups must not serve anyone else.
    """
    global _syscalls
    if caller is None or caller.is_root or os.geteuid() != 0:
        yield
        return
    if _syscalls is None:
        _syscalls = _Syscalls()
    sc = _syscalls
    saved = tuple(os.getgroups())
    sc.setgroups(caller.groups or (caller.gid,))
    sc.setfsgid(caller.gid)
    sc.setfsuid(caller.uid)
    try:
        yield
    finally:
        try:
            sc.setfsuid(0)
            sc.setfsgid(0)
            sc.setgroups(saved)
        except BaseException:  # pragma: no cover - the kernel refused root its own ids
            os._exit(70)
