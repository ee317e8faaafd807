"""Kernel start from a base snapshot against a cold start of the same kernelspec.

A sandboxed kernel runs ``--code`` (default ``import numpy``), is snapshotted, and
the snapshot becomes the base of a second kernelspec (as ``sandbox-kernel install
--base`` does). Then, alternately, after one untimed warm-up of each:

- cold: a kernel of the kernelspec without the base; the time from
  ``await km.start_kernel()`` to the first ``kernel_info`` reply, plus the time to
  run ``--code`` in it: the same state the base kernel starts with;
- base: a kernel of the base kernelspec; the time to its first ``kernel_info``
  reply. A cell then checks, untimed, that it really came from the base.

Then the same for a kernel that is already running, alternately:

- cold restart: ``km.restart_kernel()`` of the cold kernel, to its first
  ``kernel_info`` reply and the code run again (the peer: what a restart costs);
- reset to the base: a ``%container reset`` cell in the base kernel, to that cell's
  reply (sent by the new process, once the notebook is connected again). A cell
  then checks, untimed, that the base's state is back.

Both clients are jupyter_client's AsyncKernelManager; the reply is awaited as in
``bench/startup.py`` (without ``wait_for_ready``'s fixed 0.2 s iopub flush). The
targets: base start <= 0.5 x cold start, reset <= 0.5 x cold restart. Needs root::

    .venv/bin/python bench/base_start.py [--rounds 10] [--code "import numpy"]
        [--json out.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from charts import IMG, distributions  # bench/charts.py
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, Runtime, bases, snapshots
from sandbox_kernel.runtime.record import Start

COLD, BASE = "bench-cold", "bench-base"
TARGET = 0.5  # base start at most this many times the cold start (with the code run)
TIMEOUT = 60.0


async def first_reply(kc: Any, km: AsyncKernelManager, started: float) -> float:
    """Seconds from ``started`` until the kernel's first kernel_info reply."""
    while True:
        kc.kernel_info()
        try:
            reply: dict[str, Any] = await kc.get_shell_msg(timeout=1)
        except Empty:
            if not await km.is_alive() or time.perf_counter() - started > TIMEOUT:
                raise RuntimeError("the kernel did not answer kernel_info") from None
            continue
        if reply["msg_type"] == "kernel_info_reply":
            return time.perf_counter() - started


async def run(kc: Any, code: str) -> str:
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, timeout=TIMEOUT, output_hook=hook)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {code!r}")
    return "".join(out).strip()


async def start_once(name: str, ksm: KernelSpecManager, cwd: Path, code: str) -> dict[str, float]:
    """One timed start of kernelspec ``name``; the kernel is shut down after."""
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    kc: Any = None
    started = time.perf_counter()
    try:
        await km.start_kernel(cwd=str(cwd))
        kc = km.client(context=km.context)  # as the Jupyter server connects
        kc.start_channels()
        times = {"kernel_info": await first_reply(kc, km, started)}
        if name == COLD:
            # Timed to the shell's execute_reply: iopub may not be subscribed yet
            # (wait_for_ready's flush is what waits for that).
            msg_id = kc.execute(code, silent=True)
            while True:
                reply = await kc.get_shell_msg(timeout=TIMEOUT)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"cell failed: {code!r}")
            times["ready"] = time.perf_counter() - started
        else:
            times["ready"] = times["kernel_info"]
            record = Runtime().record(km.kernel_id)
            if record.start is not Start.BASE:
                raise RuntimeError(f"the kernel started cold: {record.base_note}")
            if await run(kc, "print(BENCH_MARK)") != "base":
                raise RuntimeError("the base kernel lacks the base's state")
        return times
    finally:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


async def code_reply(kc: Any, code: str) -> None:
    """Run ``code``; return at its execute_reply on shell (iopub may lag)."""
    msg_id = kc.execute(code, silent=False)
    while True:
        reply = await kc.get_shell_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {code!r}: {reply['content'].get('evalue', '')}")


async def resets(
    rounds: int, ksm: KernelSpecManager, cwd: Path, code: str
) -> dict[str, list[float]]:
    """Alternate cold restarts of a cold kernel and resets of a base kernel."""
    kernels = {}
    try:
        for spec in (COLD, BASE):
            km = AsyncKernelManager(kernel_name=spec, kernel_spec_manager=ksm)
            kernels[spec] = km
            await km.start_kernel(cwd=str(cwd))
            kc = km.client(context=km.context)  # as the Jupyter server connects
            kc.start_channels()
            await kc.wait_for_ready(timeout=TIMEOUT)
            await run(kc, "pass")
            kc.stop_channels()
        times: dict[str, list[float]] = {"restart": [], "reset": []}
        for i in range(rounds + 1):  # the first of each is a warm-up
            km = kernels[COLD]
            kc = km.client(context=km.context)  # as the Jupyter server connects
            kc.start_channels()
            started = time.perf_counter()
            await km.restart_kernel(now=True)
            await first_reply(kc, km, started)
            await code_reply(kc, code)
            restart = time.perf_counter() - started
            kc.stop_channels()
            km = kernels[BASE]
            kc = km.client(context=km.context)  # as the Jupyter server connects
            kc.start_channels()
            await kc.wait_for_ready(timeout=TIMEOUT)
            await run(kc, "BENCH_MARK = 'changed'")
            started = time.perf_counter()
            await code_reply(kc, "%container reset")
            reset = time.perf_counter() - started
            if await run(kc, "print(BENCH_MARK)") != "base":
                raise RuntimeError("the reset did not bring the base's state back")
            kc.stop_channels()
            if i:
                times["restart"].append(restart)
                times["reset"].append(reset)
                line = f"  round {i}/{rounds} restart {restart:.3f} reset {reset:.3f}"
                print(line, file=sys.stderr)
        return times
    finally:
        for km in kernels.values():
            if km.has_kernel:
                await km.shutdown_kernel(now=True)


