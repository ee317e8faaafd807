"""The kernel's side of the control channel: signed requests to the runtime.

Runs inside the container. Standard library only (with :mod:`sandbox_kernel.protocol`,
which is too), so it costs the kernel nothing to import.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox_kernel import protocol
from sandbox_kernel.errors import SandboxError

CREDENTIALS = Path("/run/sandbox/control.json")
#: Bytes in a request, newline not counted: the control server closes the connection
#: at a longer line, so the channel refuses to send one.
MAX_REQUEST = protocol.MAX_LINE


class ChannelError(SandboxError):
    """The runtime refused a request or could not be reached."""


class Interrupted(ChannelError):
    """The connection broke while a request was in flight: the process may have been
    restored from a snapshot taken during that request."""


def available() -> bool:
    """Whether this process runs in a sandboxed kernel with a control channel."""
    return CREDENTIALS.exists()


class Channel:
    """A connection to this kernel's control server."""

    def __init__(self, creds: dict[str, Any] | None = None) -> None:
        self._creds = creds

    @property
    def creds(self) -> dict[str, Any]:
        """The credentials given, else this kernel's, read at each request: a process
        restored from a base snapshot finds the new kernel's there, not the ones it
        was dumped with."""
        if self._creds is not None:
            return self._creds
        creds: dict[str, Any] = json.loads(CREDENTIALS.read_text())
        return creds

    @creds.setter
    def creds(self, value: dict[str, Any]) -> None:
        self._creds = value

    def request(
        self,
        op: str,
        timeout: float | None = 600,
        on_progress: Callable[[str], None] | None = None,
        **args: Any,
    ) -> Any:
        """Send ``op`` with ``args`` and return the result; lines of progress the
        runtime sends meanwhile go to ``on_progress``.

        Raises:
            ChannelError: the runtime refused or failed (its message says why), or
                the request is over :data:`MAX_REQUEST` bytes.
            Interrupted: the connection broke before the reply came.
        """
        try:
            creds = self.creds
        except (OSError, ValueError) as err:
            raise ChannelError(f"cannot read {CREDENTIALS}: {err}") from err
        try:
            data = protocol.request_line(
                op, args, kernel_id=creds["kernel_id"], token=creds["token"]
            )
        except protocol.ProtocolError as err:
            # Refused here: the server would only close the connection, which reads
            # as an Interrupted request.
            raise ChannelError(str(err)) from None
        try:
            answer = self._exchange(creds, data, timeout, on_progress)
        except Interrupted:
            raise
        except OSError as err:
            raise Interrupted(f"the control connection broke: {err}") from err
        if not answer.ok:
            raise ChannelError(answer.error)
        return answer.result

    @staticmethod
    def _exchange(
        creds: dict[str, Any],
        data: bytes,
        timeout: float | None,
        on_progress: Callable[[str], None] | None,
    ) -> protocol.Reply:
        """Send request line ``data``; pass on the progress; return the reply.

        Raises:
            Interrupted: the connection closed before the reply.
            ChannelError: the server sent a line that is no reply.
            OSError: the connection could not be made, or broke.
        """
        with socket.create_connection((creds["host"], creds["port"]), timeout=10) as conn:
            conn.settimeout(timeout)
            conn.sendall(data + b"\n")
            with conn.makefile("rb") as stream:
                while True:
                    line = stream.readline()
                    if not line.endswith(b"\n"):
                        raise Interrupted("the control connection closed")
                    try:
                        message = protocol.parse_reply(line)
                    except ValueError as err:
                        raise ChannelError(
                            f"the control server's reply is garbled: {err}"
                        ) from None
                    if isinstance(message, protocol.Reply):
                        return message
                    if on_progress is not None:
                        on_progress(message.text)
