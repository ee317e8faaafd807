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

    async def no_wait(_: float) -> None:
        return None

    monkeypatch.setattr(runc, "run", run)
    monkeypatch.setattr(runc.asyncio, "sleep", no_wait)
    return calls


def test_a_freeze_that_gives_up_is_tried_again_after_a_thaw(monkeypatch) -> None:
    calls = fake_runc(monkeypatch, [FREEZE, FREEZE])
    asyncio.run(runc.pause("sk-1"))
    assert calls == ["pause", "resume", "pause", "resume", "pause"]


def test_it_gives_up_after_its_tries(monkeypatch) -> None:
    calls = fake_runc(monkeypatch, [FREEZE] * runc.PAUSE_TRIES)
    with pytest.raises(CommandError, match="unable to freeze"):
        asyncio.run(runc.pause("sk-1"))
    assert calls.count("pause") == runc.PAUSE_TRIES


def test_another_failure_is_not_tried_again(monkeypatch) -> None:
    calls = fake_runc(monkeypatch, ["container does not exist"])
    with pytest.raises(CommandError, match="does not exist"):
        asyncio.run(runc.pause("sk-1"))
    assert calls == ["pause"]
