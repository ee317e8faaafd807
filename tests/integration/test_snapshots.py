"""Snapshots of files and live memory, restored in place through the operator CLI.

The client is a stock jupyter_client client that stays connected across the restore;
after a restore the test waits for the kernel to answer before it runs the next cell.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_kernel.runtime import Runtime, cgroups, snapshots

from .conftest import OWNER, Kernels, fresh, run_cli, wait_until
from .probe import run_cell

pytestmark = pytest.mark.integration


async def snapshot(kernel_id: str, name: str, *extra: str) -> str:
    done = await run_cli("snapshot", kernel_id, name, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def restore(kc, kernel_id: str, name: str, env: dict[str, str] | None = None) -> str:
    done = await run_cli("restore", kernel_id, name, env=env)
    assert done.returncode == 0, done.stderr
    await kc.wait_for_ready(timeout=60)
    return done.stdout


async def test_live_state_survives(kernels: Kernels, make_spec, names) -> None:
    km, kc = await kernels.start(make_spec())
    (
        await run_cell(
            kc,
            "import numpy as np, threading, time\n"
            "arr = np.arange(1_000_000, dtype=np.float64)\n"
            "gen = (i * i for i in range(100)); next(gen); next(gen)\n"
            "fh = open('/etc/services'); fh.readline(); fh.readline(); pos = fh.tell()\n"
            "ticks = [0]\n"
            "def tick():\n"
            "    while True:\n"
            "        ticks[0] += 1; time.sleep(0.01)\n"
            "threading.Thread(target=tick, daemon=True).start()\n"
            "def make_adder(n):\n"
            "    return lambda x: x + n\n"
            "add5 = make_adder(5)\n"
            "class Point:\n"
            "    def __init__(self, x): self.x = x\n"
            "    def double(self): return Point(self.x * 2)\n"
            "p = Point(21)\n"
            "import sqlite3\n"
            "db = sqlite3.connect('notes.db')\n"
            "db.execute('create table t (n)'); db.execute('insert into t values (1)'); db.commit()",
        )
    ).check()
    name = fresh(names)
    out = await snapshot(km.kernel_id, name)
    assert "mode live" in out
    (
        await run_cell(
            kc,
            "arr[:] = -1; next(gen); fh.readline(); p = None; add5 = None\n"
            "db.execute('insert into t values (99)'); db.commit()",
        )
    ).check()
    await restore(kc, km.kernel_id, name)
    out = (
        await run_cell(
            kc,
            "print(float(arr.sum()))\n"
            "print(next(gen))\n"
            "print(fh.tell() == pos)\n"
            "before = ticks[0]; time.sleep(0.3); print(ticks[0] > before)\n"
            "print(add5(37), p.double().x)\n"
            "db.execute('insert into t values (2)'); db.commit()\n"
            "print(db.execute('select n from t').fetchall())",
        )
    ).check()
    assert out.splitlines() == [
        str(float(sum(range(1_000_000)))),
        "4",
        "True",
        "True",
        "42 42",
        "[(1,), (2,)]",
    ]


async def test_files_rewind(kernels: Kernels, make_spec, names) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "open('keep.txt', 'w').write('kept'); open('/tmp/gone', 'w')")).check()
    name = fresh(names)
    await snapshot(km.kernel_id, name)
    (await run_cell(kc, "import os; os.remove('keep.txt'); open('later.txt', 'w')")).check()
    await restore(kc, km.kernel_id, name)
    out = (
        await run_cell(kc, "import os; print(sorted(os.listdir('.')), os.path.exists('/tmp/gone'))")
    ).check()
    assert out.strip() == "['keep.txt'] True"


async def test_refused_restores_leave_the_kernel_alone(
    kernels: Kernels, make_spec, names, ksm, tmp_path: Path
) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "marker = 'untouched'")).check()
    name = fresh(names)
    await snapshot(km.kernel_id, name)
    (await run_cell(kc, "marker = 'after the snapshot'")).check()

    missing = await run_cli("restore", km.kernel_id, "no-such-snapshot")
    assert missing.returncode == 2
    assert "no snapshot named 'no-such-snapshot'" in missing.stderr

    image = next((snapshots.snapshot_dir(OWNER, name) / "criu").glob("pages-*.img"))
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    corrupt = await run_cli("restore", km.kernel_id, name)
    assert corrupt.returncode == 1
    assert "is damaged" in corrupt.stderr and "does not match its checksum" in corrupt.stderr

    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    other_dir.chmod(0o755)
    km2, _ = await kernels.start(make_spec(), cwd=other_dir)
    other = fresh(names)
    await snapshot(km2.kernel_id, other)
    foreign = await run_cli("restore", km.kernel_id, other)
    assert foreign.returncode == 2
    # Another folder's snapshot is not this kernel's to see: not found, and not named.
    assert f"no snapshot named {other!r}" in foreign.stderr
    assert other not in foreign.stderr.split("there are", 1)[1]

    out = (await run_cell(kc, "print(marker)")).check()
    assert out.strip() == "after the snapshot", "a refused restore changed the kernel"


async def test_files_only_when_criu_is_unavailable(kernels: Kernels, make_spec, names) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "x = 1; open('data.txt', 'w').write('v1')")).check()
    name = fresh(names)
    no_criu = {"SANDBOX_KERNEL_CRIU_PREFIX": "/nonexistent", "SANDBOX_KERNEL_CRIU": ""}
    done = await run_cli("snapshot", km.kernel_id, name, env=no_criu)
    assert done.returncode == 0, done.stderr
    assert "mode files" in done.stdout and "CRIU" in done.stdout
    (await run_cell(kc, "open('data.txt', 'w').write('v2')")).check()
    out = await restore(kc, km.kernel_id, name, env=no_criu)
    assert "(files)" in out
    cell = await run_cell(kc, "print(open('data.txt').read()); x")
    assert cell.stdout.strip() == "v1"
    assert cell.ename == "NameError", "a files-only restore kept the kernel's memory"


async def test_two_snapshots_at_once_are_serialized(kernels: Kernels, make_spec, names) -> None:
    km, kc = await kernels.start(make_spec())
    first, second = fresh(names), fresh(names)
    results = await asyncio.gather(
        run_cli("snapshot", km.kernel_id, first), run_cli("snapshot", km.kernel_id, second)
    )
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    listed = snapshots.names(OWNER)
    assert first in listed and second in listed
    metas = {m["name"]: m for m in snapshots.listing(OWNER)}
    assert {metas[first]["parent"], metas[second]["parent"]} & {first, second}, (
        "the second snapshot does not name the first as its parent"
    )
    assert (await run_cell(kc, "print('running')")).check().strip() == "running"
    assert os.path.exists(snapshots.snapshot_dir(OWNER, first) / "meta.json")


async def test_reset_gives_pristine_files_and_keeps_snapshots(
    kernels: Kernels, make_spec, names, workdir: Path
) -> None:
    (workdir / "handout.txt").write_text("from the teacher")
    km, kc = await kernels.start(make_spec())
    (
        await run_cell(
            kc,
            "import os; x = 1; os.remove('handout.txt')\n"
            "open('mine.txt', 'w'); open('/tmp/t', 'w')",
        )
    ).check()
    name = fresh(names)
    await snapshot(km.kernel_id, name)
    done = await run_cli("reset", km.kernel_id)
    assert done.returncode == 0, done.stderr
    await kc.wait_for_ready(timeout=60)
    cell = await run_cell(
        kc,
        "import os\n"
        "print(open('handout.txt').read(), sorted(os.listdir('.')), os.path.exists('/tmp/t'))\n"
        "x",
    )
    assert cell.stdout.strip() == "from the teacher ['handout.txt'] False"
    assert cell.ename == "NameError"
    assert name in snapshots.names(OWNER)
    assert await km.is_alive()


async def test_killing_the_runtime_mid_snapshot_lists_nothing_and_the_kernel_thaws(
    kernels: Kernels, make_spec, names
) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "import numpy as np; big = np.ones(200_000_000, dtype=np.uint8)")).check()
    name = fresh(names)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox_kernel.cli", "snapshot", km.kernel_id, name,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    group = f"sandbox-kernel/sk-{km.kernel_id}"
    await wait_until(lambda: cgroups.frozen(group), 30, "the snapshot to freeze the kernel", 0.005)
    proc.kill()
    await proc.wait()
    assert name not in snapshots.names(OWNER), "a partial snapshot is listed"
    # The provisioner's poll (the restarter calls it) thaws the orphaned freeze.
    assert await km.is_alive()
    assert not cgroups.frozen(group)
    assert (await run_cell(kc, "print(int(big[:10].sum()))")).check().strip() == "10"
    done = await run_cli("gc")
    assert done.returncode == 0, done.stderr
    assert not snapshots.leftovers()


async def test_a_client_can_run_a_cell_right_after_a_cli_restore(
    kernels: Kernels, make_spec, names
) -> None:
    """No waiting for kernel_info: the restored kernel holds the cell until the
    client's channels are back, so its output is not lost."""
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "x = 'snapshot'")).check()
    name = fresh(names)
    await snapshot(km.kernel_id, name)
    for i in range(10):
        (await run_cell(kc, f"x = {i}")).check()
        done = await run_cli("restore", km.kernel_id, name)
        assert done.returncode == 0, done.stderr
        out = (await run_cell(kc, "print(x)", timeout=30)).check()
        assert out.strip() == "snapshot", f"round {i}: {out!r}"


