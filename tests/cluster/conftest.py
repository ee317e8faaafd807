"""The cluster every test here runs on: brought up once, taken down at the end, and
nothing of it may be left."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox_kernel.runtime import cluster


@pytest.fixture(scope="package")
def up() -> Iterator[None]:
    cluster.up(say=lambda _: None)
    try:
        yield
    finally:
        cluster.down(say=lambda _: None)
    assert cluster.leftovers() == []


# The kernels' fixture (see kernels.py).
from .kernels import slurm_kernels  # noqa: E402, F401
