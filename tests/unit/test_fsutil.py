"""Draft folders and lock probes (fsutil.py), on a temporary folder: no root, no btrfs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sandbox_kernel.runtime.fsutil import DraftFolder, aflocked, flocked, lock_held


def test_lock_held_probes_without_keeping_or_making(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with pytest.raises(FileNotFoundError):
        lock_held(lock)
    assert not lock.exists()
    with flocked(lock):
        assert lock_held(lock)
    assert not lock_held(lock)
    assert not lock_held(lock)  # the probe itself kept nothing


def test_draft_is_hidden_then_renamed_into_place(tmp_path: Path) -> None:
    draft = DraftFolder(tmp_path, "snap")
    assert draft.path.parent == tmp_path
    assert draft.path.name.startswith(".snap.")
    assert draft.path.stat().st_mode & 0o777 == 0o700
    (draft.path / "data").write_text("x")
    draft.commit(tmp_path / "snap")
    assert draft.committed
    assert (tmp_path / "snap" / "data").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]
    draft.discard()  # after a commit: nothing
    assert (tmp_path / "snap" / "data").exists()


def test_locked_draft_holds_its_lock_until_commit(tmp_path: Path) -> None:
    draft = DraftFolder(tmp_path, "snap", lock=True)
    assert lock_held(draft.path / ".lock")
    draft.commit(tmp_path / "snap")
    assert not (tmp_path / "snap" / ".lock").exists()


def test_discard_removes_with_the_given_function_and_releases(tmp_path: Path) -> None:
    removed: list[Path] = []
    draft = DraftFolder(tmp_path, "snap", lock=True, remove=removed.append)
    lock = draft.path / ".lock"
    draft.discard()
    draft.discard()
    assert removed == [draft.path]
    assert not lock_held(lock)


def test_failed_rename_leaves_the_draft_to_discard(tmp_path: Path) -> None:
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "other").write_text("kept")
    draft = DraftFolder(tmp_path, "snap", lock=True)
    with pytest.raises(OSError):
        draft.commit(tmp_path / "snap")
    assert not draft.committed
    assert lock_held(draft.path / ".lock")
    draft.discard()
    assert not draft.path.exists()
    assert (tmp_path / "snap" / "other").read_text() == "kept"


def test_block_that_fails_discards_the_draft(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), DraftFolder(tmp_path, "base") as draft:
        (draft.path / "half").write_text("x")
        raise RuntimeError("cut short")
    assert list(tmp_path.iterdir()) == []


async def test_lock_waiters_never_starve_the_holder_of_threads(tmp_path: Path) -> None:
    """More waiters than the event loop's default pool has threads: the holder still
    gets a pool thread for its own work, then every waiter gets the lock in turn."""
    lock = tmp_path / "lock"
    order: list[int] = []

    async def wait_then_hold(n: int) -> None:
        async with aflocked(lock):
            order.append(n)

    async with aflocked(lock):
        waiters = [asyncio.create_task(wait_then_hold(n)) for n in range(40)]
        await asyncio.sleep(0)  # let them start waiting
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 10) == 42
    await asyncio.wait_for(asyncio.gather(*waiters), 30)
    assert sorted(order) == list(range(40))


async def test_a_cancelled_lock_waiter_leaves_the_lock_free(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    async with aflocked(lock):
        waiter = asyncio.create_task(aflocked(lock).__aenter__())
        await asyncio.sleep(0)  # let it start waiting
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    # The abandoned waiter's thread takes the lock and drops it at once.
    async with asyncio.timeout(10):
        async with aflocked(lock):
            pass
    with flocked(lock, blocking=False) as held:
        assert held is not None
