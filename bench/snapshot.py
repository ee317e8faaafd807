"""Snapshot and restore of a kernel's live state: ours (runc + CRIU) against dill's.

For each state size (``--sizes``, default ``10M,100M,300M,1G``) the benchmark builds
the same state twice: a numpy ``uint8`` array of that many random bytes (seeded, so
both sides hold identical data and no compression could shrink it), named ``state``.

- Ours: a sandboxed kernel (our kernelspec, installed into a temporary prefix) is
  started through jupyter_client's AsyncKernelManager and builds ``state`` in a cell.
  Timed, wall clock, as a notebook user waits:
  - *snapshot*: the cell ``%container snapshot NAME``, from the client's execute to
    its reply. The snapshot must be ``live``. The images are written to the volume
    after the kernel is thawed, in the background (``runtime/saving.py``); the
    benchmark then waits for that save (timed apart, and broken down) before it
    counts bytes or restores, so a restore never waits for it here;
  - *frozen*: how long the kernel was frozen (the snapshot's ``paused_seconds``);
  - *restore*: after ``del state``, the cell ``%container restore NAME`` and then a
    cell ``pass``, from the restore's execute to the reply of ``pass``: until the
    next cell runs. The same client stays connected throughout; a cell then checks
    that ``state`` is back and unchanged.
  Bytes on disk: what the btrfs volume holds more after the save than before (data
  and metadata, after compression, blocks shared with other snapshots not counted
  again); they cover the whole kernel process (Python, IPython, numpy and
  ``state``), not just ``state``. The snapshot is deleted after.
- dill: no kernel. A plain subprocess of this Python builds ``state`` in
  ``__main__`` and times ``dill.dump_module(path)`` (snapshot, and frozen: the
  interpreter does nothing else meanwhile); a fresh interpreter, timed from its
  start, imports numpy, runs ``dill.load_module(path)`` and checks ``state``
  (restore). Bytes on disk: the file's size. dill does not fsync its file; ours
  fsyncs and checksums every image before the snapshot is listed as saved, and
  verifies them on restore.

Then the "dict of a million small tuples" case, ``{i: (i, i * 2, str(i)) for i in
range(1_000_000)}``, the same way (``--tuples N`` changes the count, 0 skips it).

Each case runs ``--repeat`` times (a new snapshot and dump each time); the tables
show medians and ``--json`` has every run. Beside the figures are the targets: for
300 MB (300M) and 1 GB (1G) states, snapshot and restore each take at most half of
dill's, the kernel is frozen at most 0.6 s for 1 GB, and the million tuples take
<= 2.5x dill's bytes on disk. The chart ``docs/img/snapshot.png`` shows snapshot
and restore time against the state's size.

Where our time goes is shown per phase (pause, btrfs snapshot, CRIU dump, the
background copy, ...): the benchmark wraps the runtime's own steps in timers for
the run (``--no-breakdown`` leaves them alone); the real code runs either way.
CRIU's own figures (frozen, memory dump and write, restore times; pages) come from
the ``stats-dump`` and ``stats-restore`` files it leaves in the kernel's CRIU work
folder.

One kernel runs at a time. Needs root (runc, CRIU, network namespaces, mounts) and
dill in the venv (``.venv/bin/pip install dill``)::

    .venv/bin/python bench/snapshot.py [--sizes 10M,100M,300M,1G] [--tuples 1000000]
        [--repeat 3] [--json out.json] [--strict]

A quick run: ``.venv/bin/python bench/snapshot.py --sizes 1M,10M --tuples 100000 --repeat 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import inspect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charts import IMG, against_size  # bench/charts.py
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.errors import KernelNotFound, SandboxError
from sandbox_kernel.kernelspec import install, provisioner_config
from sandbox_kernel.runtime import Limits, Runtime, dedupe, runc, snapshots, volume
from sandbox_kernel.runtime.limits import parse_size
from sandbox_kernel.runtime.rootfs import Rootfs

SPEC = "bench-snap"
READY_TIMEOUT = 60.0
CELL_TIMEOUT = 600.0
CHILD_TIMEOUT = 1800.0
TUPLES_TARGET_COUNT = 1_000_000
MIB = 1 << 20

_SNAPSHOTTING = importlib.import_module("sandbox_kernel.runtime.snapshotting")


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a fallback, a wrong state)."""


