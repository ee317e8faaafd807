"""Sharing a snapshot's unchanged memory pages with its parent snapshot.

CRIU writes every page of the kernel at every dump: this machine's kernel has no
soft-dirty tracking (``criu check --feature mem_dirty_track`` fails), so CRIU's own
incremental dumps are out. Instead, after a dump, each page of the new images is
compared with the page the parent snapshot holds at the same virtual address, and
runs of equal pages are handed to the kernel's ``FIDEDUPERANGE``: btrfs checks that
the bytes are equal once more, under its own locks, and then makes the new file
share the parent's blocks. The files stay byte for byte what CRIU wrote, so CRIU
restores them as usual, checksums hold, and either snapshot can be deleted alone.

Where a page sits in ``pages-<id>.img`` comes from ``pagemap-<pid>.img``: a CRIU
image (two magic numbers, then length-prefixed protobuf messages) whose first
message names the pages file and whose others are runs of ``nr_pages`` pages at
``vaddr``; runs flagged present are stored in the pages file, in order.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ioctl import FICLONERANGE, FIDEDUPERANGE

PAGE = 4096
#: How much is compared at once before looking page by page (equal blocks are common).
_BLOCK = 256 * PAGE
#: How much is hashed and written at once when images are copied.
_CHUNK = 8 << 20
#: btrfs dedupes at most 16 MiB per call.
_MAX_CALL = 16 << 20
_PE_PRESENT = 1 << 2
_IMG_MAGIC = 0x54564319
_PAGEMAP_MAGIC = 0x56084025
_SAME = 0


@dataclass(frozen=True)
class Run:
    """``pages`` pages at virtual address ``vaddr``, stored at ``offset`` of the pages file."""

    vaddr: int
    pages: int
    offset: int


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The protobuf varint at ``pos`` of ``data``, and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def message_fields(message: bytes) -> dict[int, int | bytes]:
    """The fields of protobuf ``message`` by number: varints as ints, length-delimited
    fields (strings, bytes, nested messages) as bytes; fixed-width ones are skipped.
    A repeated field keeps its last value.

    Used by :func:`read_pagemap`, and by ``bench/snapshot.py`` for CRIU's stats images.

    Raises:
        ValueError: a wire type other than 0, 1, 2 or 5 (not a message CRIU writes).
        IndexError: the message ends inside a varint.
    """
    found: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(message):
        key, pos = read_varint(message, pos)
        kind = key & 7
        if kind == 0:
            found[key >> 3], pos = read_varint(message, pos)
        elif kind == 2:
            length, pos = read_varint(message, pos)
            found[key >> 3] = message[pos : pos + length]
            pos += length
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {kind}")
    return found


def varint_fields(message: bytes) -> dict[int, int]:
    """The varint fields of protobuf ``message`` (the only kind pagemaps hold): the
    ints of :func:`message_fields`."""
    return {n: v for n, v in message_fields(message).items() if isinstance(v, int)}


def read_pagemap(path: Path) -> tuple[int, list[Run]]:
    """The pages file id and the stored runs of CRIU pagemap image ``path``.

    Raises:
        ValueError: ``path`` is not a pagemap image.
    """
    data = path.read_bytes()
    if len(data) < 8 or struct.unpack_from("<II", data) != (_IMG_MAGIC, _PAGEMAP_MAGIC):
        raise ValueError(f"{path} is not a CRIU pagemap image")
    pos, pages_id, runs, offset = 8, None, [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        fields = varint_fields(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
        if pages_id is None:
            pages_id = fields.get(1, 0)
            continue
        # nr_pages is field 5 (u64); older CRIU wrote only field 2 (u32).
        count = fields.get(5, fields.get(2, 0))
        if fields.get(4, _PE_PRESENT) & _PE_PRESENT:
            runs.append(Run(fields[1], count, offset))
            offset += count * PAGE
    if pages_id is None:
        raise ValueError(f"{path} has no pagemap head")
    return pages_id, runs


def same_address_ranges(new: list[Run], old: list[Run]) -> Iterator[tuple[int, int, int]]:
    """(new offset, old offset, bytes) for every range both pages images hold at the
    same virtual address, in the order of ``new``'s runs; ``old`` sorted by address."""
    return _pairs(new, old)


def _pairs(new: list[Run], old: list[Run]) -> Iterator[tuple[int, int, int]]:
    """(new offset, old offset, bytes) for every range both hold at the same address."""
    starts = [run.vaddr for run in old]
    for run in new:
        end = run.vaddr + run.pages * PAGE
        i = max(bisect.bisect_right(starts, run.vaddr) - 1, 0)
        while i < len(old) and old[i].vaddr < end:
            other = old[i]
            lo = max(run.vaddr, other.vaddr)
            hi = min(end, other.vaddr + other.pages * PAGE)
            if lo < hi:
                yield run.offset + lo - run.vaddr, other.offset + lo - other.vaddr, hi - lo
            i += 1


