"""The control channel's wire protocol: signing, checking, the op table, replies, and
the format earlier versions of the magic send (a restored process still holds one)."""

import ast
import hashlib
import hmac
import json
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import sandbox_kernel
from sandbox_kernel import errors, protocol
from sandbox_kernel.magics.channel import Channel, ChannelError
from sandbox_kernel.protocol import MAX_LINE, MAX_NONCE, MAX_SKEW

TOKEN = "ab" * 32
KERNEL = "kernel-1"


def request(op: object = "list", args: object = None, **changes: Any) -> dict[str, Any]:
    """A signed request, with ``changes`` made to its fields before it is signed."""
    req: dict[str, Any] = {
        "op": op, "args": args or {}, "kernel_id": KERNEL,
        "nonce": f"n-{time.monotonic_ns()}", "time": time.time(),
    }  # fmt: skip
    req.update(changes)
    req["mac"] = protocol.sign(TOKEN, req)
    return req


def check(req: object) -> str | None:
    return protocol.check_request(req, token=TOKEN, kernel_id=KERNEL)


def old_magic_line(op: str, args: dict[str, Any], nonce: str, now: float) -> bytes:
    """What the magic sent before protocol.py (magics/channel.py, inline)."""
    message: dict[str, Any] = {
        "op": op, "args": args, "kernel_id": KERNEL, "nonce": nonce, "time": now,
    }  # fmt: skip
    message = json.loads(json.dumps(message, default=str))
    body = json.dumps(message, sort_keys=True)
    message["mac"] = hmac.new(bytes.fromhex(TOKEN), body.encode(), hashlib.sha256).hexdigest()
    return json.dumps(message).encode()


# ---- signing ---------------------------------------------------------------------------


def test_a_signed_request_round_trips() -> None:
    line = protocol.request_line("snapshot", {"name": "a", "message": "é"}, kernel_id=KERNEL,
                                 token=TOKEN)  # fmt: skip
    req = json.loads(line)
    assert protocol.verify(TOKEN, req)
    assert check(req) is None
    assert req["args"] == {"name": "a", "message": "é"} and len(req["nonce"]) == 32


def test_the_line_is_byte_for_byte_the_old_magics() -> None:
    args = {"name": "x", "parent": {"header": {"date": "2024"}}, "ident": ["00ff"]}
    new = protocol.request_line(
        "restore", args, kernel_id=KERNEL, token=TOKEN, nonce="0123", now=1700000000.5
    )
    assert new == old_magic_line("restore", args, "0123", 1700000000.5)
    # And a line of the old magic passes the new checks (at a time near its own).
    old = json.loads(old_magic_line("restore", args, "0123", time.time()))
    assert check(old) is None


def test_values_json_cannot_hold_go_as_text() -> None:
    from datetime import datetime

    req = protocol.make_request("list", {"when": datetime(2024, 1, 2)}, kernel_id=KERNEL,
                                token=TOKEN)  # fmt: skip
    assert req["args"]["when"] == "2024-01-02 00:00:00" and protocol.verify(TOKEN, req)


@pytest.mark.parametrize(
    "change",
    [
        {"op": "restore"},
        {"args": {"pad": 1}},
        {"kernel_id": "kernel-2"},
        {"nonce": "another"},
        {"time": 1.0},
    ],
)
def test_a_tampered_request_is_refused(change: dict[str, Any]) -> None:
    req = {**request(), **change}
    assert not protocol.verify(TOKEN, req)
    assert check(req) == "the request's signature is wrong"


def test_another_token_is_refused() -> None:
    req = request()
    req["mac"] = protocol.sign("cd" * 32, req)
    assert check(req) == "the request's signature is wrong"


@pytest.mark.parametrize("mac", ["é" * 64, "\ud800", None, 5, ["x"], ""])
def test_a_mac_that_is_no_ascii_string_is_wrong_not_an_error(mac: object) -> None:
    req = {**request(), "mac": mac}
    assert protocol.verify(TOKEN, req) is False


# ---- freshness ---------------------------------------------------------------------------


def test_a_stale_or_future_request_is_refused() -> None:
    now = time.time()
    assert check(request(time=now - MAX_SKEW - 5)) == "the request is stale"
    assert check(request(time=now + MAX_SKEW + 5)) == "the request is stale"
    assert check(request(time=now - MAX_SKEW + 5)) is None
    assert check(request(time=int(now))) is None


@pytest.mark.parametrize("sent", [float("nan"), float("inf"), -float("inf"), 10**400, True,
                                  False, "now", None, [1]])  # fmt: skip
def test_a_time_that_is_no_finite_number_is_stale(sent: object) -> None:
    # NaN compares false with everything, so it would never look stale.
    assert not protocol.is_recent(sent)
    assert check(request(time=sent)) == "the request is stale"


# ---- the rest of the checks ------------------------------------------------------------


def test_a_replay_is_left_to_the_server() -> None:
    # The protocol keeps no state: the same request passes twice here, and the control
    # server, which remembers nonces, refuses the second (tests/unit/test_control.py).
    req = request()
    assert check(req) is None and check(req) is None


def test_only_json_objects_are_requests() -> None:
    for value, kind in (([], "list"), (None, "NoneType"), ("x", "str"), (1, "int")):
        assert check(value) == f"a request is a JSON object, not {kind}"


def test_an_unknown_op_is_refused() -> None:
    problem = check(request(op="frobnicate"))
    assert problem is not None and "unknown operation 'frobnicate'" in problem
    assert "snapshot" in problem  # it names the ones it knows
    assert "op must be a string" in str(check(request(op=5)))
    assert "op must be a string" in str(check(request(op=None)))


