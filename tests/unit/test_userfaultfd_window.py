"""The window in which a lazy restore may open userfaultfds: opened, closed, and
closed again after a process that died inside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox_kernel.runtime import checkpoint


@pytest.fixture
def sysctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake = tmp_path / "unprivileged_userfaultfd"
    fake.write_text("0\n")
    monkeypatch.setattr(checkpoint, "UFFD_SYSCTL", fake)
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(tmp_path / "state"))
    return fake


async def test_the_window_opens_for_the_restore_and_closes_after(sysctl: Path) -> None:
    async with checkpoint.userfaultfd_window():
        assert sysctl.read_text().strip() == "1"
    assert sysctl.read_text().strip() == "0"
    assert not checkpoint.close_stale_window()


async def test_the_window_closes_when_the_restore_fails(sysctl: Path) -> None:
    with pytest.raises(RuntimeError):
        async with checkpoint.userfaultfd_window():
            raise RuntimeError("CRIU failed")
    assert sysctl.read_text().strip() == "0"


async def test_a_machine_that_allows_it_already_is_left_as_it_is(sysctl: Path) -> None:
    sysctl.write_text("1\n")
    async with checkpoint.userfaultfd_window():
        pass
    assert sysctl.read_text().strip() == "1"


def test_a_window_left_open_by_a_dead_process_is_closed(sysctl: Path) -> None:
    # What a process that died inside the window leaves: the sysctl at 1, and the
    # value to go back to in the (unlocked) lock file.
    lock = checkpoint._uffd_lock()
    lock.parent.mkdir(parents=True)
    lock.write_text("0")
    sysctl.write_text("1\n")
    assert checkpoint.close_stale_window()
    assert sysctl.read_text().strip() == "0"
    assert os.path.getsize(lock) == 0
    assert not checkpoint.close_stale_window()
