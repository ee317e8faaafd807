"""A real JupyterHub for the tests: docs/jupyterhub_config.py, run as root with the
LocalProcessSpawner, configurable-http-proxy from npm, and a service token the
test uses for the hub's REST API and the users' servers' kernel websockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from sandbox_kernel.runtime import snapshots

from .conftest import wait_until
from .daemon import REPO, SOCKET, Daemon, User, _make_user, user_exists

HUB_VENV = REPO / "build/hub-venv"
CONFIG = REPO / "docs/jupyterhub_config.py"
HUB_USERS = ("sk-hub-1", "sk-hub-2", "sk-hub-3")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Hub:
    """One running hub; its users' servers are started and stopped through its API."""

    def __init__(self, folder: Path, users: list[User]) -> None:
        self.folder = folder
        self.users = users
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = AsyncHTTPClient()
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ, "SK_HUB_USERS": ",".join(u.name for u in self.users),
            "SK_HUB_DIR": str(self.folder), "SK_HUB_PORT": str(self.port),
            "SK_HUB_API_PORT": str(_free_port()), "SK_HUB_HUB_PORT": str(_free_port()),
            "SK_HUB_TOKEN": self.token, "SANDBOX_KERNEL_SOCKET": SOCKET,
        }  # fmt: skip
        with open(self.folder / "hub.log", "ab") as log:
            return subprocess.Popen(
                [str(HUB_VENV / "bin/jupyterhub"), "-f", str(CONFIG)],
                cwd=self.folder, env=env, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip

    async def start(self) -> None:
        self.proc = proc = await asyncio.to_thread(self._spawn)

        async def up() -> bool:
            assert proc.poll() is None, self.log_tail()
            try:
                await self.api("GET", "/hub/api/")
            except (OSError, HTTPClientError):
                return False
            return True

        await wait_until(up, 90, "the hub to answer", interval=0.25)

    def log_tail(self) -> str:
        return (self.folder / "hub.log").read_text(errors="replace")[-3000:]

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        request = HTTPRequest(
            self.url + path, method=method,
            headers={"Authorization": f"token {self.token}"},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True, request_timeout=60,
        )  # fmt: skip
        response = await self.http.fetch(request)
        return json.loads(response.body) if response.body else None

    async def start_server(self, user: User) -> None:
        await self.api("POST", f"/hub/api/users/{user.name}/server", {})

        async def ready() -> bool:
            model = await self.api("GET", f"/hub/api/users/{user.name}")
            server = (model.get("servers") or {}).get("")
            return bool(server and server.get("ready"))

        await wait_until(ready, 90, f"{user.name}'s server to be ready", interval=0.25)

    async def stop(self) -> None:
        for user in self.users:
            with contextlib.suppress(OSError, HTTPClientError):
                await self.api("DELETE", f"/hub/api/users/{user.name}/server")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait, 30)


class KernelSession:
    """A kernel of one user's server, driven through its websocket as JupyterLab does."""

    def __init__(self, hub: Hub, user: User, kernel_id: str, ws: WebSocketClientConnection):
        self.hub, self.user, self.kernel_id, self.ws = hub, user, kernel_id, ws
        self.session = uuid.uuid4().hex

    @classmethod
    async def open(cls, hub: Hub, user: User, kernelspec: str) -> KernelSession:
        model = await hub.api("POST", f"/user/{user.name}/api/kernels", {"name": kernelspec})
        url = (f"ws://127.0.0.1:{hub.port}/user/{user.name}/api/kernels/{model['id']}"
               f"/channels?session_id={uuid.uuid4().hex}")  # fmt: skip
        ws = await websocket_connect(
            HTTPRequest(url, headers={"Authorization": f"token {hub.token}"}, request_timeout=60)
        )
        return cls(hub, user, model["id"], ws)

    async def execute(self, code: str, timeout: float = 180) -> tuple[str, str]:
        """Run ``code``; (its text output, its error or "")."""
        msg_id = uuid.uuid4().hex
        self.ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                       "session": self.session, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))  # fmt: skip
        texts: list[str] = []
        error = ""
        idle = replied = False

        async def collect() -> None:
            nonlocal error, idle, replied
            while not (idle and replied):
                raw = await self.ws.read_message()
                assert raw is not None, "the kernel's websocket closed"
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    texts.append(content["text"])
                elif kind in ("execute_result", "display_data"):
                    texts.append(content["data"].get("text/plain", ""))
                elif kind == "error":
                    error = f"{content['ename']}: {content['evalue']}"
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
                elif kind == "execute_reply":
                    replied = True

        await asyncio.wait_for(collect(), timeout)
        return "".join(texts), error

    async def close(self) -> None:
        self.ws.close()
        await self.hub.api("DELETE", f"/user/{self.user.name}/api/kernels/{self.kernel_id}")


@pytest_asyncio.fixture
async def hub(daemon: Daemon, tmp_path: Path) -> AsyncIterator[Hub]:
    """A hub with three local users, its kernels through the test's daemon."""
    assert (HUB_VENV / "bin/jupyterhub").exists(), (
        f"{HUB_VENV} is missing: `make test` builds it (target hub-setup)"
    )
    made = [name for name in HUB_USERS if not user_exists(name)]
    users = [_make_user(name) for name in HUB_USERS]
    folder = tmp_path / "hub"
    folder.mkdir()
    running = Hub(folder, users)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()
        for user in users:
            owner = str(user.uid)
            for name in snapshots.names(owner) if owner in snapshots.owners() else []:
                snapshots.delete(owner, name)
        for name in made:
            await asyncio.to_thread(
                subprocess.run, ["userdel", "--remove", name], check=False, capture_output=True
            )