# ---- the cases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One state to snapshot: code that builds ``state`` and code that fingerprints it."""

    key: str  # in tables, JSON and snapshot names: "10M", "tuples"
    title: str
    build: str  # leaves ``state`` in the module's globals
    check: str  # prints a fingerprint of ``state``
    preload: str  # imports dill's loader may need, run before its timer starts
    size: int | None = None  # bytes of random data, for the array cases
    count: int | None = None  # entries, for the tuples case


def array_case(label: str, size: int) -> Case:
    """``state``: ``size`` random bytes in a numpy uint8 array."""
    return Case(
        key=label,
        title=f"state {label}: numpy uint8 array of {size:,} random bytes",
        build=(
            "import numpy as np\n"
            f"state = np.random.default_rng(0).integers(0, 256, size={size}, dtype=np.uint8)"
        ),
        check="print(state.dtype, state.shape[0], int(state.sum()))",
        preload="import numpy",
        size=size,
    )


def tuples_case(count: int) -> Case:
    """``state``: a dict of ``count`` small tuples, ``{i: (i, i * 2, str(i))}``."""
    return Case(
        key="tuples",
        title=f"dict of {count:,} small tuples: {{i: (i, i * 2, str(i)) for i in range(n)}}",
        build=f"state = {{i: (i, i * 2, str(i)) for i in range({count})}}",
        check="print(len(state), state[len(state) - 1], sum(v[1] for v in state.values()))",
        preload="",
        count=count,
    )


# ---- timing the runtime's steps ------------------------------------------------------


class Phases:
    """Times the runtime's own steps while one of ours is recorded.

    :meth:`installed` wraps a few functions of the runtime's modules in timers that
    add to the current recording; the wrapped functions run unchanged.
    """

    SNAPSHOT = "snapshot"
    SAVE = "save"
    RESTORE = "restore"
    #: (object, attribute, phase label) for every step timed.
    STEPS: tuple[tuple[Any, str, str], ...] = (
        (runc, "pause", "runc pause"),
        (runc, "checkpoint", "CRIU dump (runc checkpoint --leave-running)"),
        (runc, "resume", "runc resume"),
        (runc, "delete", "runc delete"),
        (runc, "restore", "CRIU restore (runc restore)"),
        (runc, "create", "runc create (files fallback!)"),
        (volume, "snapshot_subvolume", "btrfs snapshot"),
        (volume, "delete_subvolume", "btrfs delete subvolume"),
        (snapshots, "check_folder", "verify (read or sha256 every image)"),
        (snapshots.Draft, "commit", "commit (sha256 + fsync of every image, rename)"),
        (_SNAPSHOTTING, "tree_bytes", "count file bytes"),
        (_SNAPSHOTTING, "tree_sizes", "count file bytes"),
        (Rootfs, "mount", "mount overlays"),
        (Rootfs, "unmount", "unmount overlays"),
        (dedupe, "share_with_parent", "share unchanged pages with the parent"),
        (dedupe, "copy_sharing", "copy to the volume (reflink parent pages, sha256, fsync)"),
        (snapshots, "_sha256", "sha256"),
        (snapshots, "_sha256_and_fsync", "sha256 + fsync"),
    )
    #: Steps inside other steps (commit and verify): shown apart, not added to the rest.
    SUBSTEPS = frozenset({"sha256", "sha256 + fsync"})

    def __init__(self) -> None:
        self._current: dict[str, float] | None = None

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[str, float]]:
        """Collect the seconds of each step run inside the block, by label."""
        got: dict[str, float] = {}
        self._current = got
        try:
            yield got
        finally:
            self._current = None

    def _add(self, label: str, seconds: float) -> None:
        if self._current is not None:
            self._current[label] = self._current.get(label, 0.0) + seconds

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self._add(label, time.perf_counter() - start)

            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(label, time.perf_counter() - start)

        return timed

    @contextlib.contextmanager
    def installed(self, enabled: bool = True) -> Iterator[Phases]:
        """Wrap every step in :attr:`STEPS` for the block (if ``enabled``); unwrap after."""
        originals: list[tuple[Any, str, Any]] = []
        try:
            for owner, attr, label in self.STEPS if enabled else ():
                original = vars(owner)[attr]
                if isinstance(original, staticmethod):
                    replacement: Any = staticmethod(self._wrap(original.__func__, label))
                else:
                    replacement = self._wrap(original, label)
                setattr(owner, attr, replacement)
                originals.append((owner, attr, original))
            yield self
        finally:
            for owner, attr, original in reversed(originals):
                setattr(owner, attr, original)


