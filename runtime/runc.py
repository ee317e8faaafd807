"""The runc driver: every call the runtime makes to runc, async and under a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import CommandError

from . import paths
from .limits import CPU_PERIOD, Limits
from .process import run, wait_exit


def state_root() -> Path:
    """Where runc keeps its containers' state (its default ``--root`` as root)."""
    return Path("/run/runc")


async def create(container_id: str, bundle: Path, pid_file: Path) -> int:
    """Create ``container_id`` from ``bundle`` without starting its process; return
    its init's host pid. Its namespaces exist from now on; :func:`start` runs it.
    """
    return await _launch(["create"], container_id, bundle, pid_file)


async def start(container_id: str) -> None:
    """Run the process of a container made by :func:`create`.

    Raises:
        CommandError: runc failed.
    """
    await run([paths.runc_binary(), "start", container_id], timeout=60)


async def _launch(command: list[str], container_id: str, bundle: Path, pid_file: Path) -> int:
    """``runc <command>`` of a container, detached; runc's own log goes to
    ``bundle/runc.log``, its last error is in the raised :class:`CommandError`.
    """
    argv = [paths.runc_binary(), "--log", str(bundle / "runc.log"), *command,
            "--pid-file", str(pid_file), "--bundle", str(bundle), container_id]  # fmt: skip
    # runc hands its stdio to the container, whose shell replaces them at once. Pipes
    # would make us wait for that too; a file and /dev/null do not.
    errors = bundle / "runc.stderr"
    err = os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            code = await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CommandError(argv, None, errors.read_text(errors="replace")) from None
    finally:
        os.close(err)
    if code != 0:
        raise CommandError(argv, code, errors.read_text(errors="replace"))
    return int(pid_file.read_text().strip())


async def state(container_id: str) -> dict[str, Any] | None:
    """runc's state of ``container_id`` (status, pid, bundle), or None if runc has none."""
    code, out, _ = await run([paths.runc_binary(), "state", container_id], check=False)
    if code != 0:
        return None
    result: dict[str, Any] = json.loads(out)
    return result


async def kill(container_id: str, signal: str = "KILL") -> None:
    """Send ``signal`` to the container's init; a container that is gone is fine."""
    await run([paths.runc_binary(), "kill", container_id, signal], check=False)


async def delete(container_id: str) -> None:
    """Delete ``container_id``, killing it first if it still runs; gone is fine.

    A running container is killed here and its init awaited through a pidfd:
    ``runc delete --force`` would sleep a fixed 100 ms after its SIGKILL (runc 1.1),
    which every restore would pay.

    Raises:
        CommandError: runc could not delete a container that exists.
    """
    current = await state(container_id)
    if current is None:
        return
    force = current.get("status") != "stopped"
    if current.get("status") == "running" and current.get("pid"):
        try:
            pidfd = os.pidfd_open(int(current["pid"]))
        except ProcessLookupError:
            pidfd = None
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await asyncio.wait_for(wait_exit(pidfd), 10)
                force = False
            except (ProcessLookupError, TimeoutError):
                pass
            finally:
                os.close(pidfd)
    argv = [paths.runc_binary(), "delete", *(["--force"] if force else []), container_id]
    try:
        await run(argv, timeout=30)
    except CommandError as err:
        if "does not exist" not in err.stderr and "not exist" not in err.stderr:
            raise


async def update(container_id: str, limits: Limits, memory_swap: bool) -> None:
    """Change the limits of a running container; only the limits ``limits`` sets.

    Raises:
        CommandError: runc refused (for example memory below current use on v2).
    """
    argv = [paths.runc_binary(), "update"]
    if limits.memory:
        argv += ["--memory", str(limits.memory)]
        if memory_swap:
            argv += ["--memory-swap", str(limits.memory)]
    if limits.cpus:
        argv += ["--cpu-period", str(CPU_PERIOD), "--cpu-quota", str(int(limits.cpus * CPU_PERIOD))]
    if limits.pids:
        argv += ["--pids-limit", str(limits.pids)]
    await run([*argv, container_id])


async def list_containers() -> list[dict[str, Any]]:
    """Every container runc knows, as runc's JSON list."""
    _, out, _ = await run([paths.runc_binary(), "list", "--format", "json"])
    result: list[dict[str, Any]] = json.loads(out) or []
    return result


#: Seconds a freeze may keep failing ("unable to freeze") before it is given up.
PAUSE_WITHIN = 15.0