def _equal_ranges(
    new: mmap.mmap, old: mmap.mmap, pairs: Iterator[tuple[int, int, int]]
) -> Iterator[tuple[int, int, int]]:
    """The parts of ``pairs`` whose bytes are equal, merged where they continue."""
    pending: list[int] | None = None  # [new offset, old offset, length]
    for dst, src, length in pairs:
        done = 0
        while done < length:
            step = min(_BLOCK, length - done)
            a, b = dst + done, src + done
            if new[a : a + step] == old[b : b + step]:
                pieces = [(a, b, step)]
            else:
                pieces = [
                    (a + k, b + k, PAGE)
                    for k in range(0, step, PAGE)
                    if new[a + k : a + k + PAGE] == old[b + k : b + k + PAGE]
                ]
            for a2, b2, n in pieces:
                if pending and pending[0] + pending[2] == a2 and pending[1] + pending[2] == b2:
                    pending[2] += n
                else:
                    if pending:
                        yield pending[0], pending[1], pending[2]
                    pending = [a2, b2, n]
            done += step
    if pending:
        yield pending[0], pending[1], pending[2]


def _dedupe(src_fd: int, src: int, dst_fd: int, dst: int, length: int) -> int:
    """Make ``length`` bytes of the destination share the source's; return bytes shared."""
    shared = 0
    while shared < length:
        step = min(_MAX_CALL, length - shared)
        args = bytearray(
            struct.pack("=QQHHI", src + shared, step, 1, 0, 0)
            + struct.pack("=qQQiI", dst_fd, dst + shared, 0, 0, 0)
        )
        fcntl.ioctl(src_fd, FIDEDUPERANGE, args)
        _fd, _off, done, status, _r = struct.unpack_from("=qQQiI", args, 24)
        if status != _SAME or done == 0:
            break  # changed since it was compared, or not sharable: keep our copy
        shared += done
    return shared


def _rewrite_gaps(fd: int, shared: list[tuple[int, int]], size: int) -> None:
    """Write the unshared parts of a file again, in place and unchanged.

    btrfs frees an extent only when nothing refers to any part of it; the pages
    that changed would otherwise keep CRIU's whole (up to 128 MiB) extent alive.
    Written again, they get extents of their own and the old one is freed.
    """
    pos = 0
    for start, length in [*sorted(shared), (size, 0)]:
        while pos < start:
            chunk = os.pread(fd, min(1 << 20, start - pos), pos)
            if not chunk:
                return
            os.pwrite(fd, chunk, pos)
            pos += len(chunk)
        pos = max(pos, start + length)


def share_with_parent(images: Path, parent: Path) -> int:
    """Make CRIU images ``images`` share every unchanged page with ``parent``'s images.

    Pages are matched by process and virtual address. Returns the bytes now shared.
    Anything that cannot be matched or shared simply stays a copy.
    """
    shared = 0
    for name, (old_path, new_runs, old_runs) in _pages_files(images, parent).items():
        new_path = images / name
        try:
            new_fd = os.open(new_path, os.O_RDWR)
        except OSError:
            continue
        try:
            old_fd = os.open(old_path, os.O_RDONLY)
        except OSError:
            os.close(new_fd)
            continue
        try:
            if not os.fstat(new_fd).st_size or not os.fstat(old_fd).st_size:
                continue
            with (
                mmap.mmap(new_fd, 0, prot=mmap.PROT_READ) as new,
                mmap.mmap(old_fd, 0, prot=mmap.PROT_READ) as old,
            ):
                pairs = _pairs(new_runs, old_runs)
                ranges = list(_equal_ranges(new, old, pairs))
            done: list[tuple[int, int]] = []
            for dst, src, length in ranges:
                try:
                    count = _dedupe(old_fd, src, new_fd, dst, length)
                except OSError:
                    break  # the filesystem cannot dedupe: leave the copies
                if count:
                    done.append((dst, count))
                    shared += count
            if done:
                _rewrite_gaps(new_fd, done, os.fstat(new_fd).st_size)
        finally:
            os.close(new_fd)
            os.close(old_fd)
    return shared


def clone_range(src_fd: int, src: int, dst_fd: int, dst: int, length: int) -> bool:
    """Share ``length`` bytes at ``src`` of one file as bytes at ``dst`` of another
    (a reflink); False where the filesystem cannot (the caller copies instead)."""
    return _clone(src_fd, src, dst_fd, dst, length)


def _clone(src_fd: int, src: int, dst_fd: int, dst: int, length: int) -> bool:
    """Make ``length`` bytes at ``dst`` of the destination the source's blocks at
    ``src`` (reflink); whether it could."""
    try:
        fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("=qQQQ", src_fd, src, length, dst))
    except OSError:
        return False
    return True


