"""runc pause tries again when cgroup v1's freezer gives up, and only then."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from sandbox_kernel.errors import CommandError
from sandbox_kernel.runtime import runc

FREEZE = 'time="..." level=error msg="unable to freeze"'


def fake_runc(monkeypatch: pytest.MonkeyPatch, pause_failures: list[str]) -> list[str]:
    """runc as a list of answers: each ``pause`` takes the next failure, if any."""
    calls: list[str] = []

    async def run(argv: Sequence[str], **_: Any) -> tuple[int, str, str]:
        verb = argv[1]
        calls.append(verb)
        if verb == "pause" and pause_failures:
            raise CommandError(argv, 1, pause_failures.pop(0))
        return 0, "", ""

    clock = [0.0]

    async def no_wait(seconds: float) -> None:
        clock[0] += seconds + 0.2  # runc's own tries before it gives up

    monkeypatch.setattr(runc, "run", run)
    monkeypatch.setattr(runc.asyncio, "sleep", no_wait)
    monkeypatch.setattr(runc.time, "monotonic", lambda: clock[0])
    return calls


def test_a_freeze_that_gives_up_is_tried_again_after_a_thaw(monkeypatch) -> None:
    calls = fake_runc(monkeypatch, [FREEZE, FREEZE])
    asyncio.run(runc.pause("sk-1"))
    assert calls == ["pause", "resume", "pause", "resume", "pause"]


def test_it_keeps_trying_for_seconds_then_gives_up(monkeypatch) -> None:
    calls = fake_runc(monkeypatch, [FREEZE] * 1000)
    with pytest.raises(CommandError, match="unable to freeze"):
        asyncio.run(runc.pause("sk-1"))
    # Tried well beyond the four tries that CI saw fail under load, and not forever.
    assert 10 < calls.count("pause") < 100
    assert calls[-1] == "pause"


def test_another_failure_is_not_tried_again(monkeypatch) -> None:
    calls = fake_runc(monkeypatch, ["container does not exist"])
    with pytest.raises(CommandError, match="does not exist"):
        asyncio.run(runc.pause("sk-1"))
    assert calls == ["pause"]
