"""What automatic checkpoints cost, and what undo and a crash take.

Two sandboxed kernelspecs that differ only in ``autosave`` (on, off) run a
data-analysis notebook of 30 cells written for this benchmark (numpy and pandas,
cells of 10 ms to about 5 s, a few hundred MB of state at the end), and the tour
(``notebooks/tour.ipynb``):

- **Run All**: every cell's request sent at once, as JupyterLab's Run All does;
  the time from the first request to the last reply. Autosave on / off, target
  <= 1.05.
- **The tour**, run by nbclient as ``jupyter nbconvert --execute`` does (each
  cell sent once the one before has replied): the cells' time, autosave on / off,
  the median of ``--rounds`` alternated runs, and the checkpoints taken.
- **Interactive use**: the cells one by one with 2 s pauses; each cell's time from
  its request to its reply, autosave on against off: the added latency at p50 and
  p95, and the kernel's frozen time per checkpoint. Target: the p95 added at most
  one checkpoint's frozen time.
- **Bytes**: what each checkpoint of the interactive run added to the store (its
  memory not shared with the one before, and its files), against the bytes its
  cell changed. This kernel has no soft-dirty bits, so "changed" is measured here,
  apart from the store's own sharing: every page of the checkpoint's memory image
  whose bytes differ from the page at the same address in the one before (or that
  the one before lacks), plus every 4 KiB block of the kernel's files that
  differs. Target: added <= changed + 15 MB. A page the cell rewrote with the same
  bytes counts as unchanged (soft-dirty would count it).
- **Undo** of a 300 MB kernel against ``%container restore`` of a snapshot of the
  same state: the undo cell until the next cell's reply, against the restore cell
  until the next cell's reply, each once no checkpoint is being saved. Target <= 1.2.
- **Out of memory**: a cell that allocates past the limit, from its request to
  its error reply (jupyter_client's restarter, polling every 3 s, notices the
  death; the runtime then restores the last checkpoint).

Needs root and pandas (the ``bench`` extra)::

    .venv/bin/python bench/autosave.py [--pause 2] [--json out.json]
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
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, Runtime, bases, saving, snapshots
from sandbox_kernel.runtime.dedupe import PAGE, read_pagemap
from sandbox_kernel.runtime.timetravel import checkpoints_of

ON, OFF = "bench-autosave-on", "bench-autosave-off"
RUN_ALL_TARGET = 1.05
UNDO_TARGET = 1.2
#: Bytes a checkpoint may add beyond those its cell changed.
BYTES_SLACK = 15_000_000
MIB = 1 << 20

#: The notebook: numpy and pandas, cells from 10 ms to a few seconds.
NOTEBOOK = [
    "import numpy as np, pandas as pd, time",
    "rng = np.random.default_rng(0)",
    "n = 2_000_000",
    "df = pd.DataFrame({'a': rng.normal(size=n), 'b': rng.integers(0, 100, n), "
    "'c': rng.choice(list('abcdefgh'), n)})",
    "df.describe()",
    "df['d'] = df['a'] * 2 + df['b']",
    "g = df.groupby('c')['d'].mean(); g",
    "top = df.nlargest(1000, 'd')",
    "m = rng.normal(size=(2000, 2000))",
    "u, s, vt = np.linalg.svd(m[:800, :800])",
    "s[:5]",
    "df['e'] = df['c'].map({k: i for i, k in enumerate('abcdefgh')})",
    "pivot = df.pivot_table(index='c', columns=pd.cut(df['b'], 5), values='a', aggfunc='mean')",
    "pivot",
    "time.sleep(0.5)",
    "big = rng.random(20_000_000)",
    "big.sum()",
    "df2 = df.sample(500_000, random_state=1).reset_index(drop=True)",
    "merged = df2.merge(g.rename('gm').reset_index(), on='c')",
    "merged.head()",
    "corr = df[['a', 'b', 'd', 'e']].corr(); corr",
    "hist = np.histogram(df['a'], bins=100)",
    "time.sleep(1.5)",
    "roll = df['a'].rolling(1000).mean()",
    "roll.iloc[-5:]",
    "sq = m @ m.T",
    "del sq",
    "ranks = df['d'].rank()",
    "time.sleep(3)",
    "summary = {'rows': len(df), 'mean': float(df['d'].mean())}; summary",
]
TOUR = Path(__file__).resolve().parents[1] / "notebooks" / "tour.ipynb"
BIG = "state = np.random.default_rng(3).integers(0, 256, 300 << 20, dtype=np.uint8)"


def make_kernelspecs(tmp: Path) -> KernelSpecManager:
    limits = Limits.parse(memory="4G", cpus="2", pids="512", disk="10G")
    config = provisioner_config("host", limits, "none")
    install(ON, "autosave on", {**config, "autosave": True}, prefix=str(tmp))
    install(OFF, "autosave off", config, prefix=str(tmp))
    return KernelSpecManager(kernel_dirs=[str(tmp / "share" / "jupyter" / "kernels")])


async def reply_to(kc: Any, msg_id: str, timeout: float = 300) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = await kc.get_shell_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


async def cell(kc: Any, code: str) -> tuple[float, dict[str, Any]]:
    """Run ``code``; its time from request to reply, and the reply."""
    start = time.perf_counter()
    reply = await reply_to(kc, kc.execute(code))
    return time.perf_counter() - start, reply


class Kernel:
    def __init__(self, ksm: KernelSpecManager, name: str, cwd: Path) -> None:
        self.km = AsyncIOLoopKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        self.cwd = cwd
        self.kc: Any = None

    async def __aenter__(self) -> Kernel:
        await self.km.start_kernel(cwd=str(self.cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.kc.stop_channels()
        await self.km.shutdown_kernel(now=True)

    def checkpoints(self) -> list[dict[str, Any]]:
        return checkpoints_of(Runtime().record(self.km.kernel_id))

    async def checkpointed_after(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(c["cell"] == count for c in self.checkpoints()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no checkpoint after cell {count} in {timeout:.0f} s")
            await asyncio.sleep(0.05)


async def run_all(ksm: KernelSpecManager, name: str, cwd: Path) -> float:
    async with Kernel(ksm, name, cwd) as k:
        start = time.perf_counter()
        ids = [k.kc.execute(code) for code in NOTEBOOK]
        for msg_id in ids:
            reply = await reply_to(k.kc, msg_id)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"a cell failed: {reply['content']}")
        return time.perf_counter() - start


async def tour(ksm: KernelSpecManager, name: str, cwd: Path) -> tuple[float, int]:
    """The tour's cells run by nbclient: their time (the start not counted) and the
    checkpoints kept at the end."""
    nb = nbformat.read(TOUR, as_version=4)
    km = AsyncIOLoopKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(cwd)}})
    try:
        async with client.async_setup_kernel():
            start = time.perf_counter()
            for index, code in enumerate(nb.cells):
                await client.async_execute_cell(code, index)
            took = time.perf_counter() - start
            await settled()
            kept = len(checkpoints_of(Runtime().record(km.kernel_id)))
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    return took, kept


async def interactive(ksm: KernelSpecManager, name: str, cwd: Path, pause: float) -> dict[str, Any]:
    async with Kernel(ksm, name, cwd) as k:
        times = []
        for code in NOTEBOOK:
            took, reply = await cell(k.kc, code)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"a cell failed: {reply['content']}")
            times.append(took)
            await asyncio.sleep(pause)  # the person reads the output: part of the workload
        owner = str(Runtime().record(k.km.kernel_id).uid)
        added, paused = [], []
        for c in k.checkpoints():
            meta = snapshots.load(owner, c["name"])  # waits for its save
            added.append(
                max(0, meta.get("memory_bytes", 0) - meta.get("shared_bytes", 0))
                + meta.get("layer_bytes", 0)
            )
            paused.append(meta.get("paused_seconds", 0.0))
        measured = await asyncio.to_thread(bytes_per_checkpoint, owner, k.checkpoints())
        return {"times": times, "added": added, "paused": paused, "bytes": measured}


def _parent_images(meta: dict[str, Any]) -> Path | None:
    """The memory images the checkpoint shared its pages with, if still kept."""
    shared = meta.get("shared_with") or {}
    if shared.get("kind") == "snapshot":
        found = snapshots.snapshot_dir(str(meta["owner"]), shared["name"]) / "criu"
    elif shared.get("kind") == "base":
        found = bases.base_dir(shared["id"]) / "criu"
    else:
        return None
    return found if found.is_dir() else None


def changed_memory(images: Path, parent: Path) -> int:
    """Bytes of the pages in ``images`` whose contents differ from the page at the
    same address of the same process in ``parent``, or that ``parent`` lacks."""
    changed = 0
    for pagemap in sorted(images.glob("pagemap-*.img")):
        pages_id, runs = read_pagemap(pagemap)
        old: dict[int, int] = {}  # address -> offset in the parent's pages file
        old_pages = None
        if (parent / pagemap.name).exists():
            old_id, old_runs = read_pagemap(parent / pagemap.name)
            old = {r.vaddr + i * PAGE: r.offset + i * PAGE
                   for r in old_runs for i in range(r.pages)}  # fmt: skip
            old_pages = (parent / f"pages-{old_id}.img").read_bytes()
        new_pages = (images / f"pages-{pages_id}.img").read_bytes()
        for run in runs:
            for i in range(run.pages):
                at = old.get(run.vaddr + i * PAGE)
                mine = new_pages[run.offset + i * PAGE : run.offset + (i + 1) * PAGE]
                if at is None or old_pages is None or old_pages[at : at + PAGE] != mine:
                    changed += PAGE
    return changed


def changed_files(files: Path, parent: Path | None) -> int:
    """Bytes of the 4 KiB blocks of the regular files under ``files`` that differ
    from the same file's under ``parent`` (all of a new file's)."""
    changed = 0
    for path in files.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        new = path.read_bytes()
        other = parent / path.relative_to(files) if parent is not None else None
        old = other.read_bytes() if other is not None and other.is_file() else b""
        for at in range(0, len(new), PAGE):
            if new[at : at + PAGE] != old[at : at + PAGE]:
                changed += len(new[at : at + PAGE])
    return changed


def bytes_per_checkpoint(owner: str, kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each kept checkpoint whose parent is kept too: its cell, the bytes it
    added to the store and the bytes its cell changed."""
    rows = []
    for c in kept:
        meta = snapshots.load(owner, c["name"])  # waits for its save
        parent = _parent_images(meta)
        if parent is None:
            continue
        folder = snapshots.snapshot_dir(owner, c["name"])
        parent_files = parent.parent / "files" if (parent.parent / "files").is_dir() else None
        memory = changed_memory(folder / "criu", parent)
        files = changed_files(folder / "files", parent_files)
        added = max(0, meta.get("memory_bytes", 0) - meta.get("shared_bytes", 0)) + meta.get(
            "layer_bytes", 0
        )
        rows.append({"cell": c["cell"], "added": added, "changed": memory + files})
    return rows