def _pages_files(images: Path, parent: Path | None) -> dict[str, tuple[Path, list[Run], list[Run]]]:
    """For each pages file of ``images`` that ``parent`` holds the same process's
    pages for: (the parent's pages file, the new runs, the parent's runs by address)."""
    found: dict[str, tuple[Path, list[Run], list[Run]]] = {}
    if parent is None:
        return found
    for pagemap in sorted(images.glob("pagemap-*.img")):
        try:
            new_id, new_runs = read_pagemap(pagemap)
            old_id, old_runs = read_pagemap(parent / pagemap.name)
        except (OSError, ValueError):
            continue
        old_runs.sort(key=lambda run: run.vaddr)
        found[f"pages-{new_id}.img"] = (parent / f"pages-{old_id}.img", new_runs, old_runs)
    return found


def copy_sharing(images: Path, target: Path, parent: Path | None) -> tuple[dict[str, Any], int]:
    """Copy CRIU images ``images`` into the new folder ``target``, each file fsynced,
    sharing every unchanged page with ``parent``'s images by reflink instead of
    writing it; return (``{relative path: {"sha256", "size"}}``, bytes shared).

    The checksums are of the bytes read from ``images`` as they are copied: one
    pass over them. Pages are matched by process and virtual address, and compared
    before they are shared, so ``target`` holds byte for byte what ``images`` does.

    Raises:
        OSError: a file could not be read or written (ENOSPC: the volume is full).
    """
    sharing = _pages_files(images, parent)
    files = sorted(f for f in images.rglob("*") if f.is_file() and not f.is_symlink())
    for folder in sorted({f.parent for f in files}):
        (target / folder.relative_to(images)).mkdir(mode=0o755, parents=True, exist_ok=True)

    def copy(file: Path) -> tuple[str, dict[str, Any], int]:
        rel = file.relative_to(images).as_posix()
        return rel, *_copy_one(file, target / rel, sharing.get(rel))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        done = list(pool.map(copy, files))
    return {rel: entry for rel, entry, _ in done}, sum(shared for _, _, shared in done)


def _copy_one(
    source: Path, dest: Path, like: tuple[Path, list[Run], list[Run]] | None
) -> tuple[dict[str, Any], int]:
    """Copy one image (see :func:`copy_sharing`): its manifest entry, bytes shared."""
    digest = hashlib.sha256()
    shared = 0
    src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(src_fd).st_size
        mode = stat.S_IMODE(os.fstat(src_fd).st_mode)
        dst_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            if size:
                with mmap.mmap(src_fd, 0, prot=mmap.PROT_READ) as data:
                    view = memoryview(data)
                    try:
                        shared = _copy_ranges(view, dst_fd, size, digest, like)
                    finally:
                        view.release()
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return {"sha256": digest.hexdigest(), "size": size}, shared


def _copy_ranges(
    view: memoryview,
    dst_fd: int,
    size: int,
    digest: Any,
    like: tuple[Path, list[Run], list[Run]] | None,
) -> int:
    """Write ``view`` to ``dst_fd`` from offset 0, cloning the ranges equal to the
    parent's pages; hash every byte into ``digest``. Bytes shared."""
    ranges: list[tuple[int, int, int]] = []
    old_fd = -1
    old: mmap.mmap | None = None
    if like is not None:
        try:
            old_fd = os.open(like[0], os.O_RDONLY | os.O_NOFOLLOW)
            if os.fstat(old_fd).st_size:
                old = mmap.mmap(old_fd, 0, prot=mmap.PROT_READ)
                new = view.obj
                assert isinstance(new, mmap.mmap)
                ranges = sorted(_equal_ranges(new, old, _pairs(like[1], like[2])))
        except OSError:
            ranges = []
    shared = pos = 0
    try:
        for dst, src, length in [*ranges, (size, 0, 0)]:
            if dst < pos or dst + length > size:
                continue  # overlapping or past the end (pagemaps that disagree): copied
            _write(view, dst_fd, pos, dst, digest)
            if length:
                if _clone(old_fd, src, dst_fd, dst, length):
                    with view[dst : dst + length] as same:
                        digest.update(same)
                    shared += length
                else:
                    _write(view, dst_fd, dst, dst + length, digest)
            pos = dst + length
    finally:
        if old is not None:
            old.close()
        if old_fd >= 0:
            os.close(old_fd)
    return shared


def _write(view: memoryview, fd: int, start: int, end: int, digest: Any) -> None:
    """Hash and write bytes ``start`` to ``end`` of ``view`` at the same offsets of ``fd``."""
    pos = start
    while pos < end:
        # Released at once, even on an error: the mmap under it must close after.
        with view[pos : min(end, pos + _CHUNK)] as chunk:
            digest.update(chunk)
            pos += os.pwrite(fd, chunk, pos)
