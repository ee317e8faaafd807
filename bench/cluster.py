"""Kernels on a cluster: their start through Slurm, and what a portable snapshot costs.

- **Kernel start.** On the test cluster (``make cluster``; brought up here if it
  is not), kernels of one kernelspec start ``--rounds`` times through Slurm
  (``backend = slurm``) and as many times locally, alternately: the time from
  ``start_kernel`` until the kernel answers ``kernel_info``. Beside them, in the
  same rounds, Slurm's own time for a trivial job, two ways: from ``sbatch`` until
  squeue says RUNNING (set when the job is given its node, before the node has
  started anything), and from ``sbatch`` until the job's script runs its first
  command on the node (what any program run as a Slurm job waits for). Target:
  Slurm start <= 1.5 x local + Slurm's own time; both verdicts are printed. A
  first start of each kind (which makes the pristine base on its node) is not
  timed.

- **Portable snapshots.** A sandboxed kernel holds ``--size`` of random bytes
  (default 300M); it is snapshotted (the parent), 1% of the state is rewritten
  and it is snapshotted again (the child). Then, timed, in this process as the
  CLI does it: ``snapshot export`` of the parent whole (the peer), of the child
  whole, and of the child ``--since`` the parent; and ``snapshot import`` of each
  of the child's files into a new name (the child ``--since`` onto the parent this
  store has). Bytes are the files' sizes; the import's bytes are what it added to
  the volume (data and metadata after a commit).

- **Migration.** A kernel of the slurm backend holds 100M, then 1G of random
  bytes (``--migrate-sizes``). A cell prints a line every 10 ms while, from
  outside, the kernel is (the peer) snapshotted and restored in place on its node
  through that node's daemon, and then (ours) moved to another node with
  ``sandbox-kernel migrate``. The kernel is unavailable while no line arrives:
  the figure is the sum of the gaps over 50 ms between lines as the client
  receives them (the longest gap beside it). Target: ours <= 1.5 x the peer.
  Every line must arrive, in order.

Needs root::

    .venv/bin/python bench/cluster.py [--part all|start|portable|migrate]
        [--size 300M] [--migrate-sizes 100M,1G] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).parent))
from jupyter_client.kernelspec import KernelSpecManager
from snapshot import MIB, SPEC, BenchError, _clean_kernel, make_kernelspec, run_cell, wait_saved

from sandbox_kernel.errors import SandboxError
from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, Runtime, cluster, portable, snapshots, volume
from sandbox_kernel.runtime.limits import parse_size

_BUILD = (
    "import numpy as np\n"
    "state = np.random.default_rng(0).integers(0, 256, size={size}, dtype=np.uint8)"
)
_CHANGE = (
    "_n = state.shape[0] // 100\n"
    "state[:_n] = np.random.default_rng(1).integers(0, 256, size=_n, dtype=np.uint8)"
)


def _export(owner: str, name: str, path: Path, since: str | None = None) -> float:
    start = time.perf_counter()
    with open(path, "xb") as out:
        portable.export(owner, name, out, since)
    return time.perf_counter() - start


def _import(owner: str, path: Path, name: str) -> tuple[float, int]:
    before = volume.bytes_used()
    start = time.perf_counter()
    with open(path, "rb") as source:
        portable.import_(int(owner), int(owner), source, name)
    took = time.perf_counter() - start
    return took, volume.bytes_used() - before


async def measure(size: int, rounds: int, tmp: Path) -> dict[str, Any]:
    ksm = make_kernelspec(tmp, f"{max(2 * size, 1 << 30)}")
    cwd = tmp / "cwd"
    cwd.mkdir(mode=0o755)
    cwd.chmod(0o755)
    runtime = Runtime()
    km = AsyncKernelManager(kernel_name=SPEC, kernel_spec_manager=ksm)
    kc: Any = None
    owner: str | None = None
    made: list[str] = []
    found: dict[str, list[float]] = {}
    try:
        await km.start_kernel(cwd=str(cwd))
        owner = str(runtime.record(km.kernel_id).uid)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        await run_cell(kc, _BUILD.format(size=size))
        tag = uuid.uuid4().hex[:8]
        parent, child = f"bench-port-{tag}-parent", f"bench-port-{tag}-child"
        for name, change in ((parent, None), (child, _CHANGE)):
            if change:
                await run_cell(kc, change)
            made.append(name)
            await run_cell(kc, f"%container snapshot {name}")
            await wait_saved(owner, name)
        files = {key: tmp / f"{key}.sks" for key in ("parent", "child", "since")}
        for k in range(rounds):
            for path in files.values():
                path.unlink(missing_ok=True)
            for key, name, since in (("parent", parent, None), ("child", child, None),
                                     ("since", child, parent)):  # fmt: skip
                took = await asyncio.to_thread(_export, owner, name, files[key], since)
                found.setdefault(f"export {key} s", []).append(took)
                found.setdefault(f"export {key} bytes", []).append(files[key].stat().st_size)
            for key in ("child", "since"):
                name = f"bench-port-{tag}-in-{key}-{k}"
                made.append(name)
                took, added = await asyncio.to_thread(_import, owner, files[key], name)
                found.setdefault(f"import {key} s", []).append(took)
                found.setdefault(f"import {key} bytes", []).append(added)
                await asyncio.to_thread(snapshots.delete, owner, name)
            print(f"  round {k + 1}/{rounds} done", file=sys.stderr)
        return found
    finally:
        await _clean_kernel(runtime, km, kc, km.kernel_id if km.has_kernel else None, owner, made)


START_TARGET = 1.5


async def start_once(ksm: KernelSpecManager, name: str, cwd: Path) -> float:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    begin = time.perf_counter()
    await km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=180)
        return time.perf_counter() - begin
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()


async def sbatch_to_running(tmp: Path) -> tuple[float, float]:
    """A trivial job's times from sbatch until squeue says RUNNING, and until its
    script has run its first command (it makes a file; the nodes share /tmp)."""
    mark = tmp / f"job-ran-{uuid.uuid4().hex[:8]}"
    begin = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "sbatch", "--parsable", "--output=/dev/null", f"--wrap=: > {mark}; sleep 30",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    job = out.decode().strip().split(";")[0]

    async def running() -> float:
        while True:
            state = await asyncio.create_subprocess_exec(
                "squeue", "-h", "-j", job, "-o", "%T", stdout=asyncio.subprocess.PIPE
            )
            said, _ = await state.communicate()
            if said.decode().strip() == "RUNNING":
                return time.perf_counter() - begin
            if time.perf_counter() - begin > 120:
                raise BenchError(f"job {job} did not run within 120 s")
            await asyncio.sleep(0.02)  # squeue is all Slurm offers to ask

    async def ran() -> float:
        while not mark.exists():
            if time.perf_counter() - begin > 120:
                raise BenchError(f"job {job}'s script did not run within 120 s")
            await asyncio.sleep(0.005)
        return time.perf_counter() - begin

    try:
        return tuple(await asyncio.gather(running(), ran()))  # type: ignore[return-value]
    finally:
        await (await asyncio.create_subprocess_exec("scancel", job)).wait()
        mark.unlink(missing_ok=True)


async def idle_cluster(timeout: float = 60.0) -> None:
    """Wait until squeue lists no job, then a second more (untimed)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = await asyncio.create_subprocess_exec(
            "squeue", "-h", "-o", "%i", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        if not out.strip():
            break
        if time.monotonic() > deadline:
            raise BenchError(f"jobs still in squeue after {timeout:.0f} s: {out.decode().split()}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)


async def measure_start(rounds: int, tmp: Path) -> dict[str, list[float]]:
    limits = Limits.parse(memory="1G", cpus="1", pids="512", disk="2G")
    config = provisioner_config("host", limits, "none")
    install("bench-local", "local", config, prefix=str(tmp))
    install("bench-slurm", "slurm", {**config, "backend": "slurm"}, prefix=str(tmp))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "share" / "jupyter" / "kernels")])
    cwd = tmp / "start-cwd"
    cwd.mkdir(mode=0o755)
    cwd.chmod(0o755)
    found: dict[str, list[float]] = {"local": [], "slurm": [], "sbatch": [], "script": []}
    # Their pristine bases, untimed: one on this machine, and one on each node (a
    # site's nodes make theirs once; the partition spreads kernels over all of them).
    await start_once(ksm, "bench-local", cwd)
    await asyncio.gather(*(start_once(ksm, "bench-slurm", cwd) for _ in cluster.nodes()))
    for k in range(rounds):
        found["local"].append(await start_once(ksm, "bench-local", cwd))
        # Each job, the kernel's or the trivial one, starts on an idle cluster: the
        # one before has left squeue, and a second more (a job submitted while
        # another was still ending waited 2.4 s more).
        await idle_cluster()
        found["slurm"].append(await start_once(ksm, "bench-slurm", cwd))
        await idle_cluster()
        running, ran = await sbatch_to_running(tmp)
        found["sbatch"].append(running)
        found["script"].append(ran)
        print(f"  start round {k + 1}/{rounds}: local {found['local'][-1]:.2f} s, "
              f"slurm {found['slurm'][-1]:.2f} s, trivial job running {running:.2f} s, "
              f"its script {ran:.2f} s", file=sys.stderr)  # fmt: skip
    return found


