"""What the daemon adds to a kernel start: starts through `sandbox-kernel daemon`
against starts in-process, in the same run.

Two sandboxed kernelspecs differ only in the provisioner's ``daemon`` setting
(``required`` and ``off``). Each timed start runs from ``await km.start_kernel()``
to the first ``kernel_info`` reply (as bench/startup.py), alternating the two after
one untimed warm-up of each. The daemon runs on a socket of its own for the run.
Needs root::

    .venv/bin/python bench/daemon.py [--rounds 10] [--json out.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from startup import measure  # bench/startup.py

from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits

SOCKET = "/run/sandbox-kernel-bench/daemon.sock"
THROUGH, IN_PROCESS = "bench-daemon", "bench-in-process"
TARGET_MS = 10.0  # the daemon may add at most this much to a start's median


def make_kernelspecs(tmp: Path) -> KernelSpecManager:
    limits = Limits.parse(memory="2G", cpus="1", pids="512", disk="10G")
    for name, mode in ((THROUGH, "required"), (IN_PROCESS, "off")):
        config = {**provisioner_config("host", limits, "none"), "daemon": mode}
        install(name, name, config, prefix=str(tmp))
    return KernelSpecManager(kernel_dirs=[str(tmp / "share/jupyter/kernels")])


def start_daemon(log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "sandbox_kernel.cli", "daemon", "--socket", SOCKET]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited: {log.read_text()[-2000:]}")
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(SOCKET)
                return proc
            except OSError:
                time.sleep(0.05)  # polling a process that reports no readiness
    proc.kill()
    raise RuntimeError("the daemon did not listen within 60 s")


def report(times: dict[str, list[float]]) -> dict[str, Any]:
    ours, peer = statistics.median(times[THROUGH]), statistics.median(times[IN_PROCESS])
    added_ms = (ours - peer) * 1000
    passed = added_ms <= TARGET_MS
    print(f"{'kernel':<20}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name, t in times.items():
        print(f"{name:<20}{statistics.median(t):>10.3f}{min(t):>10.3f}{max(t):>10.3f}")
    print(f"\nthrough the daemon {ours:.3f} s, in-process {peer:.3f} s, ratio {ours / peer:.3f}, "
          f"added {added_ms:+.1f} ms, target <= {TARGET_MS:.0f} ms: "
          f"{'PASS' if passed else 'FAIL'}")  # fmt: skip
    return {"rounds": len(times[THROUGH]), "times": times, "added_ms": added_ms,
            "ratio": ours / peer, "target_ms": TARGET_MS, "pass": passed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed starts of each (default 10)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    os.environ["SANDBOX_KERNEL_SOCKET"] = SOCKET
    tmp = Path(tempfile.mkdtemp(prefix="bench-daemon-", dir="/tmp"))
    daemon = start_daemon(tmp / "daemon.log")
    try:
        ksm = make_kernelspecs(tmp)
        cwd = tmp / "cwd"
        cwd.mkdir()
        result = report(asyncio.run(measure(args.rounds, ksm, cwd, (THROUGH, IN_PROCESS))))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(Path(SOCKET).parent, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
