"""The kernel's control channel as the provisioner runs it: the credentials, and the
:class:`~sandbox_kernel.runtime.control.ControlServer` the kernel's ``%container``
magic calls for snapshots, restores and limits.

One channel per kernel, for the kernel's whole life: it is made at the first
``pre_launch``, listens from the first start, outlives restarts (the kernel keeps
its address) and closes when the kernel is removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .runtime import Runtime
from .runtime.control import ControlServer, write_credentials
from .runtime.network import Addresses
from .runtime.record import KernelRecord


class ControlChannel:
    """One kernel's control server and its credentials. Made by the provisioner.

    ``on_new_process`` is called with the pid of the kernel's new init after a
    restore or reset by its magic, so the provisioner follows it.
    """

    def __init__(
        self,
        runtime: Runtime,
        kernel_id: str,
        on_new_process: Callable[[int], Awaitable[None]],
    ) -> None:
        self.runtime = runtime
        self.kernel_id = kernel_id
        self.on_new_process = on_new_process
        #: The server, from :meth:`open` to :meth:`close`.
        self.server: ControlServer | None = None

    def open(self, record: KernelRecord) -> None:
        """Make the server, once: on the host end of the kernel's veth, taking
        requests only from the kernel's address, signed with credentials written
        to its run folder for the kernel's user alone. Called by ``pre_launch``
        with the prepared kernel's record; later calls (restarts) change nothing.

        Raises:
            OSError: the credentials cannot be written.
        """
        if self.server is not None:
            return
        host = Addresses.of(record.index).host_ip
        run_dir = self.runtime.run_dir(self.kernel_id)
        token = write_credentials(run_dir, host, self.kernel_id, record.uid, record.gid)
        self.server = ControlServer(
            self.runtime, self.kernel_id, host, record.kernel_ip, token, self.on_new_process
        )

    async def listen(self) -> None:
        """Start serving, if not yet. Called once the kernel's container (and with
        it the veth) is up.

        Raises:
            OSError: the address cannot be bound.
        """
        if self.server is not None and not self.server.listening:
            await self.server.start()

    async def heard_within(self, seconds: float) -> bool:
        """Whether the kernel made a good request (it holds this channel's
        credentials) within ``seconds``; True at once if it already has."""
        if self.server is None:
            return False
        try:
            await asyncio.wait_for(self.server.heard.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop serving and forget the server. Called when the kernel is removed."""
        if self.server is not None:
            await self.server.close()
            self.server = None
