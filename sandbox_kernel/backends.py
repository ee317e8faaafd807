"""Where the provisioner's kernels are run: by the daemon, or in this process.

The provisioner's ``daemon`` trait picks (see :func:`choose`). Both backends take
the same operations with the same plain data (``runtime/service.py``): the daemon
over its socket, as the server's user; the in-process one directly, as this
(root) process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .daemon_client import START_HINT, DaemonClient, daemon_running, socket_path
from .errors import ConfigError
from .runtime.callers import Caller
from .runtime.pool import drain_at_exit
from .runtime.service import KernelService

Log = logging.Logger | logging.LoggerAdapter[Any]
#: The modes of the provisioner's ``daemon`` trait.
DAEMON_MODES = ("auto", "required", "off")
Progress = Callable[[str], None]


class Backend(Protocol):
    """What the provisioner calls."""

    name: str

    async def call(
        self, op: str, progress: Callable[[str], None] | None = None, **args: Any
    ) -> Any:
        """Carry out ``op`` (see ``service.OPS``)."""
        ...

    def on_new_process(self, kernel_id: str, follow: Callable[[int], None]) -> Callable[[], None]:
        """Call ``follow(pid)`` when the kernel's magic replaces its process (a
        restore); returns the unsubscribe."""
        ...


_services: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, KernelService] = (
    weakref.WeakKeyDictionary()
)


_drain_registered = False


def local_service(log: Log | None = None) -> KernelService:
    """This process's kernel service: one per event loop, shared by its kernels. The
    first ``log`` given (the server's) gets its lines for operators."""
    global _drain_registered
    loop = asyncio.get_running_loop()
    service = _services.get(loop)
    if service is None:
        service = _services[loop] = KernelService(log=log)  # type: ignore[arg-type]
        if not _drain_registered:
            # Its pool kernels (runtime/pool.py) go with this process.
            atexit.register(drain_at_exit)
            _drain_registered = True
    return service


class LocalBackend:
    """Runs kernels in this process, which must be root."""

    name = "in-process"

    def __init__(self, log: Log | None = None) -> None:
        self.caller = Caller.of_process()
        self.log = log

    async def call(
        self, op: str, progress: Callable[[str], None] | None = None, **args: Any
    ) -> Any:
        return await local_service(self.log).call(self.caller, op, args, progress)

    def on_new_process(self, kernel_id: str, follow: Callable[[int], None]) -> Callable[[], None]:
        def listener(event: dict[str, Any]) -> None:
            if event.get("event") == "process" and event.get("kernel_id") == kernel_id:
                follow(int(event["pid"]))

        return local_service().subscribe(listener)


class DaemonBackend:
    """Asks the daemon, as this process's user."""

    name = "daemon"

    def __init__(self, path: str | None = None) -> None:
        self.client = DaemonClient(path)
        global _daemon_drain_registered
        if not _daemon_drain_registered:
            # The pool kernels the daemon keeps for this process go with it.
            atexit.register(_drain_daemon_pools, path)
            _daemon_drain_registered = True

    async def call(
        self, op: str, progress: Callable[[str], None] | None = None, **args: Any
    ) -> Any:
        return await self.client.call(op, progress, **args)

    def on_new_process(self, kernel_id: str, follow: Callable[[int], None]) -> Callable[[], None]:
        # The kernel's pidfd reports the old process's end, and the provisioner
        # then asks for the new one: no stream per kernel is needed.
        return lambda: None


_daemon_drain_registered = False


def _drain_daemon_pools(path: str | None) -> None:
    """``atexit``: ask the daemon to remove this process's pool kernels."""
    with contextlib.suppress(Exception):  # no daemon, or it refuses: gc sweeps them
        DaemonClient(path).call_sync("drain_pools", timeout=120)


def choose(mode: str, log: Log | None = None) -> Backend:
    """The backend for the ``daemon`` trait's ``mode``.

    ``auto``: the daemon if its socket is there, else this process if it is root.
    ``required``: the daemon. ``off``: this process, which must be root.

    Raises:
        ConfigError: naming what is missing and the command that fixes it.
    """
    path = socket_path()
    root = os.geteuid() == 0
    if mode == "required" or (mode == "auto" and daemon_running(path)):
        if not daemon_running(path):
            raise ConfigError(
                "SandboxProvisioner.daemon", mode,
                f"needs the sandbox-kernel daemon, and {path} is missing; start it: {START_HINT}",
            )  # fmt: skip
        return DaemonBackend(path)
    if mode not in DAEMON_MODES:
        raise ConfigError("SandboxProvisioner.daemon", mode, "is not auto, required or off")
    if not root:
        raise ConfigError(
            "sandbox kernels", f"uid {os.geteuid()}",
            f"need the sandbox-kernel daemon when the server does not run as root, and "
            f"{path} is missing; start it: {START_HINT}",
        )  # fmt: skip
    return LocalBackend(log)