async def test_a_child_snapshot_shares_unchanged_memory_and_outlives_its_parent(
    kernels: Kernels, make_spec, names
) -> None:
    """Consecutive snapshots store only what changed; deleting the parent loses nothing."""
    km, kc = await kernels.start(make_spec(memory="1G"))
    await run_cell(
        kc,
        "import numpy as np\n"
        "big = np.random.default_rng(7).integers(0, 256, size=64 << 20, dtype=np.uint8)",
    )
    first, second = fresh(names), fresh(names)
    await snapshot(km.kernel_id, first)
    await run_cell(kc, "big[:1 << 20] = 0")
    await snapshot(km.kernel_id, second)
    meta = snapshots.load(OWNER, second)
    assert meta["parent"] == first
    # All but the changed MiB and the kernel's own churn is shared with the parent.
    assert meta["shared_bytes"] >= 60 << 20, meta
    snapshots.delete(OWNER, first)
    await run_cell(kc, "big[:] = 1")
    await restore(kc, km.kernel_id, second)
    out = await run_cell(
        kc,
        "print(int(big[:1 << 20].sum()), int(big.sum()) == int(np.random.default_rng(7)"
        ".integers(0, 256, size=64 << 20, dtype=np.uint8)[1 << 20:].sum()))",
    )
    assert out.stdout.strip() == "0 True"


