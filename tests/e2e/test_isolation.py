"""Two notebooks open at once in one JupyterLab: each kernel sees only its own."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .page import Page

pytestmark = pytest.mark.integration


def test_two_open_notebooks_are_isolated(page: Page, make_spec: Callable[..., str]) -> None:
    spec = make_spec()
    first = page.lab.write_notebook("first", spec, [
        "import pathlib, socket\n"
        "secret = 'first'\n"
        "pathlib.Path('/tmp/made-in-first').write_text('first')\n"
        "pathlib.Path('made-in-first.txt').write_text('first')\n"
        "print(socket.gethostname())",
        "print(secret, pathlib.Path('/tmp/made-in-first').exists(), "
        "pathlib.Path('made-in-first.txt').exists())",
    ])  # fmt: skip
    second = page.lab.write_notebook("second", spec, [
        "import pathlib, socket\n"
        "print(socket.gethostname())",
        "print('secret' in globals(), pathlib.Path('/tmp/made-in-first').exists(), "
        "pathlib.Path('made-in-first.txt').exists())",
    ])  # fmt: skip
    one = page.open(first, spec)
    host_one = one.run(0)
    two = page.open_from_file_browser(second, spec)
    host_two = two.run(0)
    seen_from_two = two.run(1)
    # The first notebook, still open in the same page, still has all of its own.
    seen_from_one = one.run(1)
    page.shot("two-notebooks")
    assert len(page.lab.kernel_ids()) == 2
    assert host_one and host_two and host_one != host_two
    assert seen_from_two == "False False False"
    assert seen_from_one == "first True True"
