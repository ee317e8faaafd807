"""Host folders that root-run code mounts or reads on a user's behalf.

A kernel's working folder and its Python prefixes are host paths a user named. The
runtime, as root, mounts them at every start, restart, restore and reset. A path is
only a name: between two uses its owner can swap the folder for a symlink to
``/root``, and a mount by path would follow it. So each use opens the folder
without following a symlink at its last component (``O_PATH|O_NOFOLLOW|O_DIRECTORY``),
checks the descriptor's device, inode and owner against what the kernel's first
start found, and mounts ``/proc/self/fd/N``: the folder that was checked, whatever
the path names a moment later.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError

_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Identity:
    """What a folder was at a kernel's first start: device, inode and owner."""

    dev: int
    ino: int
    uid: int

    @classmethod
    def of(cls, fd: int) -> Identity:
        """The identity of the folder open as ``fd``."""
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_uid)

    def to_dict(self) -> dict[str, int]:
        """Plain data, for the kernel's record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        """The inverse of :meth:`to_dict`."""
        return cls(int(data["dev"]), int(data["ino"]), int(data["uid"]))


def open_folder(path: str, what: str) -> int:
    """Open folder ``path`` as an ``O_PATH`` descriptor, refusing a symlink.

    Raises:
        ConfigError: ``path`` is relative, missing, a symlink or not a folder.
    """
    if not os.path.isabs(path):
        raise ConfigError(what, path, "is not an absolute path; give the full path")
    try:
        return os.open(path, _FLAGS)
    except OSError as err:
        raise ConfigError(
            what, path,
            f"cannot be opened as a folder ({err.strerror}; a symlink is refused): "
            "use a real folder",
        ) from None  # fmt: skip


def real_path(fd: int) -> Path:
    """Where the folder open as ``fd`` is now, with every symlink resolved."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


@contextlib.contextmanager
def checked(path: str, expected: Identity, what: str) -> Iterator[Path]:
    """Open folder ``path`` and check it is still the folder of ``expected``; yield
    ``/proc/self/fd/N``, a path to exactly that folder, valid inside the block.

    Raises:
        ConfigError: the folder is gone, is now a symlink, or is another folder (or
            has another owner) than at the kernel's first start; nothing was used.
    """
    try:
        fd = os.open(path, _FLAGS)
    except OSError as err:
        now = "a symlink or a file" if err.errno in (errno.ENOTDIR, errno.ELOOP) else err.strerror
        raise ConfigError(
            what, path,
            f"was moved or replaced since the kernel first started (it is now {now}); "
            "nothing was mounted. Put the folder back, or start a new kernel in the "
            "folder you want to use",
        ) from None  # fmt: skip
    try:
        found = Identity.of(fd)
        if found != expected:
            same = (found.dev, found.ino) == (expected.dev, expected.ino)
            change = "owned by another user" if same else "another folder"
            raise ConfigError(
                what, path,
                f"was moved or replaced since the kernel first started (it is now {change}); "
                "nothing was mounted. Put the folder back, or start a new kernel in the "
                "folder you want to use",
            )  # fmt: skip
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def first_use(path: str, what: str) -> tuple[Identity, Path]:
    """Open folder ``path`` for a kernel's first start: its identity, to check every
    later use against, and its real path.

    Raises:
        ConfigError: ``path`` is relative, missing, a symlink or not a folder.
    """
    fd = open_folder(path, what)
    try:
        return Identity.of(fd), real_path(fd)
    finally:
        os.close(fd)


def lookup(folder: Path, rel: str) -> bool:
    """Whether ``rel`` exists below ``folder`` (an ``/proc/self/fd/N`` path from
    :func:`checked`), walking it one component at a time without following any
    symlink: a user's symlink below their folder cannot make root look elsewhere."""
    parts = [p for p in Path(rel).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        return False
    try:
        fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _FLAGS, dir_fd=fd)
            except OSError:
                return False
            os.close(fd)
            fd = nxt
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)
