"""Portable snapshots: ``sandbox-kernel snapshot export`` and ``import`` with real
kernels, real CRIU images and the real store; a child exported against its parent;
streams tampered with; a snapshot from a host this one is not."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.runtime import snapshots
from sandbox_kernel.runtime.portable import MAGIC

from .conftest import OWNER, Kernels, fresh, run_cli
from .probe import run_cell

pytestmark = pytest.mark.integration

STATE = (
    "import threading, itertools\n"
    "gen = itertools.count(10); next(gen)\n"
    "fh = open('/etc/services'); fh.readline(); pos = fh.tell()\n"
    "stop = threading.Event(); worker = threading.Thread(target=stop.wait, daemon=True)\n"
    "worker.start()\n"
    "import numpy as np; arr = np.arange(5_000_000)\n"
    "open('/tmp/scratch.txt', 'w').write('in the layer')\n"
)
CHECK = (
    "print(next(gen), fh.tell() == pos, worker.is_alive(), int(arr[-1]), "
    "open('/tmp/scratch.txt').read())"
)
AS_TAKEN = "11 True True 4999999 in the layer"


def records(path: Path) -> list[tuple[dict[str, Any], bytes]]:
    """The records of an exported file."""
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    at, found = len(MAGIC), []
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        header = json.loads(data[at + 4 : at + 4 + length])
        start = at + 4 + length
        found.append((header, data[start : start + header["size"]]))
        at = start + header["size"]
    return found


def write_records(path: Path, found: list[tuple[dict[str, Any], bytes]]) -> None:
    out = io.BytesIO()
    out.write(MAGIC)
    for header, payload in found:
        head = json.dumps({**header, "size": len(payload)}).encode()
        out.write(struct.pack(">I", len(head)) + head + payload)
    path.write_bytes(out.getvalue())


def tree(top: Path) -> dict[str, tuple[Any, ...]]:
    """Each entry below ``top`` (the work folders aside): what a copy must keep."""
    found: dict[str, tuple[Any, ...]] = {}
    for path in sorted(top.rglob("*")):
        rel = path.relative_to(top).as_posix()
        if rel.split("/")[0].endswith(".work"):
            continue
        st = path.lstat()
        xattrs = sorted(os.listxattr(path, follow_symlinks=False)) if not path.is_symlink() else []
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
        mtime = st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0
        found[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                      size, mtime, tuple(xattrs))  # fmt: skip
    return found


async def export(name: str, path: Path, *extra: str) -> str:
    done = await run_cli("snapshot", "export", name, str(path), "--owner", OWNER, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def import_(path: Path, *extra: str) -> Any:
    return await run_cli("snapshot", "import", str(path), "--owner", OWNER, *extra)


async def test_an_exported_snapshot_imports_and_restores_memory_and_files(
    kernels: Kernels, make_spec, names: list[str], tmp_path: Path
) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, STATE)).check()
    name = fresh(names)
    done = await run_cli("snapshot", km.kernel_id, name)
    assert done.returncode == 0, done.stderr
    exported = tmp_path / "snap.sks"
    said = await export(name, exported)
    assert f"Exported snapshot {name} to {exported}" in said
    st = exported.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600, "another user's memory: its maker's alone"
    # Exporting again to the same file is refused, and the file is not touched.
    again = await run_cli("snapshot", "export", name, str(exported), "--owner", OWNER)
    assert again.returncode == 2 and "exists; choose another name" in again.stderr
    assert exported.stat().st_mtime_ns == st.st_mtime_ns
    # As on another machine: the snapshot is gone here, then comes back from the file.
    before = snapshots.load(OWNER, name)
    kept = fresh(names)
    snapshots.copy(OWNER, name, kept)
    snapshots.delete(OWNER, name)
    done = await import_(exported)
    assert done.returncode == 0, done.stderr
    assert f"Imported snapshot {name} for user {OWNER}: mode live" in done.stdout
    meta = snapshots.verify(OWNER, name)
    assert meta["layers"] == before["layers"] and meta["cwd"] == before["cwd"]
    assert meta["memory_bytes"] == before["memory_bytes"]
    # The layer is as it was: every entry's kind, mode, owner, size, time and xattrs.
    assert tree(snapshots.snapshot_dir(OWNER, name) / "files") == tree(
        snapshots.snapshot_dir(OWNER, kept) / "files"
    )
    # An import that would pass the snapshot quota is refused before it is read.
    used = snapshots.usage(OWNER)["bytes"]
    tight = {"SANDBOX_KERNEL_SNAPSHOT_QUOTA": str(used + (8 << 20))}
    done = await run_cli("snapshot", "import", str(exported), "--owner", OWNER, "--name",
                         fresh(names), env=tight)  # fmt: skip
    assert done.returncode == 2 and "larger than your snapshot quota" in done.stderr, done
    assert not snapshots.leftovers()
    (await run_cell(kc, "next(gen); next(gen); import os; os.remove('/tmp/scratch.txt')")).check()
    done = await run_cli("restore", km.kernel_id, name)
    assert done.returncode == 0, done.stderr
    await kc.wait_for_ready(timeout=60)
    assert (await run_cell(kc, CHECK)).check().strip() == AS_TAKEN


async def test_a_child_exported_against_its_parent_sends_only_what_changed(
    kernels: Kernels, make_spec, names: list[str], tmp_path: Path
) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, STATE)).check()
    parent, child = fresh(names), fresh(names)
    assert (await run_cli("snapshot", km.kernel_id, parent)).returncode == 0
    (await run_cell(kc, "small = list(range(1000)); open('/tmp/new.txt', 'w').write('2')")).check()
    assert (await run_cli("snapshot", km.kernel_id, child)).returncode == 0
    whole, part = tmp_path / "child-whole.sks", tmp_path / "child.sks"
    await export(child, whole)
    said = await export(child, part, "--since", parent)
    assert "of memory left to the parent" in said
    assert part.stat().st_size < whole.stat().st_size / 4, (part.stat(), whole.stat())
    kinds = {h["kind"] for h, _ in records(part)}
    assert "pages" in kinds
    entries = [h["path"] for h, _ in records(part) if h["kind"] == "entry"]
    assert "root/tmp/new.txt" in entries and "root/tmp/scratch.txt" not in entries
    # Without its parent, the child is refused, and nothing is kept.
    snapshots.delete(OWNER, child)
    renamed = fresh(names)
    done = await import_(part, "--name", renamed)
    assert done.returncode == 0, done.stderr  # the parent is here
    meta = snapshots.verify(OWNER, renamed)
    assert meta["parent"] == parent and meta["shared_bytes"] > 0
    snapshots.delete(OWNER, renamed)
    snapshots.delete(OWNER, parent)
    done = await import_(part, "--name", renamed)
    assert done.returncode == 2
    assert f"against its parent {parent!r}, which you do not have" in done.stderr
    assert renamed not in snapshots.names(OWNER, every=True) and not snapshots.leftovers()
    done = await run_cli("restore", km.kernel_id, renamed)
    assert done.returncode != 0


async def small_export(kernels: Kernels, make_spec, names: list[str], tmp_path: Path) -> Any:
    """A kernel with ``x = 'taken'``, its snapshot, exported: (km, kc, the file)."""
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "x = 'taken'")).check()
    name = fresh(names)
    assert (await run_cli("snapshot", km.kernel_id, name)).returncode == 0
    exported = tmp_path / "snap.sks"
    await export(name, exported)
    return km, kc, exported


async def test_a_tampered_stream_is_refused_and_leaves_nothing(
    kernels: Kernels, make_spec, names: list[str], tmp_path: Path
) -> None:
    _, _, exported = await small_export(kernels, make_spec, names, tmp_path)
    found = records(exported)
    cases: dict[str, tuple[list[tuple[dict[str, Any], bytes]], str]] = {}
    image = next(i for i, (h, p) in enumerate(found) if h["kind"] == "image" and len(p) > 100)
    flipped = list(found)
    header, payload = flipped[image]
    flipped[image] = (header, payload[:50] + bytes([payload[50] ^ 1]) + payload[51:])
    cases["flipped"] = (flipped, "does not match its checksum")
    escape = [*found[:-1], ({"kind": "entry", "type": "file", "path": "root/../../../etc/x",
                             "mode": 0o644, "uid": 0, "gid": 0}, b"x"), found[-1]]  # fmt: skip
    cases["escape"] = (escape, "is not below root/ or cwd/")
    through = [*found[:-1],
               ({"kind": "entry", "type": "symlink", "path": "root/out", "target": "/etc",
                 "uid": 0, "gid": 0}, b""),
               ({"kind": "entry", "type": "file", "path": "root/out/planted", "mode": 0o644,
                 "uid": 0, "gid": 0}, b"x"),
               found[-1]]  # fmt: skip
    cases["through a symlink"] = (through, "goes through 'out', which is not a folder")
    cases["cut"] = (found[:-1], "ends early")
    cases["image name"] = (
        [found[0], ({"kind": "image", "path": "../../etc/passwd"}, b"x"), *found[1:]],
        "is not a CRIU image's",
    )
    for case, (changed, why) in cases.items():
        bad = tmp_path / f"{case}.sks"
        write_records(bad, changed)
        renamed = fresh(names)
        done = await import_(bad, "--name", renamed)
        assert done.returncode == 2, (case, done.stdout)
        assert why in done.stderr, (case, done.stderr)
        assert renamed not in snapshots.names(OWNER, every=True), case
        assert not snapshots.leftovers(), case
    assert not Path("/etc/planted").exists() and not Path("/etc/x").exists()


async def test_a_snapshot_from_another_cpu_is_refused_at_restore_with_why(
    kernels: Kernels, make_spec, names: list[str], tmp_path: Path
) -> None:
    km, kc, exported = await small_export(kernels, make_spec, names, tmp_path)
    found = records(exported)
    head, payload = found[0]
    host = {**head["host"], "cpu_flags": [*head["host"]["cpu_flags"], "amx_fp8"]}
    write_records(exported, [({**head, "host": host}, payload), *found[1:]])
    other = fresh(names)
    done = await import_(exported, "--name", other)
    assert done.returncode == 0, done.stderr
    assert "cannot be restored on this machine" in done.stderr and "amx_fp8" in done.stderr
    done = await run_cli("restore", km.kernel_id, other)
    assert done.returncode == 2
    assert f"snapshot {other!r} cannot be restored on this machine" in done.stderr
    assert "features this machine's lacks (amx_fp8)" in done.stderr
    assert (await run_cell(kc, "print(x)")).check().strip() == "taken"  # untouched


async def test_an_import_names_its_file_and_the_fix(tmp_path: Path) -> None:
    done = await import_(tmp_path / "missing.sks")
    assert done.returncode == 2 and "cannot be read by you (No such file" in done.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = await import_(fifo)
    assert done.returncode == 2 and "is not a regular file" in done.stderr
    zipped = tmp_path / "notes.zip"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    done = await import_(zipped)
    assert done.returncode == 2
    assert "not an exported snapshot (made by `sandbox-kernel snapshot export`)" in done.stderr
