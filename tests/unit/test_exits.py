"""How a kernel ended, read from tini's lines in its log, and what the user is told."""

from __future__ import annotations

import signal

from sandbox_kernel.runtime.exits import describe, signal_in_log

SPAWNED = "[INFO  tini (1)] Spawned child process '/bin/python' with pid '7'\n"


def ended(what: str) -> str:
    return f"[INFO  tini (1)] Main child exited with signal (with signal '{what}')\n"


def test_the_signal_of_the_last_process_only() -> None:
    assert signal_in_log(SPAWNED + "output\n" + ended("Bus error")) is signal.SIGBUS
    assert signal_in_log(SPAWNED + ended("Segmentation fault")) is signal.SIGSEGV
    # An earlier process's end is old news once a new one was spawned.
    assert signal_in_log(SPAWNED + ended("Killed") + SPAWNED + "running\n") is None
    assert signal_in_log(SPAWNED + "Main child exited normally (with status '0')\n") is None
    assert signal_in_log("") is None
    assert signal_in_log(SPAWNED + ended("Not a signal at all")) is None


def test_an_oom_kill_names_the_limit_the_magic_and_the_cli() -> None:
    last = describe(True, signal.SIGKILL, 300 << 20)
    assert last is not None and last["reason"] == "oom" and last["limit"] == 300 << 20
    assert "(300M)" in last["text"]
    assert "%container limits --memory" in last["text"]
    assert "sandbox-kernel install --memory" in last["text"]


def test_a_crash_names_its_signal() -> None:
    last = describe(False, signal.SIGSEGV, None)
    assert last is not None and last["signal"] == "SIGSEGV"
    assert "SIGSEGV (Segmentation fault)" in last["text"] and "native code" in last["text"]
    outside = describe(False, signal.SIGTERM, None)
    assert outside is not None and "native code" not in outside["text"]


def test_an_exit_by_itself_is_no_news() -> None:
    assert describe(False, None, 1 << 30) is None