# ---- our side ------------------------------------------------------------------------


@dataclass
class Runs:
    """Every run of one side of one case."""

    snapshot_s: list[float] = field(default_factory=list)
    restore_s: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    phases: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    criu: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def note(self, name: str, value: float) -> None:
        self.extra.setdefault(name, []).append(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot_s": self.snapshot_s,
            "restore_s": self.restore_s,
            "bytes": self.bytes,
            "median": {
                "snapshot_s": median(self.snapshot_s),
                "restore_s": median(self.restore_s),
                "bytes": median(self.bytes),
            },
            **self.extra,
            **({"phases": self.phases} if self.phases else {}),
            **({"criu_stats": self.criu} if self.criu else {}),
        }


def median(values: list[float] | list[int]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def make_kernelspec(tmp: Path, memory: str) -> KernelSpecManager:
    """Install the sandboxed kernelspec under ``tmp``; a manager that sees only it."""
    limits = Limits.parse(memory=memory, cpus="2", pids="512", disk="10G")
    install(SPEC, "bench", provisioner_config("host", limits, "none"), prefix=str(tmp))
    return KernelSpecManager(kernel_dirs=[str(tmp / "share" / "jupyter" / "kernels")])


async def run_cell(kc: Any, code: str) -> str:
    """Run ``code`` in the kernel; return what it printed.

    Raises:
        BenchError: the cell failed (with its traceback).
    """
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply: dict[str, Any] = await kc.execute_interactive(
        code, timeout=CELL_TIMEOUT, output_hook=hook, store_history=False
    )
    if reply["content"]["status"] != "ok":
        raise BenchError(f"cell failed: {code!r}\n{''.join(out)[-3000:]}")
    return "".join(out).strip()


async def measure_ours(
    case: Case, ksm: KernelSpecManager, cwd: Path, repeat: int, phases: Phases
) -> tuple[Runs, str]:
    """Snapshot and restore ``case`` in one sandboxed kernel ``repeat`` times.

    Returns the runs and the state's fingerprint. The kernel and every snapshot are
    gone afterwards, also when a step fails.
    """
    runs = Runs()
    runtime = Runtime()
    km = AsyncKernelManager(kernel_name=SPEC, kernel_spec_manager=ksm)
    kc: Any = None
    kernel_id: str | None = None
    owner: str | None = None
    made: list[str] = []
    try:
        await km.start_kernel(cwd=str(cwd))
        kernel_id = km.kernel_id
        owner = str(runtime.record(kernel_id).uid)
        work = runtime.kernel_dir(kernel_id) / "criu-work"  # CRIU's logs and stats
        kc = km.client(context=km.context)  # as the Jupyter server connects (km.connect_*)
        kc.start_channels()
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        await run_cell(kc, case.build)
        expected = await run_cell(kc, case.check)
        for i in range(repeat):
            name = f"bench-{case.key}-{uuid.uuid4().hex[:8]}-{i}"
            made.append(name)
            used_before = volume.bytes_used()
            with phases.record() as snap_phases:
                start = time.perf_counter()
                await run_cell(kc, f"%container snapshot {name}")
                snap_s = time.perf_counter() - start
            # Saved to the volume in the background: wait for it before the restore
            # (which would wait too) and before counting the bytes on disk.
            with phases.record() as save_phases:
                start = time.perf_counter()
                await wait_saved(owner, name)
                saved_s = time.perf_counter() - start
            meta = snapshots.load(owner, name)
            on_disk = volume.bytes_used() - used_before
            dump_stats = criu_stats(work / "stats-dump")  # the next restore clears the folder
            if meta["mode"] != "live":
                raise BenchError(
                    f"{case.key}: the snapshot fell back to {meta['mode']!r} mode: "
                    f"{meta.get('reason')}"
                )
            await run_cell(kc, "del state")
            with phases.record() as restore_phases:
                start = time.perf_counter()
                await run_cell(kc, f"%container restore {name}")
                restore_s = time.perf_counter() - start
                await run_cell(kc, "pass")
                next_s = time.perf_counter() - start
            restore_stats = criu_stats(work / "stats-restore")
            record = runtime.record(kernel_id)
            if record.snapshot != name:
                raise BenchError(f"{case.key}: the kernel was not restored to {name}")
            got = await run_cell(kc, case.check)
            if got != expected:
                raise BenchError(f"{case.key}: state after restore is {got!r}, not {expected!r}")
            runs.snapshot_s.append(snap_s)
            runs.restore_s.append(next_s)
            runs.bytes.append(on_disk)
            runs.note("logical_bytes", int(meta["memory_bytes"]) + int(meta["file_bytes"]))
            runs.note("memory_bytes", meta["memory_bytes"])
            runs.note("file_bytes", meta["file_bytes"])
            runs.note("runtime_seconds", meta["seconds"])
            runs.note("paused_seconds", meta["paused_seconds"])
            runs.note("save_seconds", float(meta.get("save_seconds", 0.0)))
            runs.note("saved_after_cell_s", saved_s)
            runs.note("restore_cell_s", restore_s)
            if snap_phases or restore_phases:
                runs.phases.setdefault(Phases.SNAPSHOT, []).append(snap_phases)
                runs.phases.setdefault(Phases.SAVE, []).append(save_phases)
                runs.phases.setdefault(Phases.RESTORE, []).append(restore_phases)
            for kind, stats in ((Phases.SNAPSHOT, dump_stats), (Phases.RESTORE, restore_stats)):
                if stats:
                    runs.criu.setdefault(kind, []).append(stats)
            snapshots.delete(owner, name)
            made.remove(name)
            print(
                f"  ours  {case.key} run {i + 1}/{repeat}: snapshot cell {snap_s:.3f} s "
                f"(frozen {meta['paused_seconds']:.3f} s, saved {saved_s:.3f} s later), "
                f"restore cell {restore_s:.3f} s and the next cell {next_s:.3f} s after "
                f"its execute, {runs.bytes[-1] / MIB:.1f} MiB",
                file=sys.stderr,
            )
        return runs, expected
    finally:
        await _clean_kernel(runtime, km, kc, kernel_id, owner, made)


async def wait_saved(owner: str, name: str, timeout: float = CELL_TIMEOUT) -> None:
    """Wait until snapshot ``name`` is saved to the volume (its meta is in place).

    Raises:
        BenchError: not saved in time (its save failed: the kernel's log says why).
    """
    meta = snapshots.snapshot_dir(owner, name) / "meta.json"
    deadline = time.monotonic() + timeout
    while not meta.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"snapshot {name} was not saved within {timeout:.0f} s")
        await asyncio.sleep(0.01)


