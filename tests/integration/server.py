"""A stand-in Jupyter server for the re-adoption tests, run as its own process.

It starts a sandboxed kernel, sets a variable in it, writes the provisioner info
where the test can read it, prints ``ready`` and waits to be killed.
Usage: python server.py KERNEL_DIR SPEC CWD INFO_PATH
"""

import asyncio
import json
import os
import sys
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager


async def main(kernel_dir: str, spec: str, cwd: str, info_path: str) -> None:
    ksm = KernelSpecManager(kernel_dirs=[kernel_dir])
    km = AsyncKernelManager(kernel_name=spec, kernel_spec_manager=ksm)
    await km.start_kernel(cwd=cwd)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    await kc.execute_interactive("survivor = 'still here'", timeout=30)
    info = await km.provisioner.get_provisioner_info()
    Path(f"{info_path}.tmp").write_text(json.dumps(info))
    os.replace(f"{info_path}.tmp", info_path)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
