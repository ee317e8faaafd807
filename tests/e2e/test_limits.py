"""A kernel that runs out of memory: the next cell says why, on the page."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .page import Page

pytestmark = pytest.mark.integration


def test_out_of_memory_is_shown_at_the_next_cell(page: Page, make_spec: Callable[..., str]) -> None:
    spec = make_spec()
    cells = [
        "%container limits --memory 300M",
        "b = bytearray(600_000_000)",
        "print('back', 'b' in globals())",
        "print('once')",
    ]
    notebook = page.open(page.lab.write_notebook("oom", spec, cells), spec)
    assert "memory 300M" in notebook.run(0)
    notebook.execute(1)
    notebook.wait_restarted(1)
    shown = notebook.run(2)
    page.shot("out-of-memory")
    warning, back = shown.rsplit("\n", 1)
    assert warning.startswith(
        "Warning: the previous kernel process ended: The kernel ran out of memory"
    ), shown
    assert "(300M)" in warning and "%container limits --memory" in warning
    assert back == "back False"
    assert notebook.run(3) == "once"
