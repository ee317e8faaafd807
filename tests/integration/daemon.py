"""The daemon and unprivileged users, for the tests of shared servers.

``daemon`` starts a real ``sandbox-kernel daemon`` on a socket of its own, with a
config the test may write first; ``users`` are two real users made with
``useradd``, and ``UserServer`` runs :mod:`tests.integration.user_server` as one
of them, through the Python that uid 65534's unit tests use (this repo's root
venv lives under /root, where other users cannot enter).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pwd
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.runtime import Runtime, snapshots

from .conftest import Done, wait_until

REPO = Path(__file__).resolve().parents[2]
#: A Python every user can run, with this package installed (made by `make test`).
USER_PYTHON = REPO / "build/unit-venv/bin/python"
SOCKET = "/run/sandbox-kernel-test/daemon.sock"
USERS = ("sk-user-a", "sk-user-b")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.home), "USER": self.name, "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8", "SANDBOX_KERNEL_SOCKET": SOCKET,
        }  # fmt: skip

    def argv(self, *args: str) -> list[str]:
        """``args`` run as this user, with their groups."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "env", "-i", *(f"{k}={v}" for k, v in self.env().items()), *args]  # fmt: skip

    async def cli(self, *args: str, timeout: float = 120) -> Done:
        """``sandbox-kernel ARGS`` as this user (through the daemon)."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(str(USER_PYTHON), "-m", "sandbox_kernel.cli", *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return Done(proc.returncode, out.decode(), err.decode())

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """One raw request on the daemon's socket as this user: the reply."""
        script = (
            "import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(sys.argv[1])\n"
            "s.sendall(sys.stdin.buffer.read())\n"
            "print(s.makefile('rb').readline().decode())\n"
        )
        line = json.dumps({"op": op, "args": args}) + "\n"
        done = subprocess.run(
            self.argv(str(USER_PYTHON), "-c", script, SOCKET),
            input=line.encode(), capture_output=True, timeout=90, check=True, cwd="/",
        )  # fmt: skip
        reply: dict[str, Any] = json.loads(done.stdout)
        return reply


def _make_user(name: str) -> User:
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(name)
        return User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    home.chmod(0o755)
    return User(name, entry.pw_uid, entry.pw_gid, home)


@pytest.fixture(scope="session")
def users() -> Iterator[tuple[User, User]]:
    """Two real users; removed with their homes at the end of the session."""
    assert USER_PYTHON.exists(), (
        f"{USER_PYTHON} is missing: `make test` builds it (target build/unit-venv/.installed)"
    )
    made = [name for name in USERS if not user_exists(name)]
    pair = (_make_user(USERS[0]), _make_user(USERS[1]))
    yield pair
    for name in made:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Daemon:
    """A real daemon process on :data:`SOCKET`."""

    def __init__(self, folder: Path) -> None:
        self.config = folder / "daemon.toml"
        self.config.write_text("")
        self.log = folder / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = DaemonClient(SOCKET)

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "sandbox_kernel.cli", "daemon",
                "--socket", SOCKET, "--config", str(self.config)]  # fmt: skip
        with open(self.log, "ab") as out:
            return subprocess.Popen(argv, stdout=out, stderr=out)

    async def start(self) -> None:
        self.proc = proc = await asyncio.to_thread(self._spawn)

        async def answers() -> bool:
            assert proc.poll() is None, f"the daemon exited: {self.log.read_text()[-2000:]}"
            return _connects(SOCKET)

        await wait_until(answers, 60, "the daemon to listen")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 60)


def _connects(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


@pytest_asyncio.fixture
async def daemon(tmp_path: Path, users: tuple[User, User]) -> AsyncIterator[Daemon]:
    """A daemon for one test. Afterwards it is stopped, the kernels the test's user
    servers left are collected, and the users' snapshots deleted."""
    running = Daemon(tmp_path)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
        await Runtime().gc()
        for user in users:
            for name in (
                snapshots.names(str(user.uid)) if str(user.uid) in snapshots.owners() else []
            ):
                snapshots.delete(str(user.uid), name)
        Path(SOCKET).with_name("daemon.pid").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(SOCKET).parent.rmdir()


class UserServer:
    """:mod:`tests.integration.user_server` running as ``user``."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> UserServer:
        self.proc = await asyncio.create_subprocess_exec(
            *self.user.argv(str(USER_PYTHON), "-m", "tests.integration.user_server"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO),
        )  # fmt: skip
        return self

    async def ask(self, op: str, timeout: float = 180, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, "the user's server exited"
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def start(self, cwd: Path | None = None, **config: Any) -> dict[str, Any]:
        reply = await self.ask("start", config={"memory": "512M", **config},
                               cwd=str(cwd or self.user.home))  # fmt: skip
        assert "error" not in reply, reply["error"]
        return reply

    async def run(self, kernel_id: str, code: str) -> str:
        reply = await self.ask("run", kernel_id=kernel_id, code=code)
        assert not reply.get("error"), reply["error"]
        return str(reply["text"])

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 120)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
