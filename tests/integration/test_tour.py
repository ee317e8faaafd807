"""nbclient executes the tour notebook in a sandboxed kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

TOUR = Path(__file__).parents[2] / "notebooks" / "tour.ipynb"


async def test_tour_runs_in_a_sandboxed_kernel(ksm, make_spec, workdir: Path) -> None:
    nb = nbformat.read(TOUR, as_version=4)
    km = AsyncKernelManager(kernel_name=make_spec(), kernel_spec_manager=ksm)
    client = NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(workdir)}})
    try:
        await client.async_execute()
    finally:
        # nbclient closes and shuts down only the client and kernel it made itself.
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "processes visible: [1]" in text
    assert "effective capabilities: 0000000000000000" in text
    assert "default route: False" in text
    assert "Read-only file system" in text
    assert "Restored to snapshot tour-" in text
    assert "{'step': 0} 1" in text
    assert "C " in text and "progress.txt" in text  # the diff
