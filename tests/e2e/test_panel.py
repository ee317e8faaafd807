"""The ``%container`` panel (ipywidgets): it renders, its Restore button restores, and
its timeline of checkpoints goes back to the chosen one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandbox_kernel.runtime import Runtime
from sandbox_kernel.runtime.timetravel import checkpoints_of

from ..integration.conftest import fresh
from .page import Notebook, Page, wait

pytestmark = pytest.mark.integration


def _cells(snap: str) -> list[str]:
    """The notebook both tests run: a snapshot, a change, the panel, then a check."""
    return ["x = 'before'", f"%container snapshot {snap}", "x = 'after'", "%container",
            "print('x is', x)"]  # fmt: skip


def _restore_from_the_panel(page: Page, notebook: Notebook, snap: str, shots: str) -> None:
    """Run the cells, click Restore beside ``snap`` in the panel, and check the next
    cell sees the old value; screenshots ``shots`` and ``shots``-restore."""
    notebook.run(0)
    assert f"Snapshot {snap}: live" in notebook.run(1)
    notebook.run(2)
    notebook.run(3)
    # The snapshot's row: its name and, beside it, a button that says Restore.
    restore = notebook.find(
        3,
        f".//div[contains(@class, 'widget-hbox')][contains(normalize-space(.), '{snap}')]"
        "//button[normalize-space() = 'Restore']",
        what=f"the panel's Restore button beside {snap}",
    )
    page.shot(shots)
    panel = notebook.output(3)
    assert panel.startswith("Container"), panel
    assert "memory" in panel and "Snapshots" in panel and "Limits" in panel
    restore.click()
    notebook.wait_output(3, f"Restored to snapshot {snap}", timeout=60)
    shown = notebook.run(4)
    page.shot(f"{shots}-restore")
    assert shown == "x is before"


def test_the_panel_restores_a_snapshot(
    page: Page, make_spec: Callable[..., str], names: list[str]
) -> None:
    spec, snap = make_spec(), fresh(names)
    notebook = page.open(page.lab.write_notebook("panel", spec, _cells(snap)), spec)
    _restore_from_the_panel(page, notebook, snap, "panel")


def test_the_panel_restores_a_snapshot_in_notebook7(
    page: Page, make_spec: Callable[..., str], names: list[str]
) -> None:
    """The same in Notebook 7, served by the same server at /notebooks/."""
    spec, snap = make_spec(), fresh(names)
    notebook = page.open_in_notebook7(page.lab.write_notebook("nb7", spec, _cells(snap)), spec)
    _restore_from_the_panel(page, notebook, snap, "notebook7-panel")


def test_the_timeline_goes_back_to_a_chosen_checkpoint(
    page: Page, make_spec: Callable[..., str]
) -> None:
    spec = make_spec(autosave=True)
    cells = ["x = 'one'", "x = 'two'", "%container", "print('x is', x)"]
    notebook = page.open(page.lab.write_notebook("timeline", spec, cells), spec)
    for index in (0, 1):
        notebook.run(index)

        def checkpointed(_: object, cell: int = index + 1) -> bool:
            return any(
                any(c["cell"] == cell for c in checkpoints_of(r)) for r in Runtime().records()
            )

        wait(page.driver, 60, f"the checkpoint after cell {index + 1}", checkpointed)
    notebook.run(2)
    # The timeline: one button per checkpoint, named by the cell it is the state before.
    point = notebook.find(
        2, ".//div[contains(@class, 'widget-toggle-buttons')]//button[normalize-space() = '2']",
        what="the timeline's point before cell 2",
    )  # fmt: skip
    assert "Checkpoints" in notebook.output(2)
    point.click()
    notebook.wait_output(2, "before cell 2: after [1] x = 'one'")
    page.shot("timeline")
    notebook.find(2, ".//button[normalize-space() = 'Go back here']").click()
    notebook.wait_output(2, "Undone: back to the state before cell 2", timeout=60)
    assert notebook.run(3) == "x is one"
    assert page.dialog_title() == ""
