"""Running outside programs from async code without blocking the event loop."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
from collections.abc import Sequence

from sandbox_kernel.errors import CommandError


async def run(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    timeout: float = 30.0,
    check: bool = True,
    hint: str = "",
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Run ``argv`` to completion under ``timeout`` seconds.

    Returns ``(returncode, stdout, stderr)``. With ``check`` (the default) a non-zero
    status raises; on timeout the process is killed and :class:`CommandError` raised
    with returncode None either way. ``env`` is added to this process's environment.

    A caller cancelled meanwhile (a pool fill at its server's exit) does not leave
    the program running on its own behind its clean-up: it is let finish, within
    what is left of ``timeout``, and killed after that. A ``runc restore`` left so
    went on restoring into a kernel already removed, and hung there.

    Raises:
        CommandError: the program failed (with ``check``) or timed out.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandError(argv, None, "", hint) from None
    except asyncio.CancelledError:
        await _finish(proc, deadline)
        raise
    code = proc.returncode
    assert code is not None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if check and code != 0:
        raise CommandError(argv, code, stderr or stdout, hint)
    return code, stdout, stderr


async def _finish(proc: asyncio.subprocess.Process, deadline: float) -> None:
    """Let a program whose caller was cancelled end by ``deadline`` (loop time),
    reading what it prints; kill it after that, or at a second cancellation."""
    try:
        left = max(deadline - asyncio.get_running_loop().time(), 0.0)
        await asyncio.wait_for(proc.communicate(), left)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())


def run_sync(argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> str:
    """Blocking twin of :func:`run` for the CLI and other non-async callers.

    Raises:
        CommandError: the program failed or timed out.
    """
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise CommandError(argv, None, "") from None
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr or done.stdout)
    return done.stdout


async def wait_exit(pidfd: int) -> None:
    """Wait, without polling, until the process behind ``pidfd`` has exited."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, ready)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


def has_exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited; looks, never waits.

    ``poll(2)``, not ``select(2)``: a server with many kernels holds descriptors
    numbered past 1024, which ``select`` refuses ("filedescriptor out of range").
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