async def pause(container_id: str) -> None:
    """Freeze every process of the container (cgroup freezer).

    cgroup v1's freezer gives up when a task keeps escaping it, e.g. one forking
    or exiting at that moment, or one in uninterruptible I/O that the loaded disk
    is slow to finish (seen under load with 20 busy kernels, four tries in a row):
    runc gives up after about 0.2 s, reports "unable to freeze" and leaves the
    cgroup as it was. That is tried again, after a thaw and a growing pause, for
    up to :data:`PAUSE_WITHIN` seconds.

    Raises:
        CommandError: runc could not freeze it.
    """
    deadline = time.monotonic() + PAUSE_WITHIN
    attempt = 0
    while True:
        try:
            await run([paths.runc_binary(), "pause", container_id])
            return
        except CommandError as err:
            if "unable to freeze" not in str(err) or time.monotonic() > deadline:
                raise
        with contextlib.suppress(CommandError):
            await resume(container_id)
        attempt += 1
        await asyncio.sleep(min(0.05 * attempt, 0.5))  # let the fork, exit or I/O finish


async def resume(container_id: str) -> None:
    """Thaw a container frozen by :func:`pause`.

    Raises:
        CommandError: runc could not thaw it.
    """
    await run([paths.runc_binary(), "resume", container_id])


async def checkpoint(
    container_id: str, criu: str, images: Path, work: Path, env: dict[str, str]
) -> None:
    """Dump the container's processes into ``images`` with CRIU, leaving them running.

    ``env`` is added to runc's environment, which runc passes on to CRIU.

    Raises:
        CommandError: the dump failed; the last lines of CRIU's log are in it.
    """
    argv = [paths.runc_binary(), "--criu", criu, "checkpoint", "--leave-running",
            "--image-path", str(images), "--work-path", str(work), container_id]  # fmt: skip
    await _with_criu_log(argv, work / "dump.log", env)


async def restore(
    container_id: str,
    criu: str,
    bundle: Path,
    images: Path,
    work: Path,
    pid_file: Path,
    lazy_lock: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Restore ``container_id`` from the CRIU images in ``images``, detached; return
    the host pid of its init. ``env`` is added to runc's environment (and CRIU's).

    With ``lazy_lock``, memory is restored lazily: a ``criu lazy-pages`` daemon
    serves each page through userfaultfd when the kernel first touches it, and
    sends the rest in the background, then exits. The restore returns before the
    pages are in. The daemon runs on its own (it outlives this process) and holds
    ``lazy_lock`` (flock, shared with other readers) while it reads ``images``:
    whoever deletes them waits.

    Raises:
        CommandError: the restore failed; the last lines of CRIU's log are in it.
    """
    argv = [paths.runc_binary(), "--criu", criu, "restore", "--detach",
            "--image-path", str(images), "--work-path", str(work),
            "--bundle", str(bundle), "--pid-file", str(pid_file), container_id]  # fmt: skip
    if lazy_lock is not None:
        await _start_lazy_pages(criu, images, work, lazy_lock)
        argv.insert(argv.index("--detach") + 1, "--lazy-pages")
    await _with_criu_log(argv, work / "restore.log", env or {})
    return int(pid_file.read_text().strip())


async def _start_lazy_pages(criu: str, images: Path, work: Path, lock: Path) -> None:
    """Start CRIU's lazy-pages daemon for ``images``, detached, holding ``lock``;
    return once it listens on its socket in ``work`` (where the restore looks).

    Raises:
        CommandError: it did not come up.
    """
    socket = work / "lazy-pages.socket"
    # setsid -f: the daemon is nobody's child here, so no zombie and no warning.
    argv = ["/bin/sh", "-c", 'exec setsid -f "$@" </dev/null >/dev/null 2>&1', "sh",
            "flock", "--shared", str(lock), criu, "lazy-pages", "-D", str(images), "-W", str(work),
            "-o", "lazy-pages.log"]  # fmt: skip
    await run(argv, timeout=30)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not socket.exists():
        if loop.time() > deadline:
            raise CommandError(argv, 1, "CRIU's lazy-pages daemon did not start")
        await asyncio.sleep(0.001)


async def _with_criu_log(argv: list[str], log: Path, env: dict[str, str]) -> None:
    try:
        await run(argv, timeout=300, env=env)
    except CommandError as err:
        tail = ""
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()
            tail = "\n".join(line for line in lines if "Error" in line)[-1500:]
        raise CommandError(err.argv, err.returncode, f"{err.stderr}\n{tail}".strip()) from err
