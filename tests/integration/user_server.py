"""A Jupyter server's kernel side, run as an unprivileged user by the daemon tests.

It does what a single-user server does with a sandboxed kernel: starts it through
jupyter_client (whose provisioner asks the daemon), runs cells, shuts it down. The
test drives it with JSON lines on stdin; each gets one JSON line on stdout:

    {"op": "start", "config": {...}, "cwd": PATH}  -> {"kernel_id", "backend", "pid"}
    {"op": "run", "kernel_id": ID, "code": TEXT}   -> {"text", "error"}
    {"op": "interrupt", "kernel_id": ID}           -> {"text", "error"} of a cell interrupted
    {"op": "shutdown", "kernel_id": ID}            -> {}

A failure answers ``{"error": "Type: message"}``. At end of input every kernel it
started is shut down.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager


class Server:
    def __init__(self) -> None:
        prefix = tempfile.mkdtemp(prefix="sk-user-server-")
        self.kernels_dir = os.path.join(prefix, "kernels")
        self.ksm = KernelSpecManager(kernel_dirs=[self.kernels_dir])
        self.managers: dict[str, Any] = {}
        self.clients: dict[str, Any] = {}
        self.specs = 0

    def spec(self, config: dict[str, Any]) -> str:
        self.specs += 1
        name = f"sbx{self.specs}"
        folder = os.path.join(self.kernels_dir, name)
        os.makedirs(folder)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (sandbox)", "language": "python",
            "metadata": {"kernel_provisioner": {
                "provisioner_name": "sandbox-provisioner", "config": config}},
        }  # fmt: skip
        with open(os.path.join(folder, "kernel.json"), "w") as f:
            json.dump(spec, f)
        return name

    async def start(self, config: dict[str, Any], cwd: str) -> dict[str, Any]:
        km = AsyncKernelManager(kernel_name=self.spec(config), kernel_spec_manager=self.ksm)
        await km.start_kernel(cwd=cwd)
        self.managers[km.kernel_id] = km
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        self.clients[km.kernel_id] = kc
        return {"kernel_id": km.kernel_id, "backend": km.provisioner.runner.name,
                "pid": km.provisioner.pid}  # fmt: skip

    async def run(self, kernel_id: str, code: str) -> dict[str, Any]:
        texts: list[str] = []
        errors: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                texts.append(content["text"])
            elif msg["msg_type"] in ("execute_result", "display_data"):
                texts.append(content["data"].get("text/plain", ""))
            elif msg["msg_type"] == "error":
                errors.append(f"{content['ename']}: {content['evalue']}")

        kc = self.clients[kernel_id]
        await kc.execute_interactive(code, timeout=120, output_hook=hook)
        return {"text": "".join(texts), "error": "\n".join(errors)}

    async def interrupt(self, kernel_id: str) -> dict[str, Any]:
        """Run a cell that sleeps, interrupt it once it runs; what the cell raised."""
        running = asyncio.ensure_future(
            self.run(kernel_id, "print('asleep', flush=True)\nimport time; time.sleep(60)")
        )
        await asyncio.sleep(1.0)  # the cell has started (it prints at once)
        await self.managers[kernel_id].interrupt_kernel()
        return await asyncio.wait_for(running, 30)

    async def shutdown(self, kernel_id: str) -> dict[str, Any]:
        self.clients.pop(kernel_id).stop_channels()
        await self.managers.pop(kernel_id).shutdown_kernel()
        return {}

    async def close(self) -> None:
        for kernel_id in list(self.managers):
            try:
                await self.shutdown(kernel_id)
            except Exception as err:  # report, and go on with the others
                print(json.dumps({"error": f"shutdown: {err!r}"}), flush=True)


async def main() -> None:
    server = Server()
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            op = request.pop("op")
            try:
                reply = await getattr(server, op)(**request)
            except Exception as err:
                reply = {"error": f"{type(err).__name__}: {err}"}
            print(json.dumps(reply), flush=True)
    finally:
        await server.close()


if __name__ == "__main__":
    asyncio.run(main())