async def _clean_kernel(
    runtime: Runtime,
    km: AsyncKernelManager,
    kc: Any,
    kernel_id: str | None,
    owner: str | None,
    made: list[str],
) -> None:
    """Delete the snapshots in ``made``, stop the client, shut the kernel down."""
    if owner is not None:
        for name in made:
            try:
                if name in snapshots.names(owner):
                    snapshots.delete(owner, name)
            except (OSError, SandboxError) as err:
                print(f"  could not delete snapshot {name}: {err}", file=sys.stderr)
    if kc is not None:
        kc.stop_channels()
    try:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    except Exception as err:  # report it; the runtime's removal below still runs
        print(f"  shutdown of kernel {kernel_id} failed: {err!r}", file=sys.stderr)
    if kernel_id is not None:
        with contextlib.suppress(KernelNotFound):
            runtime.record(kernel_id)
            print(f"  kernel {kernel_id} was still there: removing it", file=sys.stderr)
            await runtime.remove(kernel_id)


# ---- CRIU's own statistics ----------------------------------------------------------

_STATS_MAGIC = 0x57093306  # CRIU's magic.h: STATS_MAGIC, after the image-set magic
#: images/stats.proto: field numbers of dump_stats_entry and restore_stats_entry.
_DUMP_FIELDS = {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time",
                5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written"}  # fmt: skip
_RESTORE_FIELDS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time",
                   4: "restore_time", 5: "pages_restored"}  # fmt: skip


