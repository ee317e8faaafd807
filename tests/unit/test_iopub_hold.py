"""The iopub hold of a restored process (``magics/handoff.py``): output is held until
a frontend subscribes again, and a message signed before the restore, which the
process that took the snapshot sent already, is never held and sent twice."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sandbox_kernel.magics import handoff

DELIM = b"<IDS|MSG>"
SUBSCRIBED = b"(a frontend subscribed)"


class Kernel:
    """What the hold touches of an ipykernel kernel: its session and iopub thread."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.later: list[Any] = []
        loop = SimpleNamespace(
            add_callback=lambda f: f(), call_later=lambda _, f: self.later.append(f)
        )
        stream = SimpleNamespace(
            socket=SimpleNamespace(setsockopt=lambda *_: None),
            on_recv=lambda f: setattr(self, "on_recv", f),
        )
        self.iopub_thread = SimpleNamespace(
            _xpub_stream=stream, io_loop=loop,
            _handle_subscription=lambda frames: self.sent.append(SUBSCRIBED),
            _really_send=lambda msg, *a, **k: self.sent.append(msg[2]),
        )  # fmt: skip
        self.session = SimpleNamespace(sign=lambda frames: b"sig-" + frames[0])

    def message(self, body: bytes) -> list[bytes]:
        """Sign ``body`` as the session would, in the process's life now."""
        return [b"topic", DELIM, body, self.session.sign([body])]

    def send(self, frames: list[bytes]) -> None:
        # [topic, DELIM, signature, ...]: what the sender records is the body here.
        self.iopub_thread._really_send([frames[0], frames[1], frames[3], frames[2]])


@pytest.fixture
def life(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    now = ["first"]
    monkeypatch.setattr(handoff, "_start_time", lambda: now[0])
    monkeypatch.setattr(handoff.RestoreHandoff, "_take_identity", lambda self: None)
    return now


def hooked(kernel: Kernel) -> handoff.RestoreHandoff:
    made = handoff.RestoreHandoff(SimpleNamespace(kernel=kernel), channel=None)  # type: ignore[arg-type]
    made._watch_subscriptions()
    made._sign_with_current_key()
    return made


def test_output_of_a_restored_process_waits_for_the_frontend(life: list[str]) -> None:
    kernel = Kernel()
    hooked(kernel)
    kernel.send(kernel.message(b"before"))
    life[0] = "restored"
    kernel.send(kernel.message(b"one"))
    kernel.send(kernel.message(b"two"))
    assert kernel.sent == [b"sig-before"]
    kernel.on_recv([b"\x01"])  # the frontend subscribes again
    assert kernel.sent == [b"sig-before", b"sig-one", b"sig-two", SUBSCRIBED]


def test_a_message_signed_before_the_restore_is_not_held(life: list[str]) -> None:
    kernel = Kernel()
    hooked(kernel)
    queued = kernel.message(b"queued")  # in the iopub queue when the snapshot was taken
    life[0] = "restored"
    fresh = kernel.message(b"fresh")  # signed by the restored process first
    kernel.send(queued)
    kernel.send(fresh)
    # The queued one went out at once (to nobody yet); it is not held and sent
    # again to the frontend, which refuses a duplicate signature.
    assert kernel.sent == [b"sig-queued"]
    kernel.on_recv([b"\x01"])
    assert kernel.sent == [b"sig-queued", b"sig-fresh", SUBSCRIBED]
    for release in kernel.later:
        release()
    assert kernel.sent == [b"sig-queued", b"sig-fresh", SUBSCRIBED]
