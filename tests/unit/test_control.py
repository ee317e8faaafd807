"""The control channel's checks: forged, replayed, stale and misaddressed requests."""

import time
from typing import Any

from sandbox_kernel.runtime.control import ControlServer, sign

TOKEN = "ab" * 32


async def nothing(pid: int) -> None:
    return None


def server() -> ControlServer:
    return ControlServer(None, "kernel-1", "10.213.0.5", "10.213.0.6", TOKEN, nothing)


def request(**changes: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "op": "list", "args": {}, "kernel_id": "kernel-1",
        "nonce": f"n-{time.monotonic_ns()}", "time": time.time(),
    }  # fmt: skip
    req.update(changes)
    req["mac"] = sign(TOKEN, req)
    return req


def test_a_good_request_passes_once() -> None:
    s, req = server(), request()
    assert s.check(req, "10.213.0.6") is None
    assert s.check(req, "10.213.0.6") == "the request was replayed"


def test_a_forged_signature_is_refused() -> None:
    req = request()
    req["mac"] = sign("cd" * 32, req)
    assert server().check(req, "10.213.0.6") == "the request's signature is wrong"


def test_a_changed_request_is_refused() -> None:
    req = request()
    req["op"] = "restore"
    assert server().check(req, "10.213.0.6") == "the request's signature is wrong"


def test_another_kernels_id_is_refused() -> None:
    assert server().check(request(kernel_id="kernel-2"), "10.213.0.6") == (
        "the request names another kernel"
    )


def test_a_stale_request_is_refused() -> None:
    assert server().check(request(time=time.time() - 3600), "10.213.0.6") == (
        "the request is stale"
    )


def test_only_the_kernels_own_address_is_served() -> None:
    problem = server().check(request(), "10.213.0.10")
    assert problem is not None and "only taken from this kernel" in problem
