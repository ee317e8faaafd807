"""Reading a kernel container's cgroup: usage, limits and OOM kills, on v1 and v2.

runc creates the cgroups and changes limits (``runc update``), so this module only
reads. It reads the files directly rather than through ``runc events``: ``ps`` over
many kernels then costs no process per kernel, and the OOM count can still be read
after the kernel has died, before the container is deleted.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
#: v1 reports "no limit" as a huge number (a page-aligned LONG_MAX).
_V1_UNLIMITED = 1 << 62


def version() -> int:
    """2 on a unified hierarchy whose root offers the memory controller, else 1."""
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    return 1


def hierarchies() -> list[Path]:
    """The cgroup hierarchies mounted below ``/sys/fs/cgroup`` (v1 controllers, and the
    unified one of a hybrid set-up); none on a pure v2 machine."""
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            point = Path(fields[4])
            if fstype in ("cgroup", "cgroup2") and point.parent == ROOT:
                found.append(point)
    return sorted(found)


def swap_limit_supported() -> bool:
    """Whether memory+swap can be capped (v1 needs the kernel's swap accounting)."""
    if version() == 2:
        return (ROOT / "memory.swap.max").exists() or any(ROOT.glob("*/memory.swap.max"))
    return (ROOT / "memory" / "memory.memsw.limit_in_bytes").exists()


@dataclass(frozen=True)
class Usage:
    """What a kernel container uses, against its limits. None means unknown or unlimited.

    Units: bytes for memory, seconds of CPU time, cores for the CPU limit.
    """

    memory: int | None
    memory_limit: int | None
    cpu_seconds: float | None
    cpu_limit: float | None
    pids: int | None
    pids_limit: int | None
    oom_kills: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value)
    return None


def usage(rel: str) -> Usage | None:
    """Usage of the cgroup at ``rel`` (runc's cgroupsPath), or None if it is gone."""
    rel = rel.strip("/")
    if version() == 2:
        base = ROOT / rel
        if not base.is_dir():
            return None
        cpu_max = (_read(base / "cpu.max") or "max").split()
        usage_usec = _keyed(_read(base / "cpu.stat"), "usage_usec")
        return Usage(
            memory=_int(_read(base / "memory.current")),
            memory_limit=_int(_read(base / "memory.max")),
            cpu_seconds=None if usage_usec is None else usage_usec / 1e6,
            cpu_limit=None if cpu_max[0] == "max" else int(cpu_max[0]) / int(cpu_max[1]),
            pids=_int(_read(base / "pids.current")),
            pids_limit=_int(_read(base / "pids.max")),
            oom_kills=_keyed(_read(base / "memory.events"), "oom_kill") or 0,
        )
    mem = ROOT / "memory" / rel
    if not mem.is_dir():
        return None
    limit = _int(_read(mem / "memory.limit_in_bytes"))
    quota = _int(_read(ROOT / "cpu" / rel / "cpu.cfs_quota_us"))
    period = _int(_read(ROOT / "cpu" / rel / "cpu.cfs_period_us")) or 100_000
    cpu_ns = _int(_read(ROOT / "cpuacct" / rel / "cpuacct.usage"))
    return Usage(
        memory=_int(_read(mem / "memory.usage_in_bytes")),
        memory_limit=None if limit is None or limit >= _V1_UNLIMITED else limit,
        cpu_seconds=None if cpu_ns is None else cpu_ns / 1e9,
        cpu_limit=None if quota is None or quota < 0 else quota / period,
        pids=_int(_read(ROOT / "pids" / rel / "pids.current")),
        pids_limit=_int(_read(ROOT / "pids" / rel / "pids.max")),
        oom_kills=_keyed(_read(mem / "memory.oom_control"), "oom_kill") or 0,
    )


def frozen(rel: str) -> bool:
    """Whether the cgroup at ``rel`` is frozen (runc pause, or a snapshot in progress)."""
    rel = rel.strip("/")
    if version() == 2:
        return _read(ROOT / rel / "cgroup.freeze") == "1"
    return _read(ROOT / "freezer" / rel / "freezer.state") in ("FROZEN", "FREEZING")


def leftover_cgroups(parent: str) -> list[Path]:
    """Every cgroup folder below ``parent`` in any hierarchy: what ``gc`` inspects."""
    roots = [ROOT] if version() == 2 else [p for p in ROOT.iterdir() if p.is_dir()]
    found: list[Path] = []
    for root in roots:
        base = root / parent
        if base.is_dir():
            found.extend(p for p in base.iterdir() if p.is_dir())
    return found


def remove_cgroup(path: Path, timeout: float = 5.0) -> None:
    """Remove a cgroup folder, killing the processes left in it first.

    Only ``gc`` calls this, for cgroups no kernel claims: what runs there is what a
    crash left behind.

    Raises:
        OSError: the cgroup still has processes after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(p) for p in (_read(path / "cgroup.procs") or "").split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
        # The killed processes take a moment to leave the cgroup.
        select.select([], [], [], 0.02)