def criu_stats(path: Path) -> dict[str, float]:
    """CRIU's ``stats-dump`` or ``stats-restore`` image: times in s, page counts.

    Empty if the file is missing or not understood; these figures are only shown.
    """
    try:
        data = path.read_bytes()
        if int.from_bytes(data[4:8], "little") != _STATS_MAGIC:
            return {}
        size = int.from_bytes(data[8:12], "little")
        entry = dedupe.message_fields(data[12 : 12 + size])
        for number, names in ((1, _DUMP_FIELDS), (2, _RESTORE_FIELDS)):
            inner = entry.get(number)
            if isinstance(inner, bytes):
                found = dedupe.varint_fields(inner)
                return {
                    name: found[n] / 1e6 if name.endswith("_time") else float(found[n])
                    for n, name in names.items()
                    if n in found
                }
    except (OSError, ValueError, IndexError):
        return {}
    return {}


# ---- dill's side ---------------------------------------------------------------------

_DUMP = """\
import contextlib, io, json, sys, time
import dill
{build}
_bench_dump_t0 = time.perf_counter()
dill.dump_module(sys.argv[1])
_bench_dump_s = time.perf_counter() - _bench_dump_t0
_bench_out = io.StringIO()
with contextlib.redirect_stdout(_bench_out):
    exec({check!r})
print(json.dumps({{"seconds": _bench_dump_s, "check": _bench_out.getvalue().strip()}}))
"""

_LOAD = """\
import contextlib, io, json, sys, time
import dill
{preload}
_bench_load_t0 = time.perf_counter()
dill.load_module(sys.argv[1])
_bench_load_s = time.perf_counter() - _bench_load_t0
_bench_out = io.StringIO()
with contextlib.redirect_stdout(_bench_out):
    exec({check!r})
print(json.dumps({{"seconds": _bench_load_s, "check": _bench_out.getvalue().strip()}}))
"""


async def run_child(code: str, path: Path) -> dict[str, Any]:
    """Run ``code`` in a fresh ``sys.executable`` with ``path`` as its argument; return
    the JSON object it prints last. The child is killed if this is cancelled.

    Raises:
        BenchError: the child failed or timed out.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT)
    except TimeoutError:
        raise BenchError(f"a dill subprocess took over {CHILD_TIMEOUT:.0f} s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"a dill subprocess failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def measure_dill(case: Case, folder: Path, repeat: int, expected: str | None) -> Runs:
    """Dump ``case`` with dill and load it in a fresh process, ``repeat`` times.

    ``expected`` is the fingerprint our kernel printed; dill's state must match it.
    """
    runs = Runs()
    for i in range(repeat):
        path = folder / f"{case.key}-{i}.dill"
        try:
            dumped = await run_child(_DUMP.format(build=case.build, check=case.check), path)
            size = path.stat().st_size
            start = time.perf_counter()
            loaded = await run_child(_LOAD.format(preload=case.preload, check=case.check), path)
            process_s = time.perf_counter() - start
        finally:
            path.unlink(missing_ok=True)
        if loaded["check"] != dumped["check"]:
            raise BenchError(
                f"{case.key}: dill loaded {loaded['check']!r}, not {dumped['check']!r}"
            )
        if expected is not None and dumped["check"] != expected:
            raise BenchError(
                f"{case.key}: dill's state {dumped['check']!r} differs from ours {expected!r}"
            )
        runs.snapshot_s.append(float(dumped["seconds"]))
        runs.restore_s.append(process_s)
        runs.bytes.append(size)
        runs.note("load_module_s", float(loaded["seconds"]))
        # dill's dump holds the interpreter for all of its time.
        runs.note("paused_seconds", float(dumped["seconds"]))
        print(
            f"  dill  {case.key} run {i + 1}/{repeat}: dump {runs.snapshot_s[-1]:.3f} s, "
            f"load {runs.extra['load_module_s'][-1]:.3f} s ({process_s:.3f} s with "
            "interpreter start), "
            f"{size / MIB:.1f} MiB",
            file=sys.stderr,
        )
    return runs


# ---- targets and the report ----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``row`` of case ``key`` at most ``limit``."""

    key: str
    row: str  # "snapshot s", "restore s" or "bytes on disk"
    limit: float
    text: str
    on_ratio: bool = False  # the limit applies to ours/dill, not to ours


