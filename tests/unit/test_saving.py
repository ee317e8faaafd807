"""Snapshots saved in the background (saving.py): order, waiting, failures, staging."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sandbox_kernel.runtime import saving


def _job(log: list[str], name: str, gate: threading.Event | None = None, fail: bool = False):
    def job() -> dict[str, str]:
        if gate is not None:
            assert gate.wait(10)
        if fail:
            raise OSError(28, "No space left on device")
        log.append(name)
        return {"name": name}

    return job


def test_saves_run_in_order_and_are_listed_until_they_end() -> None:
    log: list[str] = []
    gate = threading.Event()
    first = saving.submit(saving.Saving("u1", "a", {"name": "a"}, _job(log, "a", gate)))
    second = saving.submit(saving.Saving("u1", "b", {"name": "b"}, _job(log, "b")))
    assert [s.name for s in saving.saving("u1")] == ["a", "b"]
    assert saving.find("u1", "b") is second and saving.find("u2", "b") is None
    with pytest.raises(TimeoutError):
        first.wait(0.05)
    gate.set()
    assert second.wait(10) == {"name": "b"}
    assert log == ["a", "b"]  # a child after its parent
    assert saving.saving("u1") == [] and saving.wait_all(1)


def test_a_failed_save_is_raised_to_who_waits_and_remembered_for_its_owner() -> None:
    ended: list[saving.Saving] = []
    failed = saving.submit(
        saving.Saving("u3", "c", {"kernel_id": "k1"}, _job([], "c", fail=True), ended.append)
    )
    with pytest.raises(OSError, match="No space"):
        failed.wait(10)
    saving.wait("u3", "c", 1)  # nothing under way: returns at once
    assert ended == [failed]
    kept = saving.failures("u3")
    assert [(f["name"], f["kernel_id"]) for f in kept] == [("c", "k1")]
    assert "No space" in kept[0]["error"]
    assert saving.failures("u4") == []
    assert saving.failures("u3", since=kept[0]["time"]) == []


def test_a_report_that_fails_does_not_stop_the_worker() -> None:
    def broken(_: saving.Saving) -> None:
        raise RuntimeError("report")

    saving.submit(saving.Saving("u5", "d", {}, _job([], "d"), broken))
    after = saving.submit(saving.Saving("u5", "e", {}, _job([], "e")))
    assert after.wait(10) == {"name": "e"}


def test_staging_goes_only_to_a_tmpfs_with_memory_to_spare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_KERNEL_STAGING", "off")
    assert saving.stage(1)[0] is None
    monkeypatch.setenv("SANDBOX_KERNEL_STAGING", str(tmp_path))
    staging, why = saving.stage(1)
    assert staging is None and "not a tmpfs" in why  # pytest's tmp is on disk here
    monkeypatch.setenv("SANDBOX_KERNEL_STAGING", "/dev/shm")
    if not os.access("/dev/shm", os.W_OK):
        return
    staging, why = saving.stage(saving.meminfo()["MemTotal"])  # more than can be spared
    assert staging is None and "can spare" in why
    staging, why = saving.stage(1 << 20)
    assert staging is not None, why
    try:
        assert staging.path.parent == Path("/dev/shm")
        assert (staging.path.stat().st_mode & 0o777) == 0o700
        assert saving.staged_bytes() >= 1 << 20
        assert staging.path not in saving.leftover_stagings()  # locked: in use
    finally:
        staging.remove()
    assert not staging.path.exists()
