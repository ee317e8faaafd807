"""Watching a process through its pidfd (runtime/process.py), with real child processes."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.runtime.process import has_exited, run

HIGH_FD = 1500  # past select(2)'s 1024, as in a server holding ~84 kernels


@pytest.fixture
def high_fd_room() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
        pytest.fail(f"RLIMIT_NOFILE's hard limit {hard} leaves no room for fd {HIGH_FD}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_FD + 1), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_exit_is_seen_through_a_pidfd_numbered_past_1024(high_fd_room: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfd = os.pidfd_open(child.pid)
    high = os.dup2(pidfd, HIGH_FD)
    os.close(pidfd)
    try:
        assert not has_exited(high)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert has_exited(high)
    finally:
        os.close(high)
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)


def _started(mark: Path) -> Any:
    """A program that says it started, then, a moment later, leaves ``mark``."""
    return [
        "/bin/sh", "-c", f'echo started > {mark}.started; sleep 0.3; echo done > "{mark}"',
    ]  # fmt: skip


async def _cancelled_mid_run(mark: Path, timeout: float) -> None:
    task = asyncio.ensure_future(run(_started(mark), timeout=timeout))
    deadline = time.monotonic() + 30
    while not Path(f"{mark}.started").exists():
        assert time.monotonic() < deadline, "the program did not start"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_cancelled_run_lets_its_program_finish(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    asyncio.run(_cancelled_mid_run(mark, timeout=30))
    # Finished before the cancellation went on: not left running on its own.
    assert mark.read_text() == "done\n"


def test_a_cancelled_run_kills_its_program_at_the_timeout(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    asyncio.run(_cancelled_mid_run(mark, timeout=0.1))
    assert not mark.exists()
    # Killed, not left to finish later.
    asyncio.run(asyncio.sleep(0.5))
    assert not mark.exists()
