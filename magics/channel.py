"""The kernel's side of the control channel: signed requests to the runtime.

Runs inside the container. Standard library only, so it costs the kernel nothing
to import.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CREDENTIALS = Path("/run/sandbox/control.json")
#: Bytes in a request, newline not counted: the control server closes the connection
#: at a longer line (``runtime/control.py``'s ``MAX_LINE``, which this must equal; it
#: is not imported so that this module stays free of the runtime's imports).
MAX_REQUEST = 64 * 1024


class ChannelError(Exception):
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
        message: dict[str, Any] = {
            "op": op,
            "args": args,
            "kernel_id": creds["kernel_id"],
            "nonce": secrets.token_hex(16),
            "time": time.time(),
        }
        message = json.loads(json.dumps(message, default=str))  # dates in headers as text
        body = json.dumps(message, sort_keys=True)
        key = bytes.fromhex(creds["token"])
        message["mac"] = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        data = json.dumps(message).encode()
        if len(data) > MAX_REQUEST:
            # Refused here: the server would only close the connection, which reads
            # as an Interrupted request.
            raise ChannelError(
                f"the {op!r} request is {len(data)} bytes, over the control channel's "
                f"{MAX_REQUEST}; shorten its arguments (a snapshot's message, say)"
            )
        try:
            with socket.create_connection((creds["host"], creds["port"]), timeout=10) as conn:
                conn.settimeout(timeout)
                conn.sendall(data + b"\n")
                with conn.makefile("rb") as stream:
                    while True:
                        reply = stream.readline()
                        if not reply.endswith(b"\n"):
                            raise Interrupted("the control connection closed")
                        line = json.loads(reply)
                        if "progress" not in line:
                            break
                        if on_progress is not None:
                            on_progress(line["progress"])
        except Interrupted:
            raise
        except OSError as err:
            raise Interrupted(f"the control connection broke: {err}") from err
        answer = line
        if not answer["ok"]:
            raise ChannelError(answer["error"])
        return answer["result"]