async def settled() -> None:
    """Wait (untimed) until no checkpoint is being saved: the save after the last
    cell would take the disk and a core from the operation timed next, for one of
    the two only."""
    await asyncio.sleep(0.2)  # the checkpoint after the last cell starts meanwhile
    if not await asyncio.to_thread(saving.wait_all, 300):
        raise RuntimeError("a checkpoint was still being saved after 300 s")


async def undo_vs_restore(ksm: KernelSpecManager, cwd: Path, rounds: int) -> dict[str, Any]:
    async with Kernel(ksm, ON, cwd) as k:
        await cell(k.kc, "import numpy as np")
        _, reply = await cell(k.kc, BIG)
        await k.checkpointed_after(reply["content"]["execution_count"])
        await cell(k.kc, "%container snapshot bench-autosave-equal")
        undo, restore = [], []
        try:
            for _ in range(rounds):
                _, reply = await cell(k.kc, "x = 1")
                await k.checkpointed_after(reply["content"]["execution_count"])
                await settled()
                undo.append(await back(k.kc, "%container undo", "undo"))
                await settled()
                restore.append(
                    await back(k.kc, "%container restore bench-autosave-equal", "restore")
                )
        finally:
            await cell(k.kc, "%container delete bench-autosave-equal")
        return {"undo": undo, "restore": restore}


