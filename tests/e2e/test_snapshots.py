"""Snapshots, restores and resets from a notebook, as the page shows them."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import pytest

from ..integration.conftest import fresh
from .page import Page

pytestmark = pytest.mark.integration


def test_a_restore_brings_back_the_old_value(
    page: Page, make_spec: Callable[..., str], names: list[str]
) -> None:
    spec, snap = make_spec(), fresh(names)
    cells = [
        "x = 'before'\nprint(x)",
        f"%container snapshot {snap}",
        "x = 'after'\nprint(x)",
        f"%container restore {snap}",
        "print('x is', x)",
    ]
    notebook = page.open(page.lab.write_notebook("restore", spec, cells), spec)
    assert notebook.run(0) == "before"
    assert f"Snapshot {snap}: live" in notebook.run(1)
    assert notebook.run(2) == "after"
    # A restore takes about a second; the restored process waits at most 10 s for
    # the page to reconnect before it answers.
    restored = notebook.run(3, timeout=60)
    shown = notebook.run(4)
    page.shot("snapshot-restore")
    assert restored.startswith(f"Restoring {snap} ..."), restored
    assert f"Restored to snapshot {snap} (live)" in restored
    assert shown == "x is before"


def test_counts_never_repeat_across_a_restore_and_a_reset(
    page: Page, make_spec: Callable[..., str], names: list[str]
) -> None:
    spec, snap = make_spec(), fresh(names)
    cells = [
        "x = 1",
        f"%container snapshot {snap}",
        "x = 2",
        "x = 3",
        f"%container restore {snap}",
        "print('x is', x)",
        "%container reset",
        "print('x' in globals())",
        "print('last')",
    ]
    notebook = page.open(page.lab.write_notebook("counts", spec, cells), spec)
    outputs = [notebook.run(i) for i in range(len(cells))]
    page.shot("execution-counts")
    assert outputs[5] == "x is 1"
    assert outputs[7] == "False"
    # Every cell shows a count, and each is above the one before: none repeats.
    prompts = notebook.prompts()[: len(cells)]
    counts = [notebook.count(i) or 0 for i in range(len(cells))]
    assert 0 not in counts, f"a cell shows no count: {prompts}"
    assert all(a < b for a, b in pairwise(counts)), prompts
