"""Pristine bases: every start of a kernelspec without a base restores an idle kernel
of the same configuration, snapshotted before any cell (see ``runtime/pristine.py``).

Each test uses limits of its own, so it makes its own pristine base at its first
start, through jupyter_client, as a notebook server would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sandbox_kernel.runtime import Runtime, bases
from sandbox_kernel.runtime.record import Start

from .conftest import Kernels
from .probe import run_cell

pytestmark = pytest.mark.integration

PROBE = (
    "import os, socket, sys, helper\n"
    "ip = get_ipython()\n"
    "print(os.getcwd(), helper.WHERE, os.environ['PWD'], _dh[-1])\n"
    "before = ip.history_manager.get_tail(50, include_latest=False)\n"
    "print(socket.gethostname(), len(list(before)))\n"
    "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip(),\n"
    "      open('/sys/fs/cgroup/pids/pids.max').read().strip())"
)


async def test_kernels_start_from_the_pristine_base_as_new_kernels(
    kernels: Kernels, make_spec, workdir: Path, tmp_path: Path
) -> None:
    spec = make_spec(memory="700M", pids="300")
    other = tmp_path / "other"
    other.mkdir(mode=0o755)
    (other / "helper.py").write_text("WHERE = 'other'\n")
    (workdir / "helper.py").write_text("WHERE = 'notebooks'\n")
    km1, kc1 = await kernels.start(spec)  # the first start makes the base
    km2, kc2 = await kernels.start(spec, cwd=other)
    runtime = Runtime()
    records = [runtime.record(km.kernel_id) for km in (km1, km2)]
    for record in records:
        assert record.start is Start.BASE, record.base_note
        assert record.pristine_cwd and record.pristine_cwd != record.cwd_inside
    assert records[0].base == records[1].base
    meta = bases.load(str(records[0].base))
    assert meta["pristine"]["key"]
    assert meta["id"] not in {b["id"] for b in bases.listing()}, "listed as a user's base"
    for kc, record, folder, where in (
        (kc1, records[0], workdir, "notebooks"), (kc2, records[1], other, "other"),
    ):  # fmt: skip
        cell = await run_cell(kc, PROBE)
        assert cell.count == 1, cell  # a new kernel's first cell
        lines = cell.check().splitlines()
        # Its own folder, at its own path, with what is in it; its own name; no
        # history from the template; the kernelspec's limits.
        assert lines[0] == f"{folder} {where} {folder} {folder}", cell
        assert lines[1] == f"{record.hostname} 0", cell
        assert lines[2] == f"{700 << 20} 300", cell
        assert km1.session.key != km2.session.key
    # Two kernels from one base share nothing writable.
    write = (
        "for p in ('/tmp/mark', os.path.expanduser('~/mark'), 'mark'):\n    open(p, 'w').write('1')"
    )
    (await run_cell(kc1, write)).check()
    seen = await run_cell(
        kc2,
        "print([os.path.exists(p) for p in ('/tmp/mark', os.path.expanduser('~/mark'), 'mark')])",
    )
    assert seen.check().strip() == "[False, False, False]"
    assert not (workdir / "mark").exists()  # the folder's writes stay in the kernel's layer
    # A restart restores the base too, keeping the kernel's files.
    await km1.restart_kernel(now=True)
    await kc1.wait_for_ready(timeout=60)
    assert runtime.record(km1.kernel_id).start is Start.BASE
    after = await run_cell(
        kc1, "import os\nprint(os.getcwd(), open('mark').read(), open('/tmp/mark').read())"
    )
    assert after.check().strip() == f"{workdir} 1 1"
    assert after.count == 1
    # A reset goes back to the pristine base's files and memory, in the kernel's
    # own folder still.
    (await run_cell(kc2, "open('gone.txt', 'w').write('x')")).check()
    reset = await run_cell(kc2, "%container reset", timeout=120)
    assert "a fresh kernel on the image's pristine files" in reset.check(), reset
    back = await run_cell(
        kc2, "import os\nprint(os.getcwd(), os.environ['PWD'], _dh[-1], os.path.exists('gone.txt'))"
    )
    assert back.check().strip() == f"{other} {other} {other} False", back


def _wheel(folder: Path) -> Path:
    """A tiny wheel, made here (no index is reachable)."""
    wheel = folder / "sandbox_tinypkg-0.1-py3-none-any.whl"
    info = "sandbox_tinypkg-0.1.dist-info"
    files = {
        "sandbox_tinypkg/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: sandbox-tinypkg\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


async def test_the_base_is_made_again_after_a_pip_install(
    kernels: Kernels, make_spec, tmp_path: Path
) -> None:
    spec = make_spec(memory="650M")
    runtime = Runtime()
    km1, _ = await kernels.start(spec)
    first = runtime.record(km1.kernel_id).base
    assert first is not None
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    install = [*pip, "install", "--no-index", "--no-deps", str(_wheel(tmp_path))]
    await asyncio.to_thread(subprocess.run, install, check=True, timeout=120)
    try:
        km2, kc2 = await kernels.start(spec)
        record = runtime.record(km2.kernel_id)
        assert record.start is Start.BASE, record.base_note
        assert record.base not in (None, first)
        cell = await run_cell(kc2, "import sandbox_tinypkg\nprint(sandbox_tinypkg.VALUE)")
        assert cell.check().strip() == "42"
        # The old base serves the kernel that runs on it; once that is gone, gc
        # removes it (it is stale), and keeps the current one.
        await km1.shutdown_kernel(now=True)
        removed = await runtime.gc()
        assert f"pristine base {first} (its Python environment or image changed)" in removed
        left = {b["id"] for b in bases.listing(pristine=True)}
        assert first not in left and record.base in left
    finally:
        uninstall = [*pip, "uninstall", "-y", "sandbox-tinypkg"]
        await asyncio.to_thread(subprocess.run, uninstall, check=True, timeout=120)


async def test_a_kernel_of_an_earlier_version_keeps_its_files_at_a_restart(
    kernels: Kernels, make_spec
) -> None:
    """A kernel started before pristine bases existed (its record does not say) is
    never given one at a restart: that would replace the files it wrote."""
    km, kc = await kernels.start(make_spec(memory="600M", pristine_base=False))
    (await run_cell(kc, "open('mine.txt', 'w').write('kept')")).check()
    runtime = Runtime()

    def as_an_earlier_version_wrote_it(record):  # type: ignore[no-untyped-def]
        record.extra.pop("pristine", None)
        return record

    runtime.store.update(km.kernel_id, as_an_earlier_version_wrote_it)
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    record = runtime.record(km.kernel_id)
    assert record.base is None and record.start is Start.IMAGE
    assert (await run_cell(kc, "print(open('mine.txt').read())")).check().strip() == "kept"