async def printed(kc: Any, code: str) -> dict[str, Any]:
    """Run ``code``; its reply, with what it printed under ``"stdout"``."""
    texts: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])

    reply: dict[str, Any] = await kc.execute_interactive(code, timeout=300, output_hook=hook)
    return {**reply, "stdout": "".join(texts)}


async def back(kc: Any, command: str, what: str) -> float:
    """The time of ``command`` (an undo or a restore) and the next cell, until its
    reply; checked: both went through, and the next cell saw the state before ``x``."""
    start = time.perf_counter()
    _, done = await cell(kc, command)
    after = await printed(kc, "print('x' in dir())")
    took = time.perf_counter() - start
    for reply in (done, after):
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the {what} failed: {reply['content']}")
    if after["stdout"].strip() != "False":
        raise RuntimeError(f"after the {what}, x is still there: {after['stdout']!r}")
    return took


async def out_of_memory(ksm: KernelSpecManager, cwd: Path) -> float:
    async with Kernel(ksm, ON, cwd) as k:
        _, reply = await cell(k.kc, "kept = 1")
        await k.checkpointed_after(reply["content"]["execution_count"])
        await cell(k.kc, "%container limits --memory 300M")
        took, reply = await cell(k.kc, "b = bytearray(600_000_000)")
        if reply["content"].get("ename") != "MemoryError":
            raise RuntimeError(f"expected a MemoryError reply: {reply['content']}")
        return took


def print_undo(found: dict[str, list[float]]) -> None:
    undo, restore = statistics.median(found["undo"]), statistics.median(found["restore"])
    ratio = undo / restore
    print(f"\n{'300 MB kernel':<34}{'undo':>12}{'restore':>10}{'ratio':>8}")
    print(f"{'cell until the next reply, s':<34}{undo:>12.3f}{restore:>10.3f}{ratio:>8.2f}  "
          f"<= {UNDO_TARGET}: {'PASS' if ratio <= UNDO_TARGET else 'FAIL'}")  # fmt: skip
    rounds = zip(found["undo"], found["restore"], strict=True)
    print("each round, s: " + ", ".join(f"undo {u:.3f} restore {r:.3f}" for u, r in rounds))


