"""The ioctl request numbers the runtime calls, computed as the kernel's headers do.

Python's ``fcntl`` has none of them. Each number is built here with the encoders
of ``asm-generic/ioctl.h`` (the layout of x86 and arm64: 8 bits of number, 8 of
type, 14 of argument size, 2 of direction) from the same arguments its header
gives, so a reader can check it against the header line by line.
"""

from __future__ import annotations

# ---- the encoders (asm-generic/ioctl.h) ----------------------------------------------

_NRBITS, _TYPEBITS, _SIZEBITS = 8, 8, 14
_NRSHIFT = 0
_TYPESHIFT = _NRSHIFT + _NRBITS
_SIZESHIFT = _TYPESHIFT + _TYPEBITS
_DIRSHIFT = _SIZESHIFT + _SIZEBITS
_NONE, _WRITE, _READ = 0, 1, 2  # _IOC_NONE, _IOC_WRITE, _IOC_READ


def _IOC(direction: int, kind: int, number: int, size: int) -> int:
    """The request number for ``direction``, type ``kind``, ``number`` and an
    argument of ``size`` bytes.

    Raises:
        ValueError: a field does not fit its bits.
    """
    if not 0 <= number < 1 << _NRBITS or not 0 <= kind < 1 << _TYPEBITS:
        raise ValueError(f"ioctl type {kind:#x} or number {number} does not fit 8 bits")
    if not 0 <= size < 1 << _SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit 14 bits")
    return (direction << _DIRSHIFT) | (size << _SIZESHIFT) | (kind << _TYPESHIFT) | number


def _IO(kind: int, number: int) -> int:
    """A request with no argument."""
    return _IOC(_NONE, kind, number, 0)


def _IOR(kind: int, number: int, size: int) -> int:
    """A request whose ``size``-byte argument the kernel writes (the caller reads)."""
    return _IOC(_READ, kind, number, size)


def _IOW(kind: int, number: int, size: int) -> int:
    """A request whose ``size``-byte argument the caller writes (the kernel reads)."""
    return _IOC(_WRITE, kind, number, size)


def _IOWR(kind: int, number: int, size: int) -> int:
    """A request whose ``size``-byte argument goes both ways."""
    return _IOC(_READ | _WRITE, kind, number, size)


# ---- linux/fs.h ----------------------------------------------------------------------

#: _IOW(0x94, 9, int): make the target file share all of the source's blocks (reflink).
FICLONE = _IOW(0x94, 9, 4)
#: _IOW(0x94, 13, struct file_clone_range): share a byte range of the source (reflink).
#: The struct: s64 src_fd, u64 src_offset, u64 src_length, u64 dest_offset.
FICLONERANGE = _IOW(0x94, 13, 32)
#: _IOWR(0x94, 54, struct file_dedupe_range): share equal byte ranges of two files.
#: The struct's fixed part is 24 bytes; its destinations follow it.
FIDEDUPERANGE = _IOWR(0x94, 54, 24)

# ---- linux/btrfs.h -------------------------------------------------------------------

BTRFS_IOCTL_MAGIC = 0x94
#: sizeof(struct btrfs_ioctl_vol_args) and of struct btrfs_ioctl_vol_args_v2.
BTRFS_VOL_ARGS_SIZE = 4096

#: _IO(BTRFS_IOCTL_MAGIC, 8): commit the running transaction.
BTRFS_IOC_SYNC = _IO(BTRFS_IOCTL_MAGIC, 8)
#: _IOW(BTRFS_IOCTL_MAGIC, 14, struct btrfs_ioctl_vol_args)
BTRFS_IOC_SUBVOL_CREATE = _IOW(BTRFS_IOCTL_MAGIC, 14, BTRFS_VOL_ARGS_SIZE)
#: _IOW(BTRFS_IOCTL_MAGIC, 15, struct btrfs_ioctl_vol_args)
BTRFS_IOC_SNAP_DESTROY = _IOW(BTRFS_IOCTL_MAGIC, 15, BTRFS_VOL_ARGS_SIZE)
#: _IOWR(BTRFS_IOCTL_MAGIC, 20, struct btrfs_ioctl_space_args): 16 bytes of head, the
#: space infos follow it.
BTRFS_IOC_SPACE_INFO = _IOWR(BTRFS_IOCTL_MAGIC, 20, 16)
#: _IOW(BTRFS_IOCTL_MAGIC, 23, struct btrfs_ioctl_vol_args_v2)
BTRFS_IOC_SNAP_CREATE_V2 = _IOW(BTRFS_IOCTL_MAGIC, 23, BTRFS_VOL_ARGS_SIZE)
#: _IOR(BTRFS_IOCTL_MAGIC, 31, struct btrfs_ioctl_fs_info_args): 1024 bytes.
BTRFS_IOC_FS_INFO = _IOR(BTRFS_IOCTL_MAGIC, 31, 1024)
#: _IOWR(BTRFS_IOCTL_MAGIC, 40, struct btrfs_ioctl_quota_ctl_args): 16 bytes.
BTRFS_IOC_QUOTA_CTL = _IOWR(BTRFS_IOCTL_MAGIC, 40, 16)
#: _IOR(BTRFS_IOCTL_MAGIC, 43, struct btrfs_ioctl_qgroup_limit_args): 48 bytes. The
#: header says _IOR though the kernel reads the limit from it.
BTRFS_IOC_QGROUP_LIMIT = _IOR(BTRFS_IOCTL_MAGIC, 43, 48)

# ---- linux/loop.h --------------------------------------------------------------------

#: 0x4C08 in the header, which writes loop requests as bare numbers: _IO('L', 8).
LOOP_SET_DIRECT_IO = _IO(ord("L"), 8)
