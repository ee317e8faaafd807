"""The frontend's sockets of a sandboxed kernel reconnect quickly after a restore."""

from __future__ import annotations

from types import SimpleNamespace

import zmq
import zmq.asyncio

from sandbox_kernel.provisioner import (
    RECONNECT_IVL_MAX_MS,
    RECONNECT_IVL_MS,
    _reconnect_quickly,
)


def test_sockets_the_kernel_managers_context_makes_reconnect_within_50_ms() -> None:
    context = zmq.asyncio.Context()
    try:
        before = context.socket(zmq.DEALER)
        _reconnect_quickly(SimpleNamespace(context=context))
        after = context.socket(zmq.DEALER)
        try:
            assert after.getsockopt(zmq.RECONNECT_IVL) == RECONNECT_IVL_MS == 10
            assert after.getsockopt(zmq.RECONNECT_IVL_MAX) == RECONNECT_IVL_MAX_MS == 50
            assert before.getsockopt(zmq.RECONNECT_IVL) == 100  # libzmq's default
        finally:
            before.close(0)
            after.close(0)
    finally:
        context.term()


def test_a_manager_without_a_context_is_left_alone() -> None:
    _reconnect_quickly(SimpleNamespace())
    _reconnect_quickly(SimpleNamespace(context=None))
