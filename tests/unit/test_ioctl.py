"""The ioctl numbers against the values the kernel's headers give (as C prints them)."""

from __future__ import annotations

import pytest

from sandbox_kernel.runtime import ioctl


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FICLONE", 0x40049409),
        ("FIDEDUPERANGE", 0xC0189436),
        ("BTRFS_IOC_SYNC", 0x9408),
        ("BTRFS_IOC_SUBVOL_CREATE", 0x5000940E),
        ("BTRFS_IOC_SNAP_DESTROY", 0x5000940F),
        ("BTRFS_IOC_SPACE_INFO", 0xC0109414),
        ("BTRFS_IOC_SNAP_CREATE_V2", 0x50009417),
        ("BTRFS_IOC_FS_INFO", 0x8400941F),
        ("BTRFS_IOC_QUOTA_CTL", 0xC0109428),
        ("BTRFS_IOC_QGROUP_LIMIT", 0x8030942B),
        ("LOOP_SET_DIRECT_IO", 0x4C08),
    ],
)
def test_numbers_match_the_headers(name: str, value: int) -> None:
    assert getattr(ioctl, name) == value


def test_encoders_place_each_field() -> None:
    assert ioctl._IO(0x94, 8) == 0x9408
    assert ioctl._IOR(0x12, 0x34, 8) == 0x80081234
    assert ioctl._IOW(0x12, 0x34, 8) == 0x40081234
    assert ioctl._IOWR(0x12, 0x34, 8) == 0xC0081234


@pytest.mark.parametrize(
    ("kind", "number", "size"), [(0x100, 1, 0), (1, 0x100, 0), (1, 1, 1 << 14)]
)
def test_fields_that_do_not_fit_are_refused(kind: int, number: int, size: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ioctl._IOW(kind, number, size)
