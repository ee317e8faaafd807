"""Reading CRIU pagemaps and matching pages by address (dedupe.py's pure logic)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import pytest

from sandbox_kernel.runtime import dedupe
from sandbox_kernel.runtime.dedupe import PAGE, Run


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(**fields: int) -> bytes:
    numbers = {"pages_id": 1, "vaddr": 1, "compat": 2, "flags": 4, "nr_pages": 5}
    body = b"".join(_varint(numbers[k] << 3) + _varint(v) for k, v in fields.items())
    return struct.pack("<I", len(body)) + body


def _pagemap(path: Path, pages_id: int, *entries: dict[str, int]) -> Path:
    data = struct.pack("<II", 0x54564319, 0x56084025) + _message(pages_id=pages_id)
    path.write_bytes(data + b"".join(_message(**e) for e in entries))
    return path


def test_read_pagemap_counts_only_stored_runs(tmp_path: Path) -> None:
    path = _pagemap(
        tmp_path / "pagemap-1.img", 3,
        {"vaddr": 0x1000, "compat": 0, "flags": 4, "nr_pages": 2},
        {"vaddr": 0x8000, "compat": 0, "flags": 1, "nr_pages": 5},  # in the parent: not stored
        {"vaddr": 0x20000, "compat": 0, "flags": 6, "nr_pages": 1},  # lazy and present
        {"vaddr": 0x30000, "compat": 4},  # old CRIU: u32 count, no flags
    )  # fmt: skip
    pages_id, runs = dedupe.read_pagemap(path)
    assert pages_id == 3
    assert runs == [
        Run(0x1000, 2, 0),
        Run(0x20000, 1, 2 * PAGE),
        Run(0x30000, 4, 3 * PAGE),
    ]


def test_message_fields_reads_varints_and_nested_messages() -> None:
    inner = _varint(1 << 3) + _varint(300)  # field 1 = 300
    message = (
        _varint(2 << 3 | 0) + _varint(7)  # field 2, varint
        + _varint(3 << 3 | 2) + _varint(len(inner)) + inner  # field 3, length-delimited
        + _varint(4 << 3 | 1) + b"\0" * 8  # field 4, fixed64: skipped
        + _varint(5 << 3 | 5) + b"\0" * 4  # field 5, fixed32: skipped
        + _varint(6 << 3 | 0) + _varint(1 << 40)
    )  # fmt: skip
    fields = dedupe.message_fields(message)
    assert fields == {2: 7, 3: inner, 6: 1 << 40}
    assert dedupe.message_fields(inner) == {1: 300}
    assert dedupe.varint_fields(message) == {2: 7, 6: 1 << 40}


def test_message_fields_refuses_groups() -> None:
    with pytest.raises(ValueError, match="wire type 3"):
        dedupe.message_fields(_varint(1 << 3 | 3))


def test_read_pagemap_refuses_other_images(tmp_path: Path) -> None:
    path = tmp_path / "core-1.img"
    path.write_bytes(struct.pack("<II", 0x54564319, 0x55105940) + b"\0" * 8)
    with pytest.raises(ValueError, match="not a CRIU pagemap"):
        dedupe.read_pagemap(path)


def test_pairs_match_pages_by_address_across_moved_offsets() -> None:
    # The new dump gained a run in front, so every page sits later in its file.
    old = [Run(0x10000, 4, 0), Run(0x40000, 2, 4 * PAGE)]
    new = [Run(0x1000, 1, 0), Run(0x11000, 4, PAGE), Run(0x40000, 1, 5 * PAGE)]
    assert list(dedupe._pairs(new, old)) == [
        (PAGE, PAGE, 3 * PAGE),  # 0x11000-0x14000 in both
        (5 * PAGE, 4 * PAGE, PAGE),  # 0x40000
    ]


def test_equal_ranges_skip_changed_pages_and_merge_the_rest(tmp_path: Path) -> None:
    old_bytes = bytes(range(256)) * (16 * 300)  # 300 pages
    new_bytes = bytearray(old_bytes)
    new_bytes[5 * PAGE + 7] ^= 0xFF  # page 5 changed
    (tmp_path / "old").write_bytes(old_bytes)
    (tmp_path / "new").write_bytes(new_bytes)
    with (
        open(tmp_path / "old", "rb") as o,
        open(tmp_path / "new", "rb") as n,
        mmap.mmap(o.fileno(), 0, prot=mmap.PROT_READ) as old,
        mmap.mmap(n.fileno(), 0, prot=mmap.PROT_READ) as new,
    ):
        ranges = list(dedupe._equal_ranges(new, old, iter([(0, 0, 300 * PAGE)])))
    assert ranges == [(0, 0, 5 * PAGE), (6 * PAGE, 6 * PAGE, 294 * PAGE)]


def test_copy_sharing_copies_every_byte_and_checksums_what_it_read(tmp_path: Path) -> None:
    """Where the filesystem cannot reflink (tmp here), equal pages are written too:
    the copy is the same bytes either way, and so is its checksum."""
    import hashlib
    import os

    new, old, out = tmp_path / "new", tmp_path / "old", tmp_path / "out"
    new.mkdir(), old.mkdir()
    run = {"vaddr": 0x10000, "compat": 0, "flags": 4, "nr_pages": 3}
    _pagemap(new / "pagemap-7.img", 1, run)
    _pagemap(old / "pagemap-7.img", 1, run)
    parent_pages = b"a" * PAGE + b"b" * PAGE + b"c" * PAGE
    pages = b"a" * PAGE + b"X" * PAGE + b"c" * PAGE  # the middle page changed
    (old / "pages-1.img").write_bytes(parent_pages)
    (new / "pages-1.img").write_bytes(pages)
    (new / "sub").mkdir()
    (new / "sub" / "core-7.img").write_bytes(os.urandom(10_000))
    (new / "empty.img").write_bytes(b"")
    out.mkdir()
    sums, shared = dedupe.copy_sharing(new, out, old)
    for rel in ("pages-1.img", "pagemap-7.img", "sub/core-7.img", "empty.img"):
        data = (new / rel).read_bytes()
        assert (out / rel).read_bytes() == data
        assert sums[rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert shared in (0, 2 * PAGE)  # 2 pages where it reflinks (btrfs), else none


def test_copy_sharing_without_a_parent_and_refusing_to_overwrite(tmp_path: Path) -> None:
    new, out = tmp_path / "new", tmp_path / "out"
    new.mkdir(), out.mkdir()
    (new / "pages-1.img").write_bytes(b"z" * (3 * PAGE))
    assert dedupe.copy_sharing(new, out, None)[1] == 0
    assert (out / "pages-1.img").read_bytes() == b"z" * (3 * PAGE)
    with pytest.raises(FileExistsError):  # never writes through what is there
        dedupe.copy_sharing(new, out, None)