MIGRATE_TARGET = 1.5
#: A gap between two lines of the ticking cell longer than this is unavailability.
GAP = 0.05
_TICKER = "import time\nfor _i in range(10**6):\n    print(_i, flush=True); time.sleep(0.01)"


class _Forgetful(set[bytes]):
    """A session's digest history that remembers nothing."""

    def __contains__(self, item: object) -> bool:
        return False


async def _while_ticking(kc: Any, km: Any, action: Any) -> tuple[float, float, float]:
    """Run ``action()`` while a cell prints a line every 10 ms; interrupt the cell
    a second after. (gaps over GAP summed, the longest gap, the action's seconds).

    Raises:
        BenchError: a line was lost or came twice in a row out of order.
    """
    received: list[tuple[float, int]] = []
    running = asyncio.Event()
    # A process restored in place mid-cell sends again what it had queued at the
    # snapshot: the client must not refuse those messages as replayed.
    kc.session.digest_history = _Forgetful()

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            now = time.perf_counter()
            received.extend((now, int(n)) for n in msg["content"]["text"].split())
            if len(received) >= 100:
                running.set()

    cell = asyncio.ensure_future(kc.execute_interactive(_TICKER, timeout=900, output_hook=hook))
    await asyncio.wait_for(running.wait(), 60)
    begin = time.perf_counter()
    await action()
    took = time.perf_counter() - begin
    await asyncio.sleep(1.0)
    await km.interrupt_kernel()
    await cell
    numbers = [n for _, n in received]
    # A restore in place goes back to the snapshot's moment: lines from then on
    # come again. None may be missing.
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise BenchError(f"{len(missing)} lines never arrived, e.g. {missing[:5]}")
    times = [t for t, _ in received]
    gaps = [b - a for a, b in itertools.pairwise(times) if b - a > GAP]
    return sum(gaps), max(gaps, default=0.0), took


