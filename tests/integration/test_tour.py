"""nbclient executes the tour notebook in a sandboxed kernel."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from .conftest import execute_notebook

pytestmark = pytest.mark.integration

TOUR = Path(__file__).parents[2] / "notebooks" / "tour.ipynb"


async def test_tour_runs_in_a_sandboxed_kernel(ksm, make_spec, workdir: Path) -> None:
    nb = nbformat.read(TOUR, as_version=4)
    text = "".join(await execute_notebook(nb, ksm, make_spec(), workdir))
    assert re.search(r"processes visible: \[1, \d+\]\n", text), "the init and the kernel only"
    assert "PID 1 is: /usr/bin/tini -v -- " in text
    assert "effective capabilities: 0000000000000000" in text
    assert "default route: False" in text
    # Read-only bind, or no write permission (a restored kernel's cgroup files): either
    # way the limit stays.
    assert re.search(
        r"changing a limit from inside: (Read-only file system|Permission denied)", text
    )
    assert "Restored to snapshot tour-" in text
    assert "{'step': 0} 1" in text
    assert re.search(r"~ \S*progress.txt", text), "the diff marks a changed file with ~"
