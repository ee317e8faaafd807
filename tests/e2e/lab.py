"""A real JupyterLab server for the browser tests: the hub's venv's ``jupyter lab``,
run as root on a free 127.0.0.1 port with a token, in a notebook folder of its own.

Its kernels are sandboxed kernels of the tests' kernelspecs (``make_spec``), which
run in the server's own process (``daemon: off``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..integration.daemon import REPO
from ..integration.hub import HUB_VENV, _free_port

T = TypeVar("T")

#: JupyterLab's plugins that would put a toast over the page: the offer of news.
DISABLED_PLUGINS = ["@jupyterlab/apputils-extension:announcements"]


def until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Wait until ``predicate()`` is truthy and return it; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Lab:
    """One JupyterLab server; :meth:`stop` shuts down its kernels, then the server.

    ``notebooks`` is its root folder and every kernel's working folder; ``kernel_dir``
    holds the kernelspecs it offers besides the hub venv's own.
    """

    def __init__(self, notebooks: Path, state: Path, kernel_dir: Path) -> None:
        self.notebooks = notebooks
        self.state = state
        self.kernel_dir = kernel_dir
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = state / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server; return once its API answers (at most 90 s).

        Raises:
            AssertionError: the server exited or did not answer in time.
        """
        assert (HUB_VENV / "bin/jupyter").exists(), (
            f"{HUB_VENV} is missing: `make test` builds it (target hub-setup)"
        )
        config = self.state / "config"
        (config / "labconfig").mkdir(parents=True)
        (config / "labconfig/page_config.json").write_text(
            json.dumps({"disabledExtensions": dict.fromkeys(DISABLED_PLUGINS, True)})
        )
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_DATA_DIR": str(self.state / "data"),
            "JUPYTER_RUNTIME_DIR": str(self.state / "runtime"),
            "JUPYTER_PATH": str(self.kernel_dir),
            "JUPYTER_PLATFORM_DIRS": "1",
        }
        argv = [
            str(HUB_VENV / "bin/jupyter"), "lab", "--allow-root", "--no-browser",
            "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.notebooks}",
            f"--LabApp.workspaces_dir={self.state / 'workspaces'}",
            f"--LabApp.user_settings_dir={self.state / 'settings'}",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=self.notebooks, env=env, stdout=log, stderr=log, start_new_session=True
            )
        until(self._answers, 90, f"JupyterLab to answer at {self.url}", interval=0.25)

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            f"JupyterLab exited:\n{self.log_tail()}"
        )
        try:
            self.api("GET", "/api/status")
        except OSError:
            return False
        return True

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def api(self, method: str, path: str) -> Any:
        """Call the server's REST API with the token; the decoded reply, or None."""
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def page(self, path: str) -> str:
        """The address of one of the server's pages, with the token."""
        return f"{self.url}{path}?token={self.token}"

    def write_notebook(self, name: str, spec: str, cells: list[str]) -> str:
        """Write ``name``.ipynb with these code cells, bound to the kernelspec ``spec``
        by name (no kernel-selection dialog); return the file's name."""
        notebook = {
            "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": spec, "display_name": spec, "language": "python"}},
            "cells": [
                {"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "source": source,
                 "execution_count": None, "outputs": []}
                for i, source in enumerate(cells)
            ],
        }  # fmt: skip
        path = self.notebooks / f"{name}.ipynb"
        path.write_text(json.dumps(notebook, indent=1))
        return path.name

    def kernel_ids(self) -> list[str]:
        return [k["id"] for k in self.api("GET", "/api/kernels")]

    def stop(self) -> None:
        """Shut down every kernel (each waits for the provisioner's cleanup), then the
        server; a server that does not exit within 60 s is killed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for kernel_id in self.kernel_ids():
                try:
                    self.api("DELETE", f"/api/kernels/{kernel_id}")
                except urllib.error.HTTPError as err:
                    if err.code != 404:  # it ended meanwhile
                        raise
            until(lambda: not self.kernel_ids(), 60, "the server's kernels to shut down")
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


#: Where each scenario's screenshot goes.
SHOTS = REPO / "build/e2e"