TARGETS = (
    Target("300M", "snapshot s", 0.5, "ours/dill <= 0.5", on_ratio=True),
    Target("1G", "snapshot s", 0.5, "ours/dill <= 0.5", on_ratio=True),
    Target("300M", "restore s", 0.5, "ours/dill <= 0.5", on_ratio=True),
    Target("1G", "restore s", 0.5, "ours/dill <= 0.5", on_ratio=True),
    Target("1G", "frozen s", 0.6, "ours <= 0.6 s"),
    Target("tuples", "bytes on disk", 2.5, "ours/dill <= 2.5", on_ratio=True),
)
ROWS = ("snapshot s", "restore s", "frozen s", "bytes on disk")


def _row_values(runs: Runs, row: str) -> float:
    return {
        "snapshot s": median(runs.snapshot_s),
        "restore s": median(runs.restore_s),
        "frozen s": median(runs.extra.get("paused_seconds", [])),
        "bytes on disk": median(runs.bytes),
    }[row]


def _fmt(row: str, value: float) -> str:
    return f"{value / MIB:.1f} MiB" if row == "bytes on disk" else f"{value:.3f}"


def _phase_lines(
    title: str, phases: list[dict[str, float]], totals: list[float], criu: list[dict[str, float]]
) -> str:
    """Our ``title`` by step, medians over runs; "other" is what no step accounts for."""
    labels = list(dict.fromkeys(label for run in phases for label in run))
    top = [label for label in labels if label not in Phases.SUBSTEPS]
    rest = [
        total - sum(run.get(label, 0.0) for label in top)
        for run, total in zip(phases, totals, strict=True)
    ]
    parts = [f"{label} {median([run.get(label, 0.0) for run in phases]):.3f}" for label in top]
    parts.append(f"other (lock, Python, waits) {median(rest):.3f}")
    inner = [label for label in labels if label in Phases.SUBSTEPS]
    if inner:
        shown = ", ".join(f"{x} {median([run.get(x, 0.0) for run in phases]):.3f}" for x in inner)
        parts.append(f"of which {shown}")
    if criu:
        keys = [k for k in dict.fromkeys(key for run in criu for key in run) if k in _CRIU_SHOWN]
        shown = ", ".join(_criu_figure(k, median([run.get(k, 0.0) for run in criu])) for k in keys)
        parts.append(f"CRIU's own stats: {shown}")
    return textwrap.fill(
        "; ".join(parts),
        width=100,
        initial_indent=f"  our {title}, by step (median s): ",
        subsequent_indent="      ",
    )


_CRIU_SHOWN = ("frozen_time", "memdump_time", "memwrite_time", "pages_written",
               "forking_time", "restore_time", "pages_restored")  # fmt: skip


def _criu_figure(key: str, value: float) -> str:
    return f"{key} {value:.3f} s" if key.endswith("_time") else f"{key} {value:,.0f}"


