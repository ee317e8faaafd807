"""The unit tier: pure logic and fakes, no root needed, nothing mounted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def _mounts() -> set[str]:
    return {line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()}


@pytest.fixture(autouse=True)
def mounts_nothing() -> Iterator[None]:
    """Fail a unit test that mounts something (a btrfs volume made in its state
    folder, say, when the tests run as root)."""
    before = _mounts()
    yield
    new = sorted(_mounts() - before)
    assert not new, f"a unit test mounted {new}"
