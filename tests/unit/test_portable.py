"""The portable snapshot stream without a kernel: the host check, the reader's
limits, and the layer writer against what an attacker would put in a stream."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.errors import ConfigError
from sandbox_kernel.runtime.portable import (
    KEPT_XATTRS,
    MAGIC,
    ImportRefused,
    LayerWriter,
    Reader,
    check_rel,
    host_facts,
    misfit_host,
)
from sandbox_kernel.runtime.snapshots import check_user_name

HERE = {"arch": "x86_64", "kernel": "6.18.2-cloud", "cpu_flags": ["fpu", "sse2", "avx2"]}


def test_the_same_host_fits_and_old_snapshots_pass() -> None:
    assert misfit_host(host_facts()) == ""
    assert misfit_host(None, HERE) == ""
    assert misfit_host({**HERE, "kernel": "6.18.9", "cpu_flags": ["fpu"]}, HERE) == ""


def test_another_cpu_or_kernel_series_is_refused_with_why() -> None:
    why = misfit_host({**HERE, "arch": "aarch64"}, HERE)
    assert why == "it was taken on a aarch64 CPU and this machine's is x86_64"
    why = misfit_host({**HERE, "cpu_flags": ["fpu", "avx512f", "amx_tile"]}, HERE)
    assert "features this machine's lacks (amx_tile, avx512f)" in why
    why = misfit_host({**HERE, "kernel": "6.1.0-13-amd64"}, HERE)
    assert "Linux 6.1.0-13-amd64" in why and "machine with Linux 6.1" in why


def _stream(*records: tuple[dict[str, Any], bytes], magic: bytes = MAGIC) -> io.BytesIO:
    out = io.BytesIO()
    out.write(magic)
    for header, payload in records:
        head = json.dumps({**header, "size": len(payload)}).encode()
        out.write(struct.pack(">I", len(head)) + head + payload)
    out.seek(0)
    return out


def test_the_reader_refuses_what_is_not_a_stream() -> None:
    with pytest.raises(ImportRefused, match="not an exported snapshot"):
        Reader(io.BytesIO(b"PK\x03\x04 a zip file"), 1 << 20)
    huge = io.BytesIO(MAGIC + struct.pack(">I", 1 << 30))
    with pytest.raises(ImportRefused, match="header is 1G, past 1M"):
        Reader(huge, 1 << 20).next()
    truncated = _stream(({"kind": "image"}, b"x" * 100))
    data = truncated.getvalue()[:-10]
    short = Reader(io.BytesIO(data), 1 << 20)
    assert short.next()["kind"] == "image"
    with pytest.raises(ImportRefused, match="cut short"):
        short.payload()


def test_the_reader_stops_at_the_quota_before_reading_the_payload() -> None:
    reader = Reader(_stream(({"kind": "image"}, b"x" * 1000)), 999)
    with pytest.raises(ImportRefused, match="larger than your snapshot quota"):
        reader.next()
    with pytest.raises(ImportRefused, match="no size"):
        Reader(io.BytesIO(MAGIC + _head({"kind": "image", "size": -1})), 10).next()


def _head(header: dict[str, Any]) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head


@pytest.mark.parametrize(
    "rel",
    ["../x", "root/../../etc/passwd", "/root/x", "etc/passwd", "root//x", "root/./x",
     "cwd/a\x00b", "", 7, "root/" + "a" * 5000],
)  # fmt: skip
def test_paths_outside_the_layer_are_refused(rel: object) -> None:
    with pytest.raises(ImportRefused):
        check_rel(rel)


@pytest.fixture
def layer(tmp_path: Path) -> Any:
    top = tmp_path / "layer"
    for part in ("root", "cwd"):
        (top / part).mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield top, LayerWriter(fd, os.getuid(), os.getgid())
    finally:
        os.close(fd)


def _entry(path: str, kind: str, **more: Any) -> dict[str, Any]:
    return {"kind": "entry", "path": path, "type": kind, "mode": 0o644, "uid": 4321,
            "gid": 4321, "mtime_ns": 1_700_000_000 * 10**9, "xattrs": {}, **more}  # fmt: skip


def test_files_folders_and_symlinks_are_made_and_become_the_importers(layer: Any) -> None:
    top, writer = layer
    writer.write(_entry("root/home", "dir", mode=0o755), iter(()))
    writer.write(_entry("root/home/notes.txt", "file", mode=0o6755), iter([b"hello ", b"you"]))
    writer.write(_entry("cwd/link", "symlink", target="/etc/shadow"), iter(()))
    made = top / "root/home/notes.txt"
    assert made.read_bytes() == b"hello you"
    st = made.stat()
    assert st.st_mode & 0o7777 == 0o755, "setuid and setgid are dropped"
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), "not the stream's 4321"
    assert st.st_mtime_ns == 1_700_000_000 * 10**9
    assert os.readlink(top / "cwd/link") == "/etc/shadow"  # made, never followed


def test_a_path_through_a_symlink_is_refused_and_writes_nothing_outside(
    layer: Any, tmp_path: Path
) -> None:
    _, writer = layer
    outside = tmp_path / "outside"
    outside.mkdir()
    writer.write(_entry("root/escape", "symlink", target=str(outside)), iter(()))
    with pytest.raises(ImportRefused, match="goes through 'escape', which is not a folder"):
        writer.write(_entry("root/escape/planted", "file"), iter([b"x"]))
    assert list(outside.iterdir()) == []


def test_a_later_entry_replaces_one_and_delete_removes_a_tree_not_a_link_target(
    layer: Any, tmp_path: Path
) -> None:
    top, writer = layer
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("mine")
    writer.write(_entry("root/d", "dir", mode=0o755), iter(()))
    writer.write(_entry("root/d/link", "symlink", target=str(keep)), iter(()))
    writer.write(_entry("root/d/f", "file"), iter([b"1"]))
    writer.write(_entry("root/d/f", "file"), iter([b"22"]))  # replaced
    assert (top / "root/d/f").read_bytes() == b"22"
    writer.write({"kind": "entry", "type": "delete", "path": "root/d"}, iter(()))
    assert not (top / "root/d").exists()
    assert (keep / "precious").read_text() == "mine"


def test_a_changed_folder_of_the_parent_keeps_what_it_holds(layer: Any) -> None:
    """A child stream names a folder whose time changed (a file was added), not the
    unchanged files in it: those are the parent's, and stay. Found moving a kernel
    whose open file in /tmp was gone on the new node."""
    top, writer = layer
    writer.write(_entry("root/tmp", "dir", mode=0o1777, xattrs={"user.a": "01"}), iter(()))
    writer.write(_entry("root/tmp/held.txt", "file"), iter([b"abc"]))  # the parent's
    writer.write(_entry("root/tmp", "dir", mode=0o1777, mtime_ns=1_800_000_000 * 10**9),
                 iter(()))  # fmt: skip
    writer.write(_entry("root/tmp/new.txt", "file"), iter([b"2"]))
    assert (top / "root/tmp/held.txt").read_bytes() == b"abc"
    assert (top / "root/tmp/new.txt").read_bytes() == b"2"
    assert "user.a" not in os.listxattr(top / "root/tmp"), "gone from the entry: removed"
    writer.write(_entry("root/tmp", "file"), iter([b"now a file"]))  # replaced outright
    assert (top / "root/tmp").read_bytes() == b"now a file"


def test_unknown_kinds_and_bad_fields_are_refused(layer: Any) -> None:
    top, writer = layer
    writer.write(_entry("cwd", "dir", mode=0o750), iter(()))  # the upper's own folder
    assert (top / "cwd").stat().st_mode & 0o7777 == 0o750
    with pytest.raises(ImportRefused, match="must be a folder"):
        writer.write(_entry("root", "file"), iter([b"x"]))
    assert (top / "root").is_dir()
    with pytest.raises(ImportRefused, match="kind 'blockdev'"):
        writer.write(_entry("root/sda", "blockdev"), iter(()))
    with pytest.raises(ImportRefused, match="mode"):
        writer.write(_entry("root/x", "file", mode="0777"), iter(()))
    with pytest.raises(ImportRefused, match="no target"):
        writer.write(_entry("root/l", "symlink", target=""), iter(()))


def test_only_overlay_and_user_xattrs_are_kept() -> None:
    for key in ("trusted.overlay.opaque", "trusted.overlay.redirect", "user.note"):
        assert KEPT_XATTRS.match(key)
    for key in ("security.capability", "security.selinux", "trusted.other", "system.posix_acl"):
        assert not KEPT_XATTRS.match(key)


@pytest.mark.parametrize("name", ["ckpt-abc-3-0f0f", "pristine-base-1234"])
def test_a_user_cannot_take_a_name_the_runtime_keeps(name: str) -> None:
    with pytest.raises(ConfigError, match="keeps for its own; choose another"):
        check_user_name(name)
    assert check_user_name("checkpoint-3") == "checkpoint-3"
