"""Bytes on disk of consecutive snapshots: ten snapshots of a big kernel, 1% changed
between each, against one snapshot; dill's ten dumps of the same states beside them.

The kernel holds ``state``, a numpy ``uint8`` array of ``--size`` random bytes
(default 500M). Between two snapshots a cell overwrites 1% of it: one contiguous
slice, at a different place each time (``state[k*s:(k+1)*s] = new random bytes``);
a random 1% of single bytes would touch every memory page, which is a 100% change
to any page-based snapshot and to dill alike.

- Ours: ``%container snapshot NAME`` ten times in a row in one sandboxed kernel
  (each snapshot's parent is the one before), each a cell, as a user takes one.
  Bytes on disk are measured on the btrfs volume (data and metadata in use, after
  a commit) before the first and after each snapshot, so compression and blocks
  shared with the parent are counted as they are stored.
- dill: ``dill.dump_module`` of the same state after each change, in one process,
  each to its own file; bytes are the files' sizes.

The figure is ten snapshots' bytes over one snapshot's, for both; the target is
ours <= 1.2. Each snapshot is saved to the volume in the background after the
kernel runs again: its bytes are counted once it is saved, and its time is the
cell's. The chart ``docs/img/incremental.png`` shows the
bytes on disk after each snapshot, ours and dill's. Needs root and dill
(``.venv/bin/pip install dill``)::

    .venv/bin/python bench/incremental.py [--size 500M] [--count 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).parent))
from charts import IMG, lines
from snapshot import (
    MIB,
    SPEC,
    BenchError,
    _clean_kernel,
    make_kernelspec,
    run_cell,
    run_child,
    wait_saved,
)

from sandbox_kernel.errors import SandboxError
from sandbox_kernel.runtime import Runtime, snapshots, volume
from sandbox_kernel.runtime.limits import parse_size

TARGET = 1.2

_BUILD = (
    "import numpy as np\n"
    "state = np.random.default_rng(0).integers(0, 256, size={size}, dtype=np.uint8)"
)
_CHANGE = (
    "_n = state.shape[0] // 100\n"
    "state[{k} * _n:({k} + 1) * _n] = "
    "np.random.default_rng({k} + 1).integers(0, 256, size=_n, dtype=np.uint8)"
)
_DILL = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import dill
    folder = Path(sys.argv[1])
    {build}
    sizes, seconds = [], []
    for k in range({count}):
        if k:
            exec({change!r}.format(k=k - 1))
        start = time.perf_counter()
        dill.dump_module(str(folder / f"dump-{{k}}.dill"))
        seconds.append(time.perf_counter() - start)
        sizes.append((folder / f"dump-{{k}}.dill").stat().st_size)
    print(json.dumps({{"sizes": sizes, "seconds": seconds}}))
    """
)


async def measure_ours(size: int, count: int, tmp: Path) -> dict[str, Any]:
    """Ten snapshots of one kernel; bytes on disk after each."""
    ksm = make_kernelspec(tmp, f"{max(2 * size, 1 << 30)}")
    cwd = tmp / "cwd"
    cwd.mkdir(mode=0o755)
    cwd.chmod(0o755)
    runtime = Runtime()
    km = AsyncKernelManager(kernel_name=SPEC, kernel_spec_manager=ksm)
    kc: Any = None
    owner: str | None = None
    made: list[str] = []
    try:
        await km.start_kernel(cwd=str(cwd))
        owner = str(runtime.record(km.kernel_id).uid)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        await run_cell(kc, _BUILD.format(size=size))
        before = volume.bytes_used()
        used, seconds, shared = [], [], []
        for k in range(count):
            if k:
                await run_cell(kc, _CHANGE.format(k=k - 1))
            name = f"bench-inc-{uuid.uuid4().hex[:8]}-{k}"
            made.append(name)
            start = time.perf_counter()
            # As a user takes one: the magic (which first gives free heap memory back).
            await run_cell(kc, f"%container snapshot {name}")
            seconds.append(time.perf_counter() - start)
            # Saved in the background: its bytes and sharing are known once it is.
            await wait_saved(owner, name)
            meta = snapshots.load(owner, name)
            if meta["mode"] != "live":
                raise BenchError(f"snapshot {k + 1} fell back to {meta['mode']}: {meta['reason']}")
            used.append(volume.bytes_used() - before)
            shared.append(meta.get("shared_bytes", 0))
            print(
                f"  ours snapshot {k + 1}/{count}: {seconds[-1]:.3f} s, "
                f"{(used[-1] - (used[-2] if k else 0)) / MIB:.1f} MiB more on disk, "
                f"{shared[-1] / MIB:.1f} MiB shared with its parent (paused "
                f"{meta['paused_seconds']:.3f} s; saved {meta.get('save_seconds', 0):.3f} s "
                "after it returned)",
                file=sys.stderr,
            )
        return {"used": used, "seconds": seconds, "shared": shared}
    finally:
        await _clean_kernel(runtime, km, kc, km.kernel_id if km.has_kernel else None, owner, made)


