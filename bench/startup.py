"""Kernel start-up time: the sandboxed kernel against the stock local python3 kernel.

Four kernelspecs: the sandbox's default (each kernel restores the configuration's
pristine base, made at the first, untimed, start), the same with ``pool`` 1 (a
start claims the kernel the pool holds restored and paused; the pool refills in
the background, and every start waits, untimed, until it has), the sandbox with
``pristine_base`` off (a cold start of Python in the container), and the stock
local kernel (the peer, LocalProvisioner, same Python and ipykernel). For each
start this measures the wall time from ``await km.start_kernel()`` being called to
the first ``kernel_info`` reply arriving on the shell channel, with
jupyter_client's AsyncKernelManager. The kernels start in turn, after one untimed
warm-up start of each; every kernel is shut down fully, untimed, before the next
start. The kernelspecs live in a temporary folder, so nothing global is
touched. Needs root (runc, network namespaces, overlay mounts)::

    .venv/bin/python bench/startup.py [--rounds 10] [--json out.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Any

from charts import IMG, distributions  # bench/charts.py
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits

SANDBOX, POOL, COLD, LOCAL = "bench-sandbox", "bench-pool", "bench-cold", "bench-local"
TARGET = 0.8  # the sandboxed median may be at most this many times the local one
POOL_TARGET = 0.3  # and with a pool of one
READY_TIMEOUT = 60.0


def make_kernelspecs(tmp: Path) -> KernelSpecManager:
    """Write both kernelspecs under ``tmp/share/jupyter/kernels``; a manager that sees them."""
    limits = Limits.parse(memory="2G", cpus="1", pids="512", disk="10G")
    config = provisioner_config("host", limits, "none")
    install(SANDBOX, "bench", config, prefix=str(tmp))
    install(POOL, "bench pool", {**config, "pool": 1}, prefix=str(tmp))
    install(COLD, "bench cold", {**config, "pristine_base": False}, prefix=str(tmp))
    kernels = tmp / "share" / "jupyter" / "kernels"
    write_kernel_spec(kernels / LOCAL)
    return KernelSpecManager(kernel_dirs=[str(kernels)])


#: Whether a kernel of the pool's kernelspec has started (and so asked for its pool).
_pool_asked: list[bool] = []


def pool_ready() -> bool:
    """Whether the pool holds a kernel ready to be claimed (once it was asked for),
    and no other is on its way."""
    from sandbox_kernel.runtime import Runtime

    pooled = [r for r in Runtime().records() if r.pooled]
    return (bool(pooled) or not _pool_asked) and all(r.extra["pool"]["ready"] for r in pooled)


async def wait_for_pool(timeout: float = 120.0) -> None:
    """Wait (untimed) until the pool has refilled: its refill would take the CPU
    from the start timed next."""
    deadline = time.monotonic() + timeout
    while not pool_ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not refill within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def time_start(name: str, ksm: KernelSpecManager, cwd: Path) -> float:
    """Start kernel ``name``, return the seconds until its kernel_info reply; shut it down."""
    if POOL in ksm.find_kernel_specs():
        await wait_for_pool()
    if name == POOL:
        _pool_asked.append(True)
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    kc = None
    started = time.perf_counter()
    try:
        # The local kernel's output would go to this terminal; the sandbox's goes to its log.
        await km.start_kernel(cwd=str(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kc = km.client()
        kc.start_channels()
        deadline = started + READY_TIMEOUT
        while True:  # like kc.wait_for_ready, without its 0.2 s iopub flush at the end
            kc.kernel_info()
            try:
                reply: dict[str, Any] = await kc.get_shell_msg(timeout=1)
            except Empty:
                if not await km.is_alive():
                    raise RuntimeError(f"{name} died before replying to kernel_info") from None
                if time.perf_counter() > deadline:
                    raise RuntimeError(
                        f"{name}: no kernel_info reply in {READY_TIMEOUT} s"
                    ) from None
                continue
            if reply["msg_type"] == "kernel_info_reply":
                return time.perf_counter() - started
    finally:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


async def measure(
    rounds: int,
    ksm: KernelSpecManager,
    cwd: Path,
    names: tuple[str, ...] = (SANDBOX, POOL, COLD, LOCAL),
) -> dict[str, list[float]]:
    """One untimed warm-up start of each kernel of ``names``, then ``rounds`` timed
    starts, alternating. Also used by bench/daemon.py."""
    from sandbox_kernel.backends import local_service

    try:
        for name in names:
            await time_start(name, ksm, cwd)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(rounds):
            for name in names:
                times[name].append(await time_start(name, ksm, cwd))
                print(f"  round {i + 1}/{rounds} {name}: {times[name][-1]:.3f} s",
                      file=sys.stderr)  # fmt: skip
        return times
    finally:
        await local_service().pools.drain()


def report(times: dict[str, list[float]]) -> dict[str, Any]:
    """Print the table and verdict; return the same figures as plain data."""
    stats: dict[str, dict[str, Any]] = {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "times": t}
        for name, t in times.items()
    }
    ours, peer = statistics.median(times[SANDBOX]), statistics.median(times[LOCAL])
    ratio = ours / peer
    cold_ratio = statistics.median(times[COLD]) / peer
    pool_ratio = statistics.median(times[POOL]) / peer
    passed = ratio <= TARGET and pool_ratio <= POOL_TARGET
    print(f"{'kernel':<16}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name, s in stats.items():
        print(f"{name:<16}{s['median']:>10.3f}{s['min']:>10.3f}{s['max']:>10.3f}")
    print(f"\n{'ratio to the local kernel':<34}{'median':>8}   target")
    print(f"{'sandbox (pristine base)':<34}{ratio:>8.2f}   <= {TARGET}: "
          f"{'PASS' if ratio <= TARGET else 'FAIL'}")  # fmt: skip
    print(f"{'sandbox, pool of 1':<34}{pool_ratio:>8.2f}   <= {POOL_TARGET}: "
          f"{'PASS' if pool_ratio <= POOL_TARGET else 'FAIL'}")  # fmt: skip
    print(f"{'sandbox, cold start':<34}{cold_ratio:>8.2f}")
    return {"rounds": len(times[SANDBOX]), "kernels": stats, "ratio": ratio,
            "pool_ratio": pool_ratio, "cold_ratio": cold_ratio, "target": TARGET,
            "pool_target": POOL_TARGET, "pass": passed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10,
                        help="timed starts of each kernel (default: 10)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures as JSON to PATH")  # fmt: skip
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when the ratio misses the target")  # fmt: skip
    parser.add_argument("--chart", metavar="PNG", type=Path, default=IMG / "startup.png",
                        help="the chart of start times (default docs/img/startup.png)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-", dir="/tmp"))
    try:
        ksm = make_kernelspecs(tmp)
        cwd = tmp / "cwd"
        cwd.mkdir()
        times = asyncio.run(measure(args.rounds, ksm, cwd))
        result = report(times)
        labels = {
            SANDBOX: "sandbox, pristine base", POOL: "sandbox, pool of 1",
            COLD: "sandbox, cold", LOCAL: "local python3",
        }  # fmt: skip
        distributions(
            args.chart, "Kernel start: start_kernel() to the kernel_info reply",
            {labels[name]: t for name, t in times.items()},
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
