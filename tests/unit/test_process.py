"""Watching a process through its pidfd (runtime/process.py), with real child processes."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sandbox_kernel.runtime.process import has_exited

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
