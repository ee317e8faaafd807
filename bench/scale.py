"""Many kernels through one server: N sandboxed kernels against N stock local ones.

One ``AsyncMultiKernelManager`` (as a Jupyter server holds) starts N kernels at
once, then the same for the local python3 kernel (same Python, same ipykernel), in
the same run. For each kind it measures:

- the seconds from the first ``start_kernel`` call until every kernel has answered
  ``kernel_info``;
- the seconds to run one cell in every kernel, all at once;
- memory per kernel: how much the machine's ``MemAvailable`` fell, divided by N;
- the seconds to shut every kernel down.

At 100 kernels the local run hung once here (killed after 25 minutes, its
kernels all up) and finished in 27 s the next time; each run's figures are
printed as soon as they are measured.

Targets (issue 11): all N start; the time until all are ready at most 1.3 times
the local kernels'; memory per kernel at most the local kernel's + 10 MiB. Both
kernelspecs live in a temporary folder. Needs root::

    .venv/bin/python bench/scale.py [--kernels 100] [--daemon] [--json out.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits

SANDBOX, LOCAL = "bench-scale-sandbox", "bench-scale-local"
READY_RATIO, EXTRA_MIB = 1.3, 10.0
READY_TIMEOUT = 600.0
MIB = 1 << 20


@dataclass
class Result:
    """What one kind of kernel measured."""

    kind: str
    asked: int
    started: int = 0
    ready_s: float = 0.0
    cell_s: float = 0.0
    mib_per_kernel: float = 0.0
    shutdown_s: float = 0.0
    failures: list[str] = field(default_factory=list)


def make_kernelspecs(tmp: Path, daemon: str = "off") -> KernelSpecManager:
    """Both kernelspecs under ``tmp/share/jupyter/kernels``; a manager that sees them.
    The sandbox's limits leave room for N kernels on this machine; ``daemon`` is the
    provisioner's setting (``off``: in this process)."""
    limits = Limits.parse(memory="512M", cpus="1", pids="256", disk="1G")
    config = {**provisioner_config("host", limits, "none"), "daemon": daemon}
    install(SANDBOX, "bench", config, prefix=str(tmp))
    kernels = tmp / "share" / "jupyter" / "kernels"
    write_kernel_spec(kernels / LOCAL)
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def mem_available() -> int:
    """The machine's ``MemAvailable``, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


async def _ready(mkm: AsyncMultiKernelManager, kernel_id: str) -> Any:
    """A client of the kernel once it has answered ``kernel_info``."""
    kc = mkm.get_kernel(kernel_id).client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=READY_TIMEOUT)
    return kc


async def _one_cell(kc: Any) -> None:
    msg_id = kc.execute("x = sum(range(1000))")
    while True:
        reply = await kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"the cell failed: {reply['content']}")
            return


async def measure(kind: str, n: int, ksm: KernelSpecManager, cwd: Path) -> Result:
    """Start ``n`` kernels of ``kind`` at once, run a cell in each, shut them down."""
    result = Result(kind, n)
    # Connection files in the run's own folder, not the current directory.
    mkm = AsyncMultiKernelManager(kernel_spec_manager=ksm, connection_dir=str(cwd.parent))
    before = mem_available()
    clients: list[Any] = []
    started = time.perf_counter()
    try:
        starts = await asyncio.gather(
            *(
                mkm.start_kernel(
                    kernel_name=kind,
                    cwd=str(cwd),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(n)
            ),
            return_exceptions=True,
        )
        ids = [s for s in starts if isinstance(s, str)]
        result.failures += [repr(s) for s in starts if not isinstance(s, str)]
        ready = await asyncio.gather(*(_ready(mkm, k) for k in ids), return_exceptions=True)
        result.ready_s = time.perf_counter() - started
        clients = [c for c in ready if not isinstance(c, BaseException)]
        result.failures += [repr(c) for c in ready if isinstance(c, BaseException)]
        result.started = len(clients)
        result.mib_per_kernel = (before - mem_available()) / MIB / max(len(clients), 1)
        start = time.perf_counter()
        await asyncio.gather(*(_one_cell(kc) for kc in clients))
        result.cell_s = time.perf_counter() - start
    finally:
        for kc in clients:
            kc.stop_channels()
        start = time.perf_counter()
        await mkm.shutdown_all(now=True)
        result.shutdown_s = time.perf_counter() - start
    return result


def report(ours: Result, local: Result) -> tuple[list[str], bool]:
    """The table and whether every target was met."""
    ready_ratio = ours.ready_s / local.ready_s if local.ready_s else float("inf")
    rows = [
        ("kernels started", f"{ours.started}/{ours.asked}", f"{local.started}/{local.asked}", "-"),
        ("until all ready, s", f"{ours.ready_s:.2f}", f"{local.ready_s:.2f}", f"{ready_ratio:.2f}"),
        ("one cell in each, s", f"{ours.cell_s:.2f}", f"{local.cell_s:.2f}",
         f"{ours.cell_s / local.cell_s:.2f}" if local.cell_s else "-"),
        ("memory per kernel, MiB", f"{ours.mib_per_kernel:.1f}", f"{local.mib_per_kernel:.1f}",
         f"{ours.mib_per_kernel - local.mib_per_kernel:+.1f}"),
        ("shutdown of all, s", f"{ours.shutdown_s:.2f}", f"{local.shutdown_s:.2f}",
         f"{ours.shutdown_s / local.shutdown_s:.2f}" if local.shutdown_s else "-"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("", "sandboxed", "local", "ratio / diff")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    checks = [
        (f"all {ours.asked} sandboxed kernels start", ours.started == ours.asked),
        (f"until all ready: sandboxed / local <= {READY_RATIO}", ready_ratio <= READY_RATIO),
        (
            f"memory per kernel <= local + {EXTRA_MIB:g} MiB",
            ours.mib_per_kernel <= local.mib_per_kernel + EXTRA_MIB,
        ),
    ]
    lines.append("")
    lines += [f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in checks]
    for r in (ours, local):
        for failure in r.failures[:5]:
            lines.append(f"  {r.kind} failure: {failure}")
    return lines, all(ok for _, ok in checks)


def raise_file_limit() -> None:
    """A server with N kernels holds several descriptors per kernel: take the hard
    limit, as Jupyter servers on such machines are set up to."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=int, default=100, help="kernels of each kind")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--daemon", action="store_true",
                        help="start the sandboxed kernels through a daemon of the run's own "
                        "(as a shared server does), not in this process")  # fmt: skip
    args = parser.parse_args(argv)
    raise_file_limit()
    tmp = Path(tempfile.mkdtemp(prefix="sandbox-bench-scale-"))
    daemon = None
    if args.daemon:
        from daemon import SOCKET, start_daemon  # bench/daemon.py

        os.environ["SANDBOX_KERNEL_SOCKET"] = SOCKET
        daemon = start_daemon(tmp / "daemon.log")
    try:
        ksm = make_kernelspecs(tmp, "required" if args.daemon else "off")
        cwd = tmp / "work"
        cwd.mkdir()
        cwd.chmod(0o755)
        tmp.chmod(0o755)
        print(f"starting {args.kernels} sandboxed kernels at once ...", file=sys.stderr)
        ours = await measure(SANDBOX, args.kernels, ksm, cwd)
        print(f"  {ours}", file=sys.stderr)  # seen even if the local run never ends
        print(f"starting {args.kernels} local kernels at once ...", file=sys.stderr)
        local = await measure(LOCAL, args.kernels, ksm, cwd)
        print(f"  {local}", file=sys.stderr)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    lines, ok = report(ours, local)
    how = "through the daemon" if args.daemon else "in-process"
    print(f"{args.kernels} kernels at once through one AsyncMultiKernelManager ({how})\n")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(ours), asdict(local)], indent=2))
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
