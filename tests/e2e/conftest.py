"""Fixtures for the browser tier: JupyterLab in headless Chromium, its kernels real
sandboxed kernels of the integration tier's kernelspecs.

Every test gets its own server and notebook folder, and is checked afterwards like
an integration test: no container, netns, veth, mount, cgroup, layer or snapshot
may be left behind (the integration tier's ``no_leftovers`` and ``names``).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from selenium.webdriver import Chrome

from ..integration.conftest import make_spec, names, no_leftovers, spec_prefix, workdir
from .lab import SHOTS, Lab
from .page import Page, chromium

__all__ = ["make_spec", "names", "no_leftovers", "spec_prefix", "workdir"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Chrome]:
    """One headless Chromium for the session; each test loads its own server's page.
    Failures' screenshots of an earlier session are removed first."""
    for stale in SHOTS.glob("*-failed.png"):
        stale.unlink()
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


#: Each phase's report of a test (setup, call, teardown), kept by the hook below.
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test, so ``page`` can tell a failed test."""
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def page(
    browser: Chrome,
    workdir: Path,
    tmp_path: Path,
    spec_prefix: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Page]:
    """A JupyterLab server of the test's own, in ``workdir``, and the browser's tab on
    it. Afterwards the tab leaves the server (else JupyterLab would start kernels
    again), and the server's kernels and the server are shut down; a failed test
    leaves a screenshot, build/e2e/TEST-failed.png."""
    state = tmp_path / "lab"
    state.mkdir()
    server = Lab(workdir, state, spec_prefix / "share/jupyter")
    shown = Page(browser, server)
    try:
        server.start()
        yield shown
    finally:
        call = request.node.stash.get(REPORTS, {}).get("call")
        if call is not None and call.failed:
            shown.shot(f"{request.node.name}-failed")
            print(f"JupyterLab's log:\n{server.log_tail()}")
        browser.get("about:blank")
        server.stop()
