"""The kernel's process as the provisioner sees it: followed through a pidfd, across
restores, with an exit status derived from how it ended.

A kernel's container has one init process, its PID 1, which the provisioner follows
through a pidfd: waits on it without polling, and signals it without ever reaching
a process that reused the pid. A restore (by the CLI or the ``%container`` magic)
or a reset replaces that process with a new one; :class:`KernelProcess` follows
the new one, so jupyter_client sees the same kernel alive.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from .backends import Backend
from .errors import SandboxError
from .runtime.process import has_exited, wait_exit


class KernelProcess:
    """One kernel's init process. Made by the provisioner, which hands it ``poll``,
    ``wait`` and ``send_signal``.

    runc keeps no exit status for detached containers, so :meth:`status` derives
    one: -9 for a kernel the OOM killer or ``kill`` ended, the signal's negative
    for other signals sent here, 0 after a requested shutdown, else 1.

    Attributes:
        pid: the host pid of the kernel's init, None when there is none to follow.
        shutdown_requested: set by the provisioner when jupyter_client asks the
            kernel to shut down, so its own exit then reports 0 (and a restore cut
            short is not finished).
    """

    def __init__(
        self,
        backend: Backend,
        kernel_id: str,
        log: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self.backend = backend
        self.kernel_id = kernel_id
        self.log = log
        self.pid: int | None = None
        self.shutdown_requested = False
        self._pidfd: int | None = None
        self._signalled: int | None = None
        self._exit_status: int | None = None

    # ---- following ---------------------------------------------------------------

    def launching(self) -> None:
        """A new launch of the kernel: forget how the last process ended. Called by
        the provisioner's ``pre_launch``."""
        self._signalled = None
        self.shutdown_requested = False
        self._exit_status = None

    def track(self, pid: int | None) -> None:
        """Follow ``pid`` from now on (None: no process). A pid already gone is
        noted as exited at the next look."""
        self._close_pidfd()
        self.pid = pid
        if pid is not None:
            try:
                self._pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._pidfd = None  # already gone: poll() reports the exit

    def adopt(self, pid: int) -> None:
        """Follow the kernel's new process after a restore or reset by its magic
        (the backend's ``on_new_process``)."""
        if pid != self.pid:
            self.track(pid)

    def forget(self) -> None:
        """Stop following the process (it is gone, or the container is taken down)."""
        self._close_pidfd()
        self.pid = None

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    @property
    def running(self) -> bool:
        """Whether there is a process and it has not exited (looks, never waits)."""
        return self.pid is not None and not self._exited()

    def _exited(self) -> bool:
        if self._pidfd is None:
            return True
        return has_exited(self._pidfd)

    async def follow_restore(self) -> bool:
        """After a restore (by the CLI or a magic) the container's init is a new
        process: track it and report the kernel alive. False if the kernel is gone.

        A restore whose runtime died in the middle is finished here, unless a
        shutdown was requested; its failure is logged, not raised.
        """
        pid = None
        if not self.shutdown_requested:
            try:
                pid = await self.backend.call("pid", kernel_id=self.kernel_id, finish=True)
            except SandboxError as err:
                self.log.warning("Kernel %s: a cut-short restore failed: %s", self.kernel_id, err)
        if pid is None and not self.shutdown_requested and self._signalled is None:
            pid = await self._recover()
        if pid is None:
            try:
                pid = await self.backend.call("pid", kernel_id=self.kernel_id)
            except SandboxError as err:
                self.log.warning("Kernel %s is gone: %s", self.kernel_id, err)
        if pid is None:
            return False
        if pid != self.pid:  # else the control server already followed it
            self.track(pid)
            self.log.info("Kernel %s was restored from a snapshot (pid %s)", self.kernel_id, pid)
        return True

    async def _recover(self) -> int | None:
        """The process died unasked: where it died out of memory or by a signal and
        has a checkpoint, the runtime brings it back from it, and the cell that was
        running ends with an error (runtime/timetravel.py). The new pid, or None."""
        try:
            done = await self.backend.call("recover", kernel_id=self.kernel_id)
        except SandboxError as err:
            self.log.warning("Kernel %s could not be recovered: %s", self.kernel_id, err)
            return None
        if not done:
            return None
        self.log.warning(
            "Kernel %s: %s; restored from its latest checkpoint", self.kernel_id, done["text"]
        )
        pid = int(done["pid"])
        self.track(pid)
        return pid

    # ---- the process-like methods --------------------------------------------------

    async def poll(self) -> int | None:
        """None while the kernel runs (also in a process new after a restore), else
        its exit status (see :meth:`status`); 0 if there is no process."""
        if self.pid is None:
            return 0
        if not self._exited() or await self.follow_restore():
            return None
        return await self.status()

    async def wait(self) -> int:
        """Wait for the kernel to exit, without polling, following it across
        restores; return its status. Afterwards :attr:`pid` is None."""
        if self.pid is None:
            return 0
        while self._pidfd is not None:
            await wait_exit(self._pidfd)
            if not await self.follow_restore():
                break
        status = await self.status()
        self.forget()
        return status

    async def send_signal(self, signum: int) -> None:
        """Send ``signum`` through the pidfd, so it can never reach a process that
        reused the pid. Nothing happens if the kernel is gone."""
        if self._exited() and not await self.follow_restore():
            return
        if self._pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            return
        if signum in (signal.SIGKILL, signal.SIGTERM):
            self._signalled = signum

    # ---- how it ended --------------------------------------------------------------

    async def status(self) -> int:
        """The exit status of the process that exited, derived once and kept. An
        OOM kill and an exit by itself are logged, the OOM kill also to the kernel's
        log, where the user's ``sandbox-kernel logs`` finds it."""
        if self._exit_status is not None:
            return self._exit_status
        asked = self.shutdown_requested or self._signalled is not None
        try:
            ended = await self.backend.call("ended", kernel_id=self.kernel_id, asked=asked)
        except SandboxError as err:
            ended = {"oom": "", "signal": "", "text": "", "log_tail": f"(no log: {err})"}
        if ended["oom"]:
            self.log.warning("Kernel %s: %s", self.kernel_id, ended["oom"])
            status = -signal.SIGKILL
        elif ended["signal"] and self._signalled is None:
            self.log.warning("Kernel %s: %s", self.kernel_id, ended["text"])
            status = -signal.Signals[ended["signal"]].value
        elif self._signalled is not None:
            status = -self._signalled
        elif self.shutdown_requested:
            status = 0
        else:
            status = 1
            # Died by itself: the restarter's message says nothing of why; its log does.
            self.log.warning(
                "Kernel %s exited by itself; the end of its log:\n%s",
                self.kernel_id, ended["log_tail"],
            )  # fmt: skip
        self._exit_status = status
        return status
