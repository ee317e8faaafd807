"""A kernel that runs out of memory: the next cell says why, on the page."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandbox_kernel.runtime import Runtime
from sandbox_kernel.runtime.timetravel import checkpoints_of

from .page import Page, wait

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


def test_with_autosave_a_cell_out_of_memory_ends_with_an_error_and_no_dialog(
    page: Page, make_spec: Callable[..., str]
) -> None:
    spec = make_spec(memory="660M", autosave=True)
    cells = [
        "kept = 'before'",
        "%container limits --memory 300M\nb = bytearray(600_000_000)",
        "print(kept, 'b' in globals())",
    ]
    notebook = page.open(page.lab.write_notebook("oom-autosave", spec, cells), spec)
    notebook.run(0)

    def checkpointed(_: object) -> bool:
        return any(
            r.extra.get("autosave") and any(c["cell"] == 1 for c in checkpoints_of(r))
            for r in Runtime().records()
        )

    wait(page.driver, 60, "the checkpoint after the first cell", checkpointed)
    shown = notebook.run(1)
    page.shot("out-of-memory-autosave")
    # The error last (what the cell showed just before the kill may not have left
    # the dying process).
    assert shown.splitlines()[-1].startswith(
        "MemoryError: this cell needed more than the kernel's memory limit (300M); the kernel "
        "is back at its state before this cell"
    ), shown
    assert page.dialog_title() == ""  # no "Kernel Restarting"
    assert notebook.count(1) == 2
    assert notebook.run(2) == "before False"
    assert notebook.count(2) == 3
