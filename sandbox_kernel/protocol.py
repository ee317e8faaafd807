"""The control channel's wire protocol, shared by the kernel's ``%container`` magic
(``magics/channel.py``) and the runtime's control server (``runtime/control.py``).

Standard library only: the magic imports it inside every kernel.

A request is one JSON object on one line, at most :data:`MAX_LINE` bytes::

    {"op": "snapshot", "args": {"name": "x", "message": ""}, "kernel_id": "...",
     "nonce": "<32 hex digits>", "time": 1700000000.0, "mac": "<64 hex digits>"}

``mac`` is the HMAC-SHA256, under the kernel's token (hex), of the request's other
fields as ``json.dumps(..., sort_keys=True)`` writes them (see :func:`sign`). The
server answers each request with one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``, which lines of progress, ``{"progress": "..."}``,
may precede. A ``watch`` is never answered: it is held open until the kernel
closes it, or CRIU closes it in a snapshot's image.

The format is the one of earlier versions, byte for byte: a process restored from
an old snapshot still holds the old magic, and must still be understood.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandbox_kernel.errors import SandboxError

#: Bytes in a request line, newline not counted. The server closes a connection at a
#: longer line; the magic refuses to send one (a closed connection would read as an
#: interrupted request).
MAX_LINE = 64 * 1024
#: Requests older or newer than this many seconds are refused.
MAX_SKEW = 120.0
#: Characters of a nonce; the magic's are 32.
MAX_NONCE = 128


class ProtocolError(SandboxError, ValueError):
    """A request cannot be made: it would be refused (its message says why and what
    to change)."""


# ---- the operations ---------------------------------------------------------------


class Kind(enum.Enum):
    """What an argument's value may be; the value is the name used in messages."""

    TEXT = "a string"
    OBJECT = "a JSON object"
    LIST = "a list"
    LIMIT = "a string or a number"
    COUNT = "a whole number"
    FLAG = "true or false"

    def accepts(self, value: object) -> bool:
        """Whether ``value`` (from JSON) is of this kind."""
        if self is Kind.TEXT:
            return isinstance(value, str)
        if self is Kind.OBJECT:
            return isinstance(value, dict)
        if self is Kind.LIST:
            return isinstance(value, list)
        if self is Kind.FLAG:
            return isinstance(value, bool)
        if self is Kind.COUNT:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return isinstance(value, str | int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Arg:
    """One argument of an operation. An optional one may be missing or null."""

    name: str
    kind: Kind
    required: bool = True


@dataclass(frozen=True)
class Op:
    """One operation: its name, its arguments, whether it is a ``%container`` command
    a user types (``resume`` and ``watch`` are the magic's own), and whether it is
    answered (a ``watch`` is held open instead)."""

    name: str
    args: tuple[Arg, ...] = ()
    command: bool = True
    answered: bool = True


def _ops(*ops: Op) -> dict[str, Op]:
    return {op.name: op for op in ops}


#: Every operation the control server carries out, in the order ``%container``'s
#: help lists the commands. The server's dispatch table is built from this one.
OPS: Mapping[str, Op] = _ops(
    # ``count``: sent by a cell that runs nothing but the snapshot, whose number is
    # ``count - 1``: right after a checkpoint, that checkpoint is named instead.
    Op(
        "snapshot",
        (
            Arg("name", Kind.TEXT),
            Arg("message", Kind.TEXT, required=False),
            Arg("count", Kind.COUNT, required=False),
        ),
    ),
    # parent and ident: the restoring cell's request header and routing identities
    # (hex), so that a new process can answer that cell.
    # ``count``: the number the asking kernel's next cell would get, which the new
    # or restored process goes on from (numbers never repeat in one session).
    Op(
        "restore",
        (
            Arg("name", Kind.TEXT),
            Arg("parent", Kind.OBJECT),
            Arg("ident", Kind.LIST),
            Arg("count", Kind.COUNT, required=False),
        ),
    ),
    Op("list"),
    Op("delete", (Arg("name", Kind.TEXT),)),
    Op(
        "reset",
        (
            Arg("parent", Kind.OBJECT),
            Arg("ident", Kind.LIST),
            Arg("count", Kind.COUNT, required=False),
            # True: the image's pristine files, even for a class kernel.
            Arg("pristine", Kind.FLAG, required=False),
        ),
    ),
    Op("diff", (Arg("name", Kind.TEXT, required=False),)),
    Op(
        "limits",
        tuple(Arg(name, Kind.LIMIT, required=False) for name in ("memory", "cpus", "pids")),
    ),
    Op("status"),
    # A class of the kernel's owner: publish one from a snapshot, reset or list its
    # kernels (see runtime/classes.py).
    Op(
        "class",
        (
            Arg("action", Kind.TEXT),
            Arg("name", Kind.TEXT, required=False),
            Arg("snapshot", Kind.TEXT, required=False),
        ),
    ),
    # Automatic checkpoints (see runtime/timetravel.py): turn them on or off, list
    # them, go back to the one before the last N cells or before cell ``to``.
    Op("autosave", (Arg("state", Kind.TEXT, required=False),)),
    Op("history"),
    Op(
        "undo",
        (
            Arg("n", Kind.COUNT, required=False),
            Arg("to", Kind.COUNT, required=False),
            Arg("parent", Kind.OBJECT),
            Arg("ident", Kind.LIST),
            Arg("count", Kind.COUNT, required=False),
        ),
    ),
    # The magic's own: checkpoint the kernel, idle after cell ``cell``.
    Op(
        "checkpoint",
        (Arg("cell", Kind.COUNT), Arg("next", Kind.COUNT), Arg("line", Kind.TEXT)),
        command=False,
    ),
    # The restore or reset a new process must finish, if any (see the magic's handoff).
    Op("resume", command=False),
    # A pool kernel's wait to be claimed (see runtime/pool.py): answered, with what
    # ``resume`` would say, when a start takes it.
    Op("claimed", command=False),
    # Held open, never answered: its end tells the kernel it was restored.
    Op("watch", command=False, answered=False),
)

#: What ``%container class`` does.
CLASS_ACTIONS = ("publish", "reset", "ps")

#: The operations a user types as ``%container COMMAND``.
COMMANDS = tuple(name for name, op in OPS.items() if op.command)


def check_args(op: str, args: Mapping[str, Any]) -> str | None:
    """Why ``args`` do not fit operation ``op`` (a name in :data:`OPS`), or None.

    Arguments the operation does not name are ignored, so that another version's
    magic may send more.
    """
    for arg in OPS[op].args:
        value = args.get(arg.name)
        if value is None:
            if arg.required:
                return f"the {op!r} request needs its {arg.name!r} argument"
        elif not arg.kind.accepts(value):
            kind = type(value).__name__
            return f"the {op!r} request's {arg.name!r} must be {arg.kind.value}, not {kind}"
    return None


# ---- signing and checking requests -------------------------------------------------


def sign(token: str, request: Mapping[str, Any]) -> str:
    """The HMAC-SHA256 (hex) of ``request``'s fields but ``mac``, as sorted JSON,
    under ``token`` (hex).

    Raises:
        ValueError: ``token`` is not hex.
    """
    body = json.dumps({k: v for k, v in request.items() if k != "mac"}, sort_keys=True)
    return hmac.new(bytes.fromhex(token), body.encode(), hashlib.sha256).hexdigest()


def verify(token: str, request: Mapping[str, Any]) -> bool:
    """Whether ``request``'s ``mac`` is its signature under ``token``: a str of ASCII
    (``hmac.compare_digest`` raises TypeError on any other), compared in constant time."""
    mac = request.get("mac")
    return isinstance(mac, str) and mac.isascii() and hmac.compare_digest(mac, sign(token, request))


def is_recent(sent: object, now: float | None = None) -> bool:
    """Whether ``sent`` is a time (seconds since the epoch) within :data:`MAX_SKEW`
    of ``now`` (default: the clock).

    NaN must be refused by name: every comparison with it is false, so it would
    never look stale. Infinity and ints too large for a float are no times either.
    """
    if isinstance(sent, bool) or not isinstance(sent, int | float):
        return False
    try:
        seconds = float(sent)
    except OverflowError:
        return False
    now = time.time() if now is None else now
    return math.isfinite(seconds) and abs(now - seconds) <= MAX_SKEW


def make_request(
    op: str,
    args: Mapping[str, Any],
    *,
    kernel_id: str,
    token: str,
    nonce: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A signed request for ``op``; values JSON cannot hold (dates in message headers)
    go as their text. ``nonce`` and ``now`` are for tests: by default a fresh random
    nonce and the clock.

    Raises:
        ValueError: ``token`` is not hex.
    """
    request: dict[str, Any] = {
        "op": op,
        "args": dict(args),
        "kernel_id": kernel_id,
        "nonce": secrets.token_hex(16) if nonce is None else nonce,
        "time": time.time() if now is None else now,
    }
    request = json.loads(json.dumps(request, default=str))
    request["mac"] = sign(token, request)
    return request


def request_line(
    op: str,
    args: Mapping[str, Any],
    *,
    kernel_id: str,
    token: str,
    nonce: str | None = None,
    now: float | None = None,
) -> bytes:
    """A signed request for ``op`` (see :func:`make_request`) as the bytes to send,
    newline not included. Called by the magic's channel.

    Raises:
        ProtocolError: the line is over :data:`MAX_LINE` bytes, which the server
            would refuse.
        ValueError: ``token`` is not hex.
    """
    request = make_request(op, args, kernel_id=kernel_id, token=token, nonce=nonce, now=now)
    data = json.dumps(request)
    line = data.encode()
    if len(line) > MAX_LINE:
        raise ProtocolError(
            f"the {op!r} request is {len(line)} bytes, over the control channel's "
            f"{MAX_LINE}; shorten its arguments (a snapshot's message, say)"
        )
    return line


def check_request(
    request: object, *, token: str, kernel_id: str, now: float | None = None
) -> str | None:
    """Why ``request`` (parsed JSON) must be refused by kernel ``kernel_id``'s server,
    whose token is ``token``, or None if it is good. Called by the control server,
    which also checks the peer's address and that the nonce is not replayed.

    The checks, in order: a JSON object, its signature, the kernel id, the time
    (see :func:`is_recent`), a known op, args an object that fits the op
    (see :func:`check_args`), a nonce of 1 to :data:`MAX_NONCE` characters.
    """
    if not isinstance(request, dict):
        return f"a request is a JSON object, not {type(request).__name__}"
    if not verify(token, request):
        return "the request's signature is wrong"
    if request.get("kernel_id") != kernel_id:
        return "the request names another kernel"
    if not is_recent(request.get("time"), now):
        return "the request is stale"
    op = request.get("op")
    if not isinstance(op, str):
        return f'the request\'s op must be a string such as "list", not {type(op).__name__}'
    if op not in OPS:
        return f"unknown operation {op!r}; the control server knows {', '.join(OPS)}"
    args = request.get("args", {})
    if not isinstance(args, dict):
        return "the request's args must be a JSON object"
    nonce = request.get("nonce")
    if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE:
        return f"the request's nonce must be a string of 1-{MAX_NONCE} characters"
    return check_args(op, args)


def parse_request(line: bytes) -> tuple[Any, str | None]:
    """A request line as JSON, and why it cannot be read, if so (then the value is
    None). Never raises: the line is the kernel's, hence hostile."""
    try:
        return json.loads(line), None
    except RecursionError:
        return None, "the request is nested too deeply"
    except ValueError as err:  # UnicodeDecodeError too
        return None, f"the request is not JSON ({err})"


# ---- replies ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """The answer to a request: ``ok`` with a ``result``, or not, with an ``error``."""

    ok: bool
    result: Any = None
    error: str = ""


@dataclass(frozen=True)
class Progress:
    """A line of progress for the user, sent before a request's reply."""

    text: str


def ok(result: Any) -> dict[str, Any]:
    """The reply of a request carried out."""
    return {"ok": True, "result": result}


def error(text: str) -> dict[str, Any]:
    """The reply of a request that failed; ``text`` is for the user."""
    return {"ok": False, "error": text}


def refusal(problem: str) -> dict[str, Any]:
    """The reply of a request refused for ``problem`` (from :func:`check_request`)."""
    return error(f"refused: {problem}")


def progress(text: str) -> dict[str, Any]:
    """A line of progress, sent before the reply."""
    return {"progress": text}


def encode(message: Mapping[str, Any]) -> bytes:
    """A reply or progress line as the server sends it, newline included."""
    return json.dumps(message).encode() + b"\n"


def parse_reply(line: bytes) -> Reply | Progress:
    """A line the server sent, read by the magic's channel.

    Raises:
        ValueError: the line is neither a reply nor progress.
    """
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"a reply is a JSON object, not {type(message).__name__}")
    if "progress" in message:
        return Progress(str(message["progress"]))
    if message.get("ok") is True:
        return Reply(True, result=message.get("result"))
    if message.get("ok") is False:
        return Reply(False, error=str(message.get("error", "")))
    raise ValueError(f"a reply has ok true or false, not {message.get('ok')!r}")


def connections_from_outside(proc_net_tcp: str, ports: Mapping[int, str]) -> set[tuple[str, str]]:
    """The established TCP connections in ``proc_net_tcp`` (the text of a network
    namespace's ``/proc/net/tcp``) to the local ``ports`` (port -> channel name),
    from outside the namespace (loopback does not count), as (channel, remote).
    Read by the kernel's magic and, from the host, by the runtime."""
    found = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rsplit(":", 1)[1], 16)
        # 01: ESTABLISHED; 7F in the last byte of the address: 127.x.x.x
        if fields[3] == "01" and port in ports and not fields[2].split(":")[0].endswith("7F"):
            found.add((ports[port], fields[2]))
    return found