def test_args_must_be_an_object_that_fits_the_op() -> None:
    assert check(request(args=[1])) == "the request's args must be a JSON object"
    assert "needs its 'name'" in str(check(request("delete", {})))
    assert "'name' must be a string, not int" in str(check(request("delete", {"name": 1})))
    assert "'parent' must be a JSON object" in str(
        check(request("reset", {"parent": [], "ident": []}))
    )
    # Optional ones may be null, and args the op does not name are ignored.
    assert check(request("diff", {"name": None, "extra": 1})) is None
    assert check(request("limits", {"memory": "2G", "cpus": 1.5, "pids": None})) is None


def test_a_nonce_has_1_to_128_characters() -> None:
    assert check(request(nonce="n" * MAX_NONCE)) is None
    for nonce in ("", "n" * (MAX_NONCE + 1), 5, None):
        assert "nonce must be a string of 1-128" in str(check(request(nonce=nonce)))


def test_unreadable_lines_are_problems_not_errors() -> None:
    assert protocol.parse_request(b'{"op": "list"}') == ({"op": "list"}, None)
    assert "not JSON" in str(protocol.parse_request(b"{")[1])
    assert "not JSON" in str(protocol.parse_request(b"\xff\xfe")[1])
    assert "nested too deeply" in str(protocol.parse_request(b"[" * 100_000)[1])


# ---- the op table --------------------------------------------------------------------------


def test_the_commands_are_the_users_ops_in_the_helps_order() -> None:
    assert protocol.COMMANDS == (
        "snapshot", "restore", "list", "delete", "reset", "diff", "limits", "status", "class",
        "autosave", "history", "undo",
    )  # fmt: skip
    assert {n for n, op in protocol.OPS.items() if not op.command} == {
        "checkpoint", "resume", "claimed", "watch",
    }  # fmt: skip
    assert [n for n, op in protocol.OPS.items() if not op.answered] == ["watch"]


# ---- replies -------------------------------------------------------------------------------


def test_replies_round_trip() -> None:
    def back(message: dict[str, Any]) -> protocol.Reply | protocol.Progress:
        line = protocol.encode(message)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        return protocol.parse_reply(line)

    assert back(protocol.ok({"a": 1})) == protocol.Reply(True, result={"a": 1})
    assert back(protocol.ok(None)) == protocol.Reply(True)
    assert back(protocol.error("no")) == protocol.Reply(False, error="no")
    assert back(protocol.refusal("bad")) == protocol.Reply(False, error="refused: bad")
    assert back(protocol.progress("dumping")) == protocol.Progress("dumping")
    # The shapes on the wire are the old ones.
    assert protocol.ok(1) == {"ok": True, "result": 1}
    assert protocol.refusal("x") == {"ok": False, "error": "refused: x"}
    assert protocol.progress("p") == {"progress": "p"}


@pytest.mark.parametrize("line", [b"[]", b"{}", b'{"ok": 1}', b"{"])
def test_a_garbled_reply_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError):
        protocol.parse_reply(line)


# ---- the line limit, and the magic's side ----------------------------------------------


def test_a_request_over_the_line_limit_is_not_made() -> None:
    def line(size: int) -> bytes:
        return protocol.request_line("snapshot", {"name": "x", "message": "m" * size},
                                     kernel_id=KERNEL, token=TOKEN, nonce="n", now=1.0)  # fmt: skip

    room = MAX_LINE - len(line(0))
    assert len(line(room)) == MAX_LINE
    with pytest.raises(protocol.ProtocolError, match="65537 bytes, over the control channel's"):
        line(room + 1)


def test_the_channel_refuses_an_oversize_request_before_sending() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        creds = {"host": "127.0.0.1", "port": port, "token": TOKEN, "kernel_id": KERNEL}
        with pytest.raises(ChannelError, match="over the control channel's 65536; shorten"):
            Channel(creds).request("snapshot", name="x", message="m" * MAX_LINE)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected


def test_the_protocol_imports_the_standard_library_only() -> None:
    # The magic imports it inside every kernel. Read from the source, not tried in a
    # new interpreter: the tests may run as a user who cannot start this one.
    def imports(module: ModuleType) -> set[str]:
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
        return found

    ours = {"sandbox_kernel", "sandbox_kernel.errors", "sandbox_kernel.protocol"}
    for module in (protocol, errors, sandbox_kernel):
        outside = {
            name for name in imports(module)
            if name.split(".")[0] not in sys.stdlib_module_names and name not in ours
        }  # fmt: skip
        assert not outside, f"{module.__name__} imports {outside}"


def test_connections_from_outside_counts_established_non_loopback_ones() -> None:
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    rows = [
        "0: 0600D50A:C351 0500D50A:C9D2 01 0 0",  # shell (50001), from the veth: counted
        "1: 0600D50A:C352 0500D50A:C9DC 01 0 0",  # iopub (50002)
        "2: 0600D50A:C352 0500D50A:C9DE 01 0 0",  # iopub, a second client
        "3: 0100007F:C352 0100007F:9999 01 0 0",  # iopub over loopback: not counted
        "4: 0600D50A:C351 0500D50A:AAAA 06 0 0",  # TIME_WAIT: not counted
        "5: 00000000:C351 00000000:0000 0A 0 0",  # LISTEN
        "6: 0600D50A:1F90 0500D50A:BBBB 01 0 0",  # another port
    ]
    found = protocol.connections_from_outside(
        head + "\n".join(rows), {50001: "shell", 50002: "iopub"}
    )
    assert sorted(c for c, _ in found) == ["iopub", "iopub", "shell"]
