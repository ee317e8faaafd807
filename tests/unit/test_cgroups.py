"""Reading usage and limits from cgroup v1 and v2 file layouts (fake trees)."""

from pathlib import Path

import pytest

from sandbox_kernel.runtime import cgroups

REL = "sandbox-kernel/sk-1"


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    write(tmp_path, {
        f"memory/{REL}/memory.usage_in_bytes": "104857600\n",
        f"memory/{REL}/memory.limit_in_bytes": "268435456\n",
        f"memory/{REL}/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        f"cpu/{REL}/cpu.cfs_quota_us": "150000\n",
        f"cpu/{REL}/cpu.cfs_period_us": "100000\n",
        f"cpuacct/{REL}/cpuacct.usage": "2500000000\n",
        f"pids/{REL}/pids.current": "7\n",
        f"pids/{REL}/pids.max": "max\n",
    })  # fmt: skip
    assert cgroups.version() == 1
    use = cgroups.usage(REL)
    assert use == cgroups.Usage(
        memory=100 << 20, memory_limit=256 << 20, cpu_seconds=2.5, cpu_limit=1.5,
        pids=7, pids_limit=None, oom_kills=2,
    )  # fmt: skip


def test_v1_unlimited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    write(tmp_path, {
        f"memory/{REL}/memory.limit_in_bytes": "9223372036854771712\n",
        f"cpu/{REL}/cpu.cfs_quota_us": "-1\n",
    })  # fmt: skip
    use = cgroups.usage(REL)
    assert use is not None
    assert (use.memory_limit, use.cpu_limit, use.oom_kills) == (None, None, 0)


def test_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    write(tmp_path, {
        "cgroup.controllers": "cpuset cpu io memory pids\n",
        f"{REL}/memory.current": "52428800\n",
        f"{REL}/memory.max": "max\n",
        f"{REL}/memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        f"{REL}/cpu.max": "50000 100000\n",
        f"{REL}/cpu.stat": "usage_usec 1500000\nuser_usec 1000000\n",
        f"{REL}/pids.current": "3\n",
        f"{REL}/pids.max": "64\n",
    })  # fmt: skip
    assert cgroups.version() == 2
    assert cgroups.usage(REL) == cgroups.Usage(
        memory=50 << 20, memory_limit=None, cpu_seconds=1.5, cpu_limit=0.5,
        pids=3, pids_limit=64, oom_kills=1,
    )  # fmt: skip


def test_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    assert cgroups.usage(REL) is None