def report_case(
    case: Case, ours: Runs, dill: Runs, repeat: int, applicable: list[Target]
) -> dict[str, Any]:
    """Print the table of one case; return its figures and verdicts as plain data."""
    print(f"\n{case.title} (median of {repeat} run{'s' if repeat > 1 else ''})")
    print(f"  {'':<16}{'ours':>14}{'dill':>14}{'ratio (ours/dill)':>20}   {'target':<20}verdict")
    verdicts: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    for row in ROWS:
        mine, theirs = _row_values(ours, row), _row_values(dill, row)
        ratio = mine / theirs if theirs else float("inf")
        ratios[row] = ratio
        target = next((t for t in applicable if t.row == row), None)
        verdict = ""
        if target is not None:
            passed = (ratio if target.on_ratio else mine) <= target.limit
            verdict = "PASS" if passed else "FAIL"
            value = ratio if target.on_ratio else mine
            verdicts.append(
                {"case": case.key, "row": row, "target": target.text, "value": value,
                 "pass": passed}
            )  # fmt: skip
        text = target.text if target else "-"
        print(
            f"  {row:<16}{_fmt(row, mine):>14}{_fmt(row, theirs):>14}{ratio:>20.2f}"
            f"   {text:<20}{verdict}"
        )
    ours_notes = (
        f"ours: memory images {median(ours.extra['memory_bytes']) / MIB:.1f} MiB + files "
        f"{median(ours.extra['file_bytes']) / MIB:.1f} MiB; the runtime took "
        f"{median(ours.extra['runtime_seconds']):.3f} s of the snapshot cell, the kernel "
        f"frozen {median(ours.extra['paused_seconds']):.3f} s; the background save took "
        f"{median(ours.extra['save_seconds']):.3f} s and ended "
        f"{median(ours.extra['saved_after_cell_s']):.3f} s after the cell; the restore "
        f"cell's reply came {median(ours.extra['restore_cell_s']):.3f} s after its execute"
    )
    dill_notes = (
        f"dill: restore is a fresh interpreter that imports numpy and runs load_module "
        f"({median(dill.extra['load_module_s']):.3f} s of it); snapshot and frozen are "
        "dump_module, which holds the interpreter throughout"
    )
    for notes in (ours_notes, dill_notes):
        print(textwrap.fill(notes, width=100, initial_indent="  ", subsequent_indent="      "))
    if ours.phases:
        for title, kind, totals in (
            ("snapshot cell", Phases.SNAPSHOT, ours.snapshot_s),
            ("background save", Phases.SAVE, ours.extra["saved_after_cell_s"]),
            ("restore and next cell", Phases.RESTORE, ours.restore_s),
        ):
            print(_phase_lines(title, ours.phases[kind], totals, ours.criu.get(kind, [])))
    return {
        "title": case.title,
        "size": case.size,
        "count": case.count,
        "ours": ours.to_dict(),
        "dill": dill.to_dict(),
        "ratio": ratios,
        "targets": verdicts,
    }


def targets_for(case: Case, sizes: dict[str, int]) -> list[Target]:
    """The targets that apply to ``case`` (a 1G target needs exactly 1G of state)."""
    if case.count is not None:
        return [t for t in TARGETS if t.key == "tuples" and case.count == TUPLES_TARGET_COUNT]
    return [t for t in TARGETS if t.key in sizes and sizes[t.key] == case.size]


# ---- main ----------------------------------------------------------------------------


async def measure_all(
    cases: list[Case], repeat: int, tmp: Path, memory: str, breakdown: bool
) -> dict[str, Any]:
    """Measure every case, ours then dill's, one kernel at a time; print the tables."""
    ksm = make_kernelspec(tmp, memory)
    cwd = tmp / "cwd"
    cwd.mkdir(mode=0o755)
    cwd.chmod(0o755)
    dill_dir = tmp / "dill"
    dill_dir.mkdir()
    target_sizes = {t.key: parse_size(t.key, "size") for t in TARGETS if t.key != "tuples"}
    phases = Phases()
    results: dict[str, Any] = {}
    with phases.installed(breakdown):
        for case in cases:
            print(f"{case.title}:", file=sys.stderr)
            ours, fingerprint = await measure_ours(case, ksm, cwd, repeat, phases)
            dill = await measure_dill(case, dill_dir, repeat, fingerprint)
            results[case.key] = (case, ours, dill)
    print(
        "\nSnapshot and restore of a kernel's state: ours (runc + CRIU, live) vs "
        "dill.dump_module / dill.load_module"
    )
    report: dict[str, Any] = {"repeat": repeat, "cases": {}, "targets": []}
    for key, (case, ours, dill) in results.items():
        data = report_case(case, ours, dill, repeat, targets_for(case, target_sizes))
        report["cases"][key] = data
        report["targets"] += data["targets"]
    measured = {(v["case"], v["row"]) for v in report["targets"]}
    missing = [f"{t.text} ({t.key})" for t in TARGETS if (t.key, t.row) not in measured]
    print("\nTargets:")
    for verdict in report["targets"]:
        value = verdict["value"]
        shown = f"{value:.2f}x" if "ours/dill" in verdict["target"] else f"{value:.3f} s"
        print(f"  {verdict['case']:<8}{verdict['row']:<16}{verdict['target']:<20}"
              f"{shown:>10}  {'PASS' if verdict['pass'] else 'FAIL'}")  # fmt: skip
    for text in missing:
        print(f"  not measured in this run: {text}")
    report["not_measured"] = missing
    report["pass"] = all(v["pass"] for v in report["targets"]) and not missing
    draw(results)
    return report