def print_all(found: dict[str, Any], pause: float) -> None:
    ra = found["run_all"]
    ra_ratio = ra[ON] / ra[OFF]
    on, off = found["interactive"][ON], found["interactive"][OFF]
    added = [a - b for a, b in zip(on["times"], off["times"], strict=True)]
    frozen = statistics.median(on["paused"]) if on["paused"] else 0.0
    print(f"\n{'':<34}{'autosave on':>12}{'off':>10}{'ratio':>8}  target")
    print(f"{'Run All, 30 cells, s':<34}{ra[ON]:>12.2f}{ra[OFF]:>10.2f}{ra_ratio:>8.3f}  "
          f"<= {RUN_ALL_TARGET}: {'PASS' if ra_ratio <= RUN_ALL_TARGET else 'FAIL'}")  # fmt: skip
    t_on, t_off = (statistics.median(found["tour"][n]) for n in (ON, OFF))
    t_ratio = t_on / t_off
    print(f"{'the tour (nbclient), s':<34}{t_on:>12.2f}{t_off:>10.2f}{t_ratio:>8.3f}  "
          f"<= {RUN_ALL_TARGET}: {'PASS' if t_ratio <= RUN_ALL_TARGET else 'FAIL'}"
          f"  ({found['tour']['kept']} checkpoints kept)")  # fmt: skip
    p50, p95 = pct(added, 0.5), pct(added, 0.95)
    print(f"\ninteractive, {len(added)} cells {pause:g} s apart: latency added by autosave")
    print(f"{'p50 s':<34}{p50:>12.3f}")
    print(f"{'p95 s':<34}{p95:>12.3f}  <= one checkpoint's frozen time ({frozen:.3f} s): "
          f"{'PASS' if p95 <= frozen else 'FAIL'}")  # fmt: skip
    rows = on["bytes"]
    head = f"{'checkpoint after cell':<24}{'changed MiB':>12}{'added MiB':>11}"
    print(f"\n{head}{'added - changed':>17}")
    for r in rows:
        print(f"{r['cell']:<24}{r['changed'] / MIB:>12.1f}{r['added'] / MIB:>11.1f}"
              f"{(r['added'] - r['changed']) / MIB:>17.1f}")  # fmt: skip
    worst = max((r["added"] - r["changed"] for r in rows), default=0)
    verdict = "PASS" if worst <= BYTES_SLACK else "FAIL"
    print(f"{len(rows)} checkpoints with their parent kept; the most added beyond the "
          f"changed bytes: {worst / 1e6:.1f} MB <= 15 MB: {verdict}")  # fmt: skip
    print(f"frozen per checkpoint, s: median {frozen:.3f}, max {max(on['paused'], default=0):.3f}")
    print_undo(found["undo"])
    print(f"\nout of memory: request to the MemoryError reply {found['oom']:.2f} s")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause", type=float, default=2.0, help="between cells (default 2 s)")
    parser.add_argument("--rounds", type=int, default=3, help="undo/restore rounds (default 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--only", choices=("undo",), help="measure this part alone")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-autosave-", dir="/tmp"))
    tmp.chmod(0o755)
    cwd = tmp / "cwd"
    cwd.mkdir(mode=0o755)
    try:
        ksm = make_kernelspecs(tmp)

        async def everything() -> dict[str, Any]:
            found: dict[str, Any] = {}
            if args.only == "undo":
                found["undo"] = await undo_vs_restore(ksm, cwd, args.rounds)
                return found
            print("Run All, autosave off then on ...", file=sys.stderr)
            found["run_all"] = {n: await run_all(ksm, n, cwd) for n in (OFF, ON)}
            print("the tour, autosave off and on ...", file=sys.stderr)
            found["tour"] = {OFF: [], ON: [], "kept": 0}
            for _ in range(args.rounds):
                for n in (OFF, ON):
                    took, kept = await tour(ksm, n, cwd)
                    found["tour"][n].append(took)
                    found["tour"]["kept"] = max(found["tour"]["kept"], kept)
            print(f"cells one by one, {args.pause} s apart ...", file=sys.stderr)
            found["interactive"] = {n: await interactive(ksm, n, cwd, args.pause)
                                    for n in (OFF, ON)}  # fmt: skip
            print("undo against restore, 300 MB ...", file=sys.stderr)
            found["undo"] = await undo_vs_restore(ksm, cwd, args.rounds)
            print("out of memory ...", file=sys.stderr)
            found["oom"] = await out_of_memory(ksm, cwd)
            return found

        found = asyncio.run(everything())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.only == "undo":
        print_undo(found["undo"])
    else:
        print_all(found, args.pause)
    if args.json:
        args.json.write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