async def test_a_lazy_restore_brings_every_page_back(kernels: Kernels, make_spec, names) -> None:
    """Big memory images are restored lazily (a page server, through userfaultfd)."""
    km, kc = await kernels.start(make_spec(memory="1G"))
    make = "np.random.default_rng(3).integers(0, 256, size=96 << 20, dtype=np.uint8)"
    (await run_cell(kc, f"import numpy as np; big = {make}; x = 'snap'")).check()
    name = fresh(names)
    await snapshot(km.kernel_id, name)
    (await run_cell(kc, "big[:] = 0; x = 'after'")).check()
    # Lazy from 1 MiB up, so this 96 MB kernel is restored lazily.
    await restore(kc, km.kernel_id, name, env={"SANDBOX_KERNEL_LAZY_RESTORE": "1M"})
    work = Runtime().kernel_dir(km.kernel_id) / "criu-work"
    assert "lazy" in (work / "restore.log").read_text()
    out = await run_cell(kc, f"print(x, bool((big == {make}).all()))")
    assert out.check().strip() == "snap True"
    # Deleting the snapshot waits for the page server; the kernel keeps every page.
    snapshots.delete(OWNER, name)
    out = await run_cell(kc, f"print(bool((big == {make}).all()))")
    assert out.check().strip() == "True"
    servers = await asyncio.to_thread(
        subprocess.run, ["pgrep", "-f", f"lazy-pages -D .*{name}"], capture_output=True
    )
    assert servers.returncode == 1, f"a page server is left: {servers.stdout!r}"