def draw(results: dict[str, tuple[Case, Runs, Runs]]) -> None:
    """Snapshot and restore time against the state's size, ours vs dill's:
    docs/img/snapshot.png."""
    sized = [(case.size / MIB, ours, dill) for case, ours, dill in results.values() if case.size]
    if len(sized) < 2:
        return
    against_size(
        IMG / "snapshot.png",
        "Snapshot and restore of a kernel's state (median s)",
        {
            "snapshot: execute to reply": {
                "ours (%container snapshot)": [(x, median(o.snapshot_s)) for x, o, _ in sized],
                "dill.dump_module": [(x, median(d.snapshot_s)) for x, _, d in sized],
                "ours, kernel frozen": [
                    (x, median(o.extra["paused_seconds"])) for x, o, _ in sized
                ],
            },
            "restore: until the next cell runs": {
                "ours (%container restore)": [(x, median(o.restore_s)) for x, o, _ in sized],
                "dill.load_module, fresh interpreter": [
                    (x, median(d.restore_s)) for x, _, d in sized
                ],
            },
        },
    )


async def cancel_on_sigterm(work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run ``work``; a SIGTERM cancels it, so its clean-up runs (as on Ctrl-C)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def parse_sizes(text: str) -> list[tuple[str, int]]:
    """``"10M,100M,1G"`` into labels and bytes."""
    sizes = []
    for part in text.split(","):
        label = part.strip()
        if label:
            sizes.append((label, parse_size(label, "state size")))
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Snapshot/restore time and bytes on disk: ours (CRIU) vs dill."
    )
    add = parser.add_argument
    add("--sizes", default="10M,100M,300M,1G",
        help="state sizes, comma-separated, with K, M or G "
             "(default: 10M,100M,300M,1G)")  # fmt: skip
    add("--tuples", type=int, default=TUPLES_TARGET_COUNT, metavar="N",
        help="entries of the dict-of-tuples case; 0 skips it (default: 1000000)")  # fmt: skip
    add("--repeat", type=int, default=3,
        help="snapshots and restores per case; the tables show medians (default: 3)")  # fmt: skip
    add("--memory", default="4G", help="the sandboxed kernel's memory limit (default: 4G)")
    add("--no-breakdown", action="store_true",
        help="do not time the runtime's steps (pause, CRIU dump, fsync, ...)")  # fmt: skip
    add("--json", metavar="PATH", type=Path, help="also write every figure as JSON to PATH")
    add("--strict", action="store_true",
        help="exit with status 1 unless every target is measured and met")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        memory = parse_size(args.memory)
    except (ValueError, SandboxError) as err:
        parser.error(str(err))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.tuples < 0:
        parser.error("--tuples must be 0 or more")
    if any(size > memory // 2 for _, size in sizes):
        parser.error(f"the largest size needs a --memory of at least twice it (now {args.memory})")
    if os.geteuid() != 0:
        parser.error("needs root (runc, CRIU, network namespaces, mounts)")
    try:
        importlib.import_module("dill")
    except ImportError:
        parser.error(f"dill is missing: {sys.executable} -m pip install dill")
    cases = [array_case(label, size) for label, size in sizes]
    if args.tuples:
        cases.append(tuples_case(args.tuples))
    tmp = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir="/tmp"))
    tmp.chmod(0o755)  # the kernel's unprivileged user must reach its working folder
    try:
        result = asyncio.run(
            cancel_on_sigterm(
                measure_all(cases, args.repeat, tmp, args.memory, not args.no_breakdown)
            )
        )
    except (BenchError, SandboxError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the kernel and its snapshots were removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