async def measure_dill(size: int, count: int, tmp: Path) -> dict[str, Any]:
    folder = tmp / "dill"
    folder.mkdir()
    try:
        code = _DILL.format(build=_BUILD.format(size=size), count=count, change=_CHANGE)
        return await run_child(code, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="500M", help="the state's size (default: 500M)")
    parser.add_argument("--count", type=int, default=10, help="snapshots (default: 10)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if the target is missed")
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size, "size")
    except SandboxError as err:
        parser.error(str(err))
    if args.count < 2:
        parser.error("--count must be at least 2")
    tmp = Path(tempfile.mkdtemp(prefix="bench-incremental-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        print(f"{args.count} snapshots of a {args.size} kernel, 1% changed between each:",
              file=sys.stderr)  # fmt: skip
        ours = asyncio.run(measure_ours(size, args.count, tmp))
        dill = asyncio.run(measure_dill(size, args.count, tmp))
    except (BenchError, SandboxError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, all_ = ours["used"][0], ours["used"][-1]
    d_one, d_all = dill["sizes"][0], sum(dill["sizes"])
    ratio, d_ratio = all_ / one, d_all / d_one
    ok = ratio <= TARGET
    print(f"\n{args.count} snapshots of a {args.size} state, 1% changed between each")
    print(f"{'':<28}{'ours':>12}{'dill':>12}{'ours/dill':>12}")
    print(f"{'one snapshot, MiB':<28}{one / MIB:>12.1f}{d_one / MIB:>12.1f}{one / d_one:>12.2f}")
    label = f"all {args.count}, MiB"
    print(f"{label:<28}{all_ / MIB:>12.1f}{d_all / MIB:>12.1f}{all_ / d_all:>12.2f}")
    print(f"{f'all {args.count} / one':<28}{ratio:>12.2f}{d_ratio:>12.2f}{ratio / d_ratio:>12.2f}")
    med = sorted(ours["seconds"])[len(ours["seconds"]) // 2]
    d_med = sorted(dill["seconds"])[len(dill["seconds"]) // 2]
    print(f"{'median snapshot s':<28}{med:>12.3f}{d_med:>12.3f}{med / d_med:>12.2f}")
    print(f"\nTarget: all {args.count} / one <= {TARGET}: {ratio:.2f}  {'PASS' if ok else 'FAIL'}")
    totals, running = [], 0
    for size in dill["sizes"]:
        running += size
        totals.append(running / MIB)
    lines(
        IMG / "incremental.png",
        f"Bytes on disk over {args.count} snapshots of a {args.size} state, 1% changed each time",
        {"ours (live snapshots)": [u / MIB for u in ours["used"]], "dill.dump_module": totals},
        "snapshots taken",
        "MiB on disk",
    )
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "dill": dill, "ratio": ratio}, indent=2))
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