async def make_base(ksm: KernelSpecManager, cwd: Path, code: str, tmp: Path) -> tuple[str, str]:
    """Run ``code`` in a cold kernel, snapshot it; return (owner, snapshot name)."""
    km = AsyncKernelManager(kernel_name=COLD, kernel_spec_manager=ksm)
    await km.start_kernel(cwd=str(cwd))
    kc = km.client(context=km.context)  # as the Jupyter server connects
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=TIMEOUT)
        await run(kc, f"{code}\nBENCH_MARK = 'base'")
        runtime = Runtime()
        owner = str(runtime.record(km.kernel_id).uid)
        name = f"bench-base-{uuid.uuid4().hex[:8]}"
        await runtime.snapshot(km.kernel_id, name)
        return owner, name
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def measure(rounds: int, tmp: Path, code: str) -> dict[str, Any]:
    limits = Limits.parse(memory="2G", cpus="1", pids="512", disk="10G")
    config = provisioner_config("host", limits, "none")
    # Cold: Python starts in the container (not from the pristine base).
    install(COLD, "cold", {**config, "pristine_base": False}, prefix=str(tmp))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "share" / "jupyter" / "kernels")])
    cwd = tmp / "cwd"
    cwd.mkdir(mode=0o755)
    cwd.chmod(0o755)
    owner, name = await make_base(ksm, cwd, code, tmp)
    base_id = None
    try:
        base_id = bases.make_base(owner, name)["id"]
        install(BASE, "base", {**config, "base": base_id}, prefix=str(tmp))
        for spec in (COLD, BASE):
            await start_once(spec, ksm, cwd, code)
        times: dict[str, Any] = {COLD: [], BASE: []}
        for i in range(rounds):
            for spec in (COLD, BASE):
                times[spec].append(await start_once(spec, ksm, cwd, code))
                print(f"  round {i + 1}/{rounds} {spec}: {times[spec][-1]}", file=sys.stderr)
        times.update(await resets(rounds, ksm, cwd, code))
        return times
    finally:
        snapshots.delete(owner, name)
        if base_id is not None:
            bases.delete(base_id)


def report(times: dict[str, Any], code: str) -> dict[str, Any]:
    def med(spec: str, key: str) -> float:
        return statistics.median(t[key] for t in times[spec])

    cold_info, cold_ready, base_ready = (
        med(COLD, "kernel_info"),
        med(COLD, "ready"),
        med(BASE, "ready"),
    )
    ratio = base_ready / cold_ready
    restart, reset = statistics.median(times["restart"]), statistics.median(times["reset"])
    reset_ratio = reset / restart
    passed = ratio <= TARGET and reset_ratio <= TARGET
    print(f"\nKernel start and reset, median of {len(times[COLD])} (the state: {code!r})")
    print(f"{'':<52}{'seconds':>10}")
    print(f"{'cold start: first kernel_info reply':<52}{cold_info:>10.3f}")
    print(f"{'cold start: then the code run (the peer)':<52}{cold_ready:>10.3f}")
    print(f"{'start from the base: first kernel_info reply':<52}{base_ready:>10.3f}")
    print(f"{'cold restart, then the code run (the peer)':<52}{restart:>10.3f}")
    print(f"{'%container reset to the base: its cell replies':<52}{reset:>10.3f}")
    print()
    for what, value in (("start: base/cold", ratio), ("reset/cold restart", reset_ratio)):
        verdict = "PASS" if value <= TARGET else "FAIL"
        print(f"{what:<22}{value:>6.2f}   target <= {TARGET}: {verdict}")
    return {
        "times": times, "ratio": ratio, "reset_ratio": reset_ratio,
        "target": TARGET, "pass": passed,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed starts of each (default 10)")
    parser.add_argument("--code", default="import numpy", help="what the base has run")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if the target is missed")
    parser.add_argument("--chart", metavar="PNG", type=Path, default=IMG / "base_start.png",
                        help="the chart (default docs/img/base_start.png)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-base-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        times = asyncio.run(measure(args.rounds, tmp, args.code))
        result = report(times, args.code)
        distributions(
            args.chart, f"Start and reset, a kernel that ran {args.code!r}",
            {
                "cold start, then the code": [t["ready"] for t in times[COLD]],
                "start from the base": [t["ready"] for t in times[BASE]],
                "cold restart, then the code": times["restart"],
                "%container reset to the base": times["reset"],
            },
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