async def measure_migrate(sizes: list[int], tmp: Path) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for size in sizes:
        label = f"{size // MIB}M"
        found[label] = await _measure_move(size, tmp)
        print(f"  {label}: in place {found[label]['local unavailable s']:.2f} s unavailable, "
              f"moved {found[label]['migrate unavailable s']:.2f} s", file=sys.stderr)  # fmt: skip
    return found


async def _measure_move(size: int, tmp: Path) -> dict[str, float]:
    from jupyter_client.ioloop import AsyncIOLoopKernelManager

    from sandbox_kernel.daemon_client import DaemonClient

    limits = Limits.parse(memory=str(2 * size + (512 << 20)), cpus="1", pids="512", disk="4G")
    config = {**provisioner_config("host", limits, "none"), "backend": "slurm",
              "pristine_base": False}  # fmt: skip
    install("bench-migrate", "migrate", config, prefix=str(tmp))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "share" / "jupyter" / "kernels")])
    cwd = tmp / "migrate-cwd"
    cwd.mkdir(mode=0o755, exist_ok=True)
    km = AsyncIOLoopKernelManager(kernel_name="bench-migrate", kernel_spec_manager=ksm)
    await km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=180)
        await run_cell(kc, _BUILD.format(size=size))
        job = km.provisioner.kernel
        node = next(n for n in cluster.nodes() if n.name == job.node)
        daemon = DaemonClient(str(node.socket))
        name = f"bench-{uuid.uuid4().hex[:8]}"

        async def in_place() -> None:
            await daemon.call("snapshot", kernel_id=km.kernel_id, name=name, wait=True)
            await daemon.call("restore", kernel_id=km.kernel_id, name=name)

        local = await _while_ticking(kc, km, in_place)
        await daemon.call("delete_snapshot", kernel_id=km.kernel_id, name=name)
        target = next(n.name for n in cluster.nodes() if n.name != job.node)
        moved: dict[str, str] = {}

        async def migrate() -> None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sandbox_kernel.cli", "migrate", km.kernel_id,
                "--to", target, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            if proc.returncode != 0:
                raise BenchError(f"migrate failed: {err.decode()[-800:]}")
            moved["table"] = out.decode()

        ours = await _while_ticking(kc, km, migrate)
        if job.node != target:
            raise BenchError(f"the kernel is on {job.node}, not {target}")
        print(moved["table"], file=sys.stderr)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    return {
        "local unavailable s": local[0], "local longest gap s": local[1], "local s": local[2],
        "migrate unavailable s": ours[0], "migrate longest gap s": ours[1], "migrate s": ours[2],
    }  # fmt: skip


