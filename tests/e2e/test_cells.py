"""Cells run in a sandboxed kernel, and the page shows their output and counts."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from selenium.webdriver.common.by import By

from ..integration.conftest import fresh
from .page import Page

pytestmark = pytest.mark.integration


def test_a_cell_shows_its_output_and_count(page: Page, make_spec: Callable[..., str]) -> None:
    spec = make_spec()
    name = page.lab.write_notebook("run", spec, ["print('hello from', 6 * 7)"])
    notebook = page.open(name, spec)
    output = notebook.run(0)
    page.shot("run-a-cell")
    assert output == "hello from 42"
    assert notebook.prompt(0) == "[1]:"


def test_container_list_is_an_html_table(
    page: Page, make_spec: Callable[..., str], names: list[str]
) -> None:
    spec, snap = make_spec(), fresh(names)
    name = page.lab.write_notebook("list", spec, [f"%container snapshot {snap}", "%container list"])
    notebook = page.open(name, spec)
    assert f"Snapshot {snap}: live" in notebook.run(0)
    notebook.run(1)
    html = notebook.cell(1).find_element(
        By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='text/html']"
    )
    page.shot("container-list")
    table = html.find_element(By.TAG_NAME, "table")
    heads = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert heads == ["NAME", "TAKEN", "MODE", "MEMORY", "FILES", "MESSAGE"]
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]  # fmt: skip
    assert [row[0] for row in rows] == [snap]
    assert rows[0][2] == "live"
    # The count is the user's (uid 65534 here, shared with other runs): only its form.
    caption = table.find_element(By.TAG_NAME, "caption").text
    assert re.fullmatch(r"Your snapshots: \d+ of \d+, \S+ of \S+\.", caption), caption