def print_migrate(found: dict[str, dict[str, float]]) -> None:
    print("\nmigration: how long the kernel is unavailable (gaps in a cell's output, s)")
    print(f"{'kernel state':<14}{'snapshot+restore in place':>27}{'migrate':>10}"
          f"{'ratio':>8}{'longest gaps':>16}{'whole move':>12}")  # fmt: skip
    for label, f in found.items():
        ratio = f["migrate unavailable s"] / f["local unavailable s"]
        verdict = "PASS" if ratio <= MIGRATE_TARGET else "FAIL"
        gaps = f"{f['local longest gap s']:.2f} / {f['migrate longest gap s']:.2f}"
        print(f"{label:<14}{f['local unavailable s']:>27.3f}{f['migrate unavailable s']:>10.3f}"
              f"{ratio:>8.2f}{gaps:>16}{f['migrate s']:>12.2f}   {verdict} "
              f"(target <= {MIGRATE_TARGET})")  # fmt: skip


def print_start(found: dict[str, list[float]]) -> None:
    med = {key: statistics.median(v) for key, v in found.items()}
    print(f"\nkernel start until kernel_info (medians of {len(found['local'])})")
    print(f"{'local kernel (the peer), s':<52}{med['local']:>9.3f}")
    print(
        f"{'Slurm kernel, s':<52}{med['slurm']:>9.3f}   / local {med['slurm'] / med['local']:.2f}"
    )
    print(f"{'Slurm alone: sbatch until RUNNING, s':<52}{med['sbatch']:>9.3f}")
    print(f"{'Slurm alone: sbatch until the job script runs, s':<52}{med['script']:>9.3f}")
    for label, key in (("RUNNING", "sbatch"), ("the script runs", "script")):
        allowed = START_TARGET * med["local"] + med[key]
        verdict = "PASS" if med["slurm"] <= allowed else "FAIL"
        print(f"target: Slurm kernel <= {START_TARGET} x local + Slurm alone until {label}"
              f" = {allowed:.3f} s: {verdict}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="300M", help="the kernel's state (default: 300M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--part", choices=("all", "start", "portable", "migrate"), default="all")
    parser.add_argument("--migrate-sizes", default="100M,1G",
                        help="the moved kernels' states (default: 100M,1G)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size, "size")
    except SandboxError as err:
        parser.error(str(err))
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir="/tmp"))
    tmp.chmod(0o755)
    started: dict[str, list[float]] = {}
    found: dict[str, list[float]] = {}
    moves: dict[str, dict[str, float]] = {}
    brought_up = False
    try:
        idle = {n.name: "idle" for n in cluster.nodes()}
        if args.part in ("all", "start", "migrate") and cluster.states() != idle:
            print("bringing the test cluster up ...", file=sys.stderr)
            cluster.up(say=lambda line: print(f"  {line}", file=sys.stderr))
            brought_up = True
        if args.part in ("all", "start"):
            print("kernel starts, local and through Slurm:", file=sys.stderr)
            started = asyncio.run(measure_start(args.rounds, tmp))
        if args.part in ("all", "migrate"):
            print("migration, against a snapshot and restore in place:", file=sys.stderr)
            sizes = [parse_size(s, "migrate size") for s in args.migrate_sizes.split(",")]
            moves = asyncio.run(measure_migrate(sizes, tmp))
        if args.part in ("all", "portable"):
            print(f"portable snapshots of a {args.size} kernel, 1% changed:", file=sys.stderr)
            found = asyncio.run(measure(size, args.rounds, tmp))
    except (BenchError, SandboxError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if brought_up:
            cluster.down(say=lambda line: print(f"  {line}", file=sys.stderr))
    if started:
        print_start(started)
    if moves:
        print_migrate(moves)
    if not found:
        if args.json:
            args.json.write_text(json.dumps({"start": started, "migrate": moves}, indent=2) + "\n")
        return 0
    med = {key: statistics.median(values) for key, values in found.items()}
    peer_s, peer_b = med["export parent s"], med["export parent bytes"]
    print(f"\nportable snapshots, {args.size} state, 1% changed (medians of {args.rounds})")
    print(f"{'':<44}{'MiB':>10}{'s':>9}{'/ parent whole (MiB, s)':>26}")
    rows = (
        ("export the parent whole (the peer)", "export parent"),
        ("export the child whole", "export child"),
        ("export the child --since the parent", "export since"),
        ("import the child whole: volume bytes added", "import child"),
        ("import the child --since: volume bytes added", "import since"),
    )
    for label, key in rows:
        b, s = med[f"{key} bytes"], med[f"{key} s"]
        print(f"{label:<44}{b / MIB:>10.1f}{s:>9.3f}{b / peer_b:>14.3f}{s / peer_s:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps({**found, **started}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
