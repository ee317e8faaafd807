"""Snapshots as one portable file: ``sandbox-kernel snapshot export`` and ``import``.

A snapshot lives in its owner's store as CRIU images (``criu/``) and a read-only
btrfs subvolume of the kernel's writable layer (``files/``: the ``root`` and
``cwd`` overlay uppers). The portable form is one stream, written and read front
to back (it can go through a pipe):

- the line ``sandbox-kernel snapshot 1``;
- records, each a 4-byte big-endian header length, a JSON header, and
  ``header["size"]`` bytes of payload:

  - ``snapshot`` (first): the meta, the images' checksums, the host it was taken
    on (:func:`host_facts`) and, for a child exported ``--since`` its parent, the
    parent's name and its images' checksums;
  - ``image``: one CRIU image, whole;
  - ``pages``: a child's pages image as segments, ``["data", length]`` (bytes
    that follow in the payload) or ``["parent", offset, length]`` (the parent's
    pages image at that offset: unchanged memory at the same address);
  - ``entry``: one file, folder, symlink or overlay whiteout of the layer, with
    its mode, owner, time and overlay xattrs (a file's bytes follow); in a child,
    only what changed since the parent, and ``delete`` for what went;
  - ``end``: how many records came before it.

Importing reads a stream a user handed over as hostile: names are checked, paths
are written below the new layer one component at a time without following
symlinks, only the kinds of files above are made, setuid and setgid bits and
file capabilities are dropped, every file becomes the importer's (root's stay
root's), sizes are capped by the importer's snapshot quota, and the images must
match the checksums the stream announced. The CRIU images get the importer's
ids (``criu_images.py``), as a class base's copy does. A failure leaves nothing:
the draft is discarded.

A restore checks the host the snapshot was taken on (:func:`misfit_host`): CRIU
restores a process only on the same CPU architecture, with the CPU features it
used, and under the same kernel series.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, SandboxError

from . import snapshots
from .criu_images import Owners, rewrite_image
from .dedupe import PAGE, read_pagemap, same_address_ranges
from .fsutil import give, read_json

MAGIC = b"sandbox-kernel snapshot 1\n"
#: A header is a small JSON object; a longer one is refused unread.
MAX_HEADER = 1 << 20
#: The layer's two overlay uppers; their work folders are made empty on import.
PARTS = ("root", "cwd")
#: The xattrs a layer's entries keep: overlayfs's own (an opaque folder, a
#: redirect, an origin, an upper's uuid) and users'. Others
#: (``security.capability``: file capabilities) go.
KEPT_XATTRS = re.compile(
    r"^(trusted\.overlay\.(opaque|redirect|origin|impure|uuid)|user\.[^\x00]{1,200})$"
)
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20
#: Pages compared at once before one by one: most of a child's are its parent's.
_COMPARE = 256 * PAGE
_META_TEXT = (
    "message", "image", "mode", "reason", "executable", "cwd", "cwd_inside", "kernel_id",
)  # fmt: skip
_META_NUMBERS = ("created", "file_bytes", "layer_bytes", "paused_seconds", "seconds")


class ImportRefused(ConfigError):
    """The stream is not a snapshot this machine takes: it says which part and why."""

    def __init__(self, problem: str) -> None:
        SandboxError.__init__(self, f"snapshot import refused: {problem}")
        self.problem = problem


# ---- the host a restore needs ----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _host_facts() -> tuple[str, str, tuple[str, ...]]:
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags = sorted(set(value.split()))
                break
    return platform.machine(), os.uname().release, tuple(flags)


def host_facts() -> dict[str, Any]:
    """What CRIU needs of the machine a snapshot is restored on: the CPU
    architecture, the CPU's feature flags and the kernel's release."""
    arch, kernel, flags = _host_facts()
    return {"arch": arch, "kernel": kernel, "cpu_flags": list(flags)}


def _series(release: str) -> str:
    return ".".join(release.split(".")[:2])


def misfit_host(facts: Any, here: dict[str, Any] | None = None) -> str:
    """Why a snapshot taken on the host ``facts`` describes cannot be restored on
    this one (``here``), or "". Snapshots from before the facts were kept pass."""
    if not isinstance(facts, dict):
        return ""
    here = here or host_facts()
    if facts.get("arch") != here["arch"]:
        return f"it was taken on a {facts.get('arch')} CPU and this machine's is {here['arch']}"
    theirs = facts.get("cpu_flags")
    if isinstance(theirs, list):
        missing = sorted(set(map(str, theirs)) - set(here["cpu_flags"]))
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            return (
                f"it was taken on a CPU with features this machine's lacks ({shown}); "
                "restore it on a machine with the same CPU"
            )
    release = str(facts.get("kernel", ""))
    if _series(release) != _series(here["kernel"]):
        return (
            f"it was taken under Linux {release} and this machine runs {here['kernel']}; "
            f"restore it on a machine with Linux {_series(release)}"
        )
    return ""


# ---- the stream --------------------------------------------------------------------------


def _head(out: IO[bytes], header: dict[str, Any], size: int) -> int:
    """Write a record's header, announcing ``size`` bytes of payload; its length."""
    head = json.dumps({**header, "size": size}, separators=(",", ":")).encode()
    out.write(struct.pack(">I", len(head)) + head)
    return 4 + len(head)


def _record(out: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> int:
    """Write one record; its length in bytes."""
    written = _head(out, header, len(payload))
    if payload:
        out.write(payload)
    return written + len(payload)


def _record_file(out: IO[bytes], header: dict[str, Any], path: Path) -> int:
    """Write one record whose payload is the file ``path``, copied a chunk at a time
    (a memory image can be gigabytes); its length in bytes."""
    with open(path, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        written = _head(out, header, size)
        left = size
        while left:
            data = source.read(min(left, _CHUNK))
            if not data:
                raise SandboxError(f"{path} got shorter while it was exported")
            out.write(data)
            left -= len(data)
    return written + size


class Reader:
    """The records of a stream, checked as they are read: ``next()`` gives a header;
    then its payload must be read (``payload``/``chunks``) before the next one."""

    def __init__(self, source: IO[bytes], budget: int) -> None:
        self.source = source
        self.budget = budget  # payload bytes left before the quota would be passed
        self.left = 0
        self.count = 0
        head = b""
        while len(head) < len(MAGIC):
            got = source.read(len(MAGIC) - len(head))
            if not got:
                break
            head += got
        if head != MAGIC:
            raise ImportRefused(
                "the file is not an exported snapshot (made by `sandbox-kernel snapshot export`)"
            )

    def _exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            got = self.source.read(size - len(data))
            if not got:
                raise ImportRefused("the file ends early: it was cut short")
            data += got
        return bytes(data)

    def next(self) -> dict[str, Any]:
        if self.left:
            raise ImportRefused("a record's payload was not read")  # a bug, not the input
        (length,) = struct.unpack(">I", self._exactly(4))
        if length > MAX_HEADER:
            raise ImportRefused(f"a record's header is {format_size(length)}, past 1M")
        try:
            header = json.loads(self._exactly(length))
        except ValueError:
            raise ImportRefused("a record's header is not JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
            raise ImportRefused("a record's header has no kind")
        size = header.get("size")
        if not isinstance(size, int) or size < 0:
            raise ImportRefused(f"a {header['kind']} record has no size")
        if size > self.budget:
            raise ImportRefused(
                "it is larger than your snapshot quota leaves room for; delete snapshots "
                "(`sandbox-kernel snapshots --delete NAME`) or ask for a larger quota"
            )
        self.budget -= size
        self.left = size
        self.count += 1
        return header

    def chunks(self) -> Iterator[bytes]:
        while self.left:
            data = self.source.read(min(self.left, _CHUNK))
            if not data:
                raise ImportRefused("the file ends early: it was cut short")
            self.left -= len(data)
            yield data

    def payload(self) -> bytes:
        return b"".join(self.chunks())


# ---- export ------------------------------------------------------------------------------


@dataclass
class Exported:
    """What an export wrote: the stream's bytes, and how many of them were memory
    shared with the parent (not sent)."""

    bytes: int
    parent_bytes: int
    records: int


def export(
    owner: str,
    name: str,
    out: IO[bytes],
    since: str | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Exported:
    """Write snapshot ``name`` of ``owner`` to ``out``: whole, or against its parent
    ``since`` (the importer must have that parent). Blocks.

    Raises:
        SnapshotNotFound, SnapshotCorrupt: ``name`` (or ``since``) is missing or damaged.
        ConfigError: ``since`` is not an ancestor of ``name``.
    """
    meta = snapshots.verify(owner, name)
    folder = snapshots.snapshot_dir(owner, name)
    manifest: dict[str, dict[str, Any]] = read_json(folder / "manifest.json")
    parent_dir: Path | None = None
    parent_manifest: dict[str, dict[str, Any]] = {}
    if since is not None:
        if since not in _ancestors(owner, name):
            raise ConfigError(
                "--since", since, f"is not a parent of {name}; leave it out to export it whole"
            )
        snapshots.verify(owner, since)
        parent_dir = snapshots.snapshot_dir(owner, since)
        parent_manifest = read_json(parent_dir / "manifest.json")
    out.write(MAGIC)
    written = len(MAGIC) + _record(out, {
        "kind": "snapshot", "meta": meta, "host": meta.get("host") or host_facts(),
        "manifest": {rel: {"sha256": e["sha256"], "size": e["size"]}
                     for rel, e in manifest.items()},
        "parent": None if since is None else {
            "name": since,
            "images": {rel: e["sha256"] for rel, e in parent_manifest.items()},
        },
    })  # fmt: skip
    records, from_parent = 1, 0
    total = sum(e["size"] for e in manifest.values())
    for rel in sorted(manifest):
        path = folder / "criu" / rel
        if parent_dir is not None and rel.startswith("pages-"):
            n, shared = _pages_record(out, folder / "criu", rel, parent_dir / "criu")
            written, from_parent = written + n, from_parent + shared
        else:
            written += _record_file(out, {"kind": "image", "path": rel}, path)
        records += 1
        if manifest[rel]["size"] >= _CHUNK:  # the big ones: the memory itself
            say(f"memory: {rel} of {format_size(total)} done, {format_size(written)} written")
    for header, source in _entries(folder / "files", parent_dir and parent_dir / "files"):
        written += _record(out, header) if source is None else _record_file(out, header, source)
        records += 1
    say(f"files: {format_size(written)} written")
    written += _record(out, {"kind": "end", "records": records})
    out.flush()
    return Exported(written, from_parent, records + 1)


def _ancestors(owner: str, name: str) -> set[str]:
    found: set[str] = set()
    current: str | None = name
    while current and current not in found:
        found.add(current)
        try:
            parent = snapshots.load(owner, current, wait=False).get("parent")
        except SandboxError:
            break
        current = parent if isinstance(parent, str) else None
    return found - {name}


def _pages_record(out: IO[bytes], images: Path, rel: str, parent: Path) -> tuple[int, int]:
    """Write the pages image ``rel`` as segments against the parent's pages image of
    the same process: (bytes written, bytes left to the parent). Both images are
    read a chunk at a time: the memory this takes does not grow with the kernel's."""
    whole = images / rel
    try:
        _, runs = read_pagemap(_pagemap_of(images, rel))
        old_id, old_runs = read_pagemap(parent / _pagemap_of(images, rel).name)
        old_path = parent / f"pages-{old_id}.img"
    except (OSError, ValueError):
        return _record_file(out, {"kind": "image", "path": rel}, whole), 0
    runs.sort(key=lambda r: r.offset)
    position = 0
    for run in runs:
        if run.offset != position:  # a gap the pagemap does not explain: send it whole
            return _record_file(out, {"kind": "image", "path": rel}, whole), 0
        position += run.pages * PAGE
    if position != whole.stat().st_size:
        return _record_file(out, {"kind": "image", "path": rel}, whole), 0
    old_runs.sort(key=lambda r: r.vaddr)
    segments: list[list[Any]] = []  # ["data", offset here, length] until written
    shared = 0

    def add(kind: str, at: int, length: int) -> None:
        """A range of this image (``data``) or of the parent's (``parent``); one
        that continues the last segment of its kind lengthens it."""
        last = segments[-1] if segments else None
        if last and last[0] == kind and last[1] + last[2] == at:
            last[2] += length
        else:
            segments.append([kind, at, length])

    new_fd = os.open(whole, os.O_RDONLY)
    old_fd = os.open(old_path, os.O_RDONLY)
    try:
        done = 0
        for dst, src, length in same_address_ranges(runs, old_runs):
            if dst > done:
                add("data", done, dst - done)  # pages the parent did not have at those addresses
            k = 0
            while k < length:
                step = min(_COMPARE, length - k)
                mine = os.pread(new_fd, step, dst + k)
                theirs = memoryview(os.pread(old_fd, step, src + k))
                if mine.startswith(theirs):  # compared in place, without a copy
                    add("parent", src + k, step)
                    shared += step
                else:
                    for p in range(0, step, PAGE):
                        if mine.startswith(theirs[p : p + PAGE], p):
                            add("parent", src + k + p, PAGE)
                            shared += PAGE
                        else:
                            add("data", dst + k + p, PAGE)
                k += step
            done = dst + length
        if done < position:
            add("data", done, position - done)
        wire = [["data", s[2]] if s[0] == "data" else s for s in segments]
        header = {"kind": "pages", "path": rel, "parent_path": old_path.name, "segments": wire}
        if len(json.dumps(header)) > MAX_HEADER // 2:  # too scattered to describe: whole
            return _record_file(out, {"kind": "image", "path": rel}, whole), 0
        size = sum(s[2] for s in segments if s[0] == "data")
        written = _head(out, header, size)
        for segment in segments:
            if segment[0] != "data":
                continue
            at, left = segment[1], segment[2]
            while left:
                data = os.pread(new_fd, min(left, _CHUNK), at)
                out.write(data)
                at, left = at + len(data), left - len(data)
        return written + size, shared
    finally:
        os.close(new_fd)
        os.close(old_fd)


def _pagemap_of(images: Path, pages_rel: str) -> Path:
    """The pagemap image naming the pages file ``pages_rel`` (``pages-<id>.img``)."""
    wanted = int(pages_rel.removeprefix("pages-").removesuffix(".img"))
    for pagemap in images.glob("pagemap-*.img"):
        with contextlib.suppress(OSError, ValueError):
            if read_pagemap(pagemap)[0] == wanted:
                return pagemap
    raise ValueError(f"no pagemap names {pages_rel}")


def _describe_entry(path: Path, rel: str) -> tuple[dict[str, Any], Path | None]:
    st = os.lstat(path)
    header: dict[str, Any] = {
        "kind": "entry", "path": rel, "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
    }  # fmt: skip
    payload: Path | None = None
    if stat.S_ISDIR(st.st_mode):
        header["type"] = "dir"
    elif stat.S_ISLNK(st.st_mode):
        header["type"], header["target"] = "symlink", os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        header["type"] = "whiteout"
    elif stat.S_ISREG(st.st_mode):
        header["type"] = "file"
        header["bytes"] = st.st_size
        payload = path  # copied a chunk at a time when written
    else:
        header["type"] = "skip"  # a socket or fifo left in the layer: not kept
    xattrs = {}
    if header["type"] in ("dir", "file"):
        with contextlib.suppress(OSError):
            for key in os.listxattr(path, follow_symlinks=False):
                if KEPT_XATTRS.match(key):
                    xattrs[key] = os.getxattr(path, key, follow_symlinks=False).hex()
    header["xattrs"] = xattrs
    return header, payload


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("type", "mode", "uid", "gid", "mtime_ns", "xattrs", "target", "bytes")
    return all(a.get(k) == b.get(k) for k in keys)


def _entries(files: Path, parent: Path | None) -> Iterator[tuple[dict[str, Any], Path | None]]:
    """The layer's entries, folders before what they hold; against ``parent``, only
    what changed, and ``delete`` for what is gone."""
    for part in PARTS:
        top = files / part
        if not top.is_dir():
            continue
        header, _ = _describe_entry(top, part)
        if (
            parent is None
            or not (parent / part).is_dir()
            or not _same(header, _describe_entry(parent / part, part)[0])
        ):
            yield header, None  # the upper's own folder: its owner, mode and xattrs
        seen: set[str] = set()
        for root, dirs, names in os.walk(top):
            dirs.sort()
            for name in [*sorted(dirs), *sorted(names)]:
                path = Path(root) / name
                rel = path.relative_to(files).as_posix()
                seen.add(rel)
                header, payload = _describe_entry(path, rel)
                if header["type"] == "skip":
                    continue
                if parent is not None:
                    other = parent / rel
                    if os.path.lexists(other):
                        before, _ = _describe_entry(other, rel)
                        if _same(header, before):  # size and time included
                            continue
                yield header, payload
        if parent is not None and (parent / part).is_dir():
            for root, dirs, names in os.walk(parent / part):
                gone = [n for n in [*dirs, *names]
                        if (Path(root) / n).relative_to(parent).as_posix() not in seen]  # fmt: skip
                for name in sorted(gone):
                    rel = (Path(root) / name).relative_to(parent).as_posix()
                    yield {"kind": "entry", "type": "delete", "path": rel}, None
                dirs[:] = [d for d in dirs if d not in gone]


# ---- import ------------------------------------------------------------------------------


def check_rel(rel: Any) -> list[str]:
    """The parts of a layer path from a stream, checked: relative, ``root`` or
    ``cwd`` or below them, no ``.``, ``..`` or empty part, no NUL, at most 4096 bytes.

    Raises:
        ImportRefused: it is not such a path.
    """
    if not isinstance(rel, str) or not rel or len(rel.encode()) > 4096 or "\x00" in rel:
        raise ImportRefused(f"a file path {str(rel)[:80]!r} is not a path")
    parts = rel.split("/")
    if parts[0] not in PARTS or any(p in ("", ".", "..") for p in parts):
        raise ImportRefused(
            f"the file path {rel[:200]!r} is not below root/ or cwd/ of the kernel's layer"
        )
    return parts


class LayerWriter:
    """Writes a stream's entries below the folder ``dirfd`` (a new layer), never
    following a symlink: each path is walked from the top one component at a time.
    Every entry becomes ``uid``:``gid``'s, except root's, which stay root's."""

    def __init__(self, dirfd: int, uid: int, gid: int) -> None:
        self.top = dirfd
        self.uid, self.gid = uid, gid

    def _parent(self, parts: list[str]) -> int:
        fd = os.dup(self.top)
        try:
            for part in parts[:-1]:
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        raise ImportRefused(
                            f"the file path {'/'.join(parts)[:200]!r} goes through "
                            f"{part!r}, which is not a folder of the layer"
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _owner(self, header: dict[str, Any]) -> tuple[int, int]:
        uid = 0 if header.get("uid") == 0 else self.uid
        gid = 0 if header.get("gid") == 0 else self.gid
        return uid, gid

    def write(self, header: dict[str, Any], chunks: Iterator[bytes]) -> int:
        """Make one entry; the bytes written."""
        parts = check_rel(header.get("path"))
        kind = header.get("type")
        mode = header.get("mode", 0o644)
        if not isinstance(mode, int):
            raise ImportRefused(f"the mode of {parts[-1]!r} is not a number")
        mode &= 0o1777  # no setuid, no setgid
        mtime = header.get("mtime_ns")
        fd = self._parent(parts)
        name = parts[-1]
        written = 0
        try:
            if len(parts) == 1:
                # An upper's own folder: it stays; it takes the entry's owner and mode.
                if kind != "dir":
                    raise ImportRefused(f"{name}/ of the layer must be a folder")
                target = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                self._finish(target, header, mode, mtime)
                return 0
            if kind == "dir" and self._is_dir(fd, name):
                # A folder of the parent that changed: what it holds and the entry
                # does not name is the parent's, unchanged. Only it is updated.
                target = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                self._drop_xattrs(target, header)
                self._finish(target, header, mode, mtime)
                return 0
            if kind == "delete" or self._exists(fd, name):
                self._remove(fd, name)
            if kind == "delete":
                return 0
            uid, gid = self._owner(header)
            if kind == "dir":
                os.mkdir(name, 0o700, dir_fd=fd)
                target = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            elif kind == "file":
                target = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd
                )
                for data in chunks:
                    os.write(target, data)
                    written += len(data)
            elif kind == "symlink":
                link = header.get("target")
                if not isinstance(link, str) or not link or "\x00" in link or len(link) > 4096:
                    raise ImportRefused(f"the symlink {name!r} has no target")
                os.symlink(link, name, dir_fd=fd)
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                return 0
            elif kind == "whiteout":
                os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=fd)
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                return 0
            else:
                raise ImportRefused(f"an entry of kind {str(kind)[:40]!r} is not a layer's")
            self._finish(target, header, mode, mtime)
            return written
        finally:
            os.close(fd)

    def _finish(self, target: int, header: dict[str, Any], mode: int, mtime: Any) -> None:
        """Give the open entry ``target`` its xattrs, owner, mode and time; close it."""
        uid, gid = self._owner(header)
        try:
            xattrs = header.get("xattrs") or {}
            if not isinstance(xattrs, dict):
                raise ImportRefused(f"the xattrs of {header.get('path')!r} are not a map")
            for key, value in xattrs.items():
                if not isinstance(key, str) or not KEPT_XATTRS.match(key):
                    continue  # not kept (file capabilities, say)
                try:
                    data = bytes.fromhex(str(value))
                except ValueError:
                    raise ImportRefused(
                        f"the xattrs of {header.get('path')!r} are not hex"
                    ) from None
                os.setxattr(target, key, data)
            os.fchown(target, uid, gid)
            os.fchmod(target, mode)
            if isinstance(mtime, int):
                os.utime(target, ns=(mtime, mtime))
        finally:
            os.close(target)

    @staticmethod
    def _drop_xattrs(target: int, header: dict[str, Any]) -> None:
        """Remove the kept xattrs (an overlay's opaque mark, say) the parent's folder
        had and the entry no longer has."""
        wanted = header.get("xattrs") or {}
        for key in os.listxattr(target):
            if KEPT_XATTRS.match(key) and key not in wanted:
                os.removexattr(target, key)

    @staticmethod
    def _is_dir(fd: int, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    @staticmethod
    def _exists(fd: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    @staticmethod
    def _remove(fd: int, name: str) -> None:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)


def _meta_from(stream_meta: Any) -> dict[str, Any]:
    """The fields of a stream's meta this store keeps, checked; the rest is dropped."""
    if not isinstance(stream_meta, dict):
        raise ImportRefused("its description (meta) is not an object")
    meta: dict[str, Any] = {}
    for key in _META_TEXT:
        value = stream_meta.get(key, "")
        if not isinstance(value, str) or len(value) > 4096:
            raise ImportRefused(f"its {key} is not a short text")
        meta[key] = value
    for key in _META_NUMBERS:
        value = stream_meta.get(key, 0)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ImportRefused(f"its {key} is not a number")
        meta[key] = value
    for key in ("layers", "python_prefixes"):
        value = stream_meta.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImportRefused(f"its {key} are not a list of texts")
        meta[key] = value
    if meta["mode"] not in ("live", "files"):
        raise ImportRefused(f"its mode {meta['mode'][:20]!r} is not live or files")
    for key in ("uid", "gid"):
        if not isinstance(stream_meta.get(key), int) or stream_meta[key] < 0:
            raise ImportRefused(f"its {key} is not a number")
    return meta


def import_(
    owner_uid: int,
    owner_gid: int,
    source: IO[bytes],
    name: str | None = None,
    cwd: str | None = None,
    say: Callable[[str], None] = lambda _: None,
    parent_name: str | None = None,
) -> dict[str, Any]:
    """Read an exported snapshot from ``source`` into the store of ``owner_uid``, as
    ``name`` (default: its own name); kernels in host folder ``cwd`` see it (default:
    the folder it was taken in). A child stream's parent is the importer's snapshot
    ``parent_name`` (default: the name it had where it was exported). Its meta. Blocks.

    Raises:
        ImportRefused: the stream is damaged, hostile, or needs a parent this store
            lacks; nothing is kept.
        ConfigError: the name is taken or invalid.
        QuotaExceeded: it would pass the owner's snapshot quota.
    """
    from .volume import create_subvolume, delete_subvolume, snapshot_subvolume

    owner = str(owner_uid)
    use = snapshots.usage(owner)
    room = max(0, use["quota_bytes"] - use["bytes"])
    reader = Reader(source, room)
    head = reader.next()
    if head["kind"] != "snapshot":
        raise ImportRefused("it does not begin with the snapshot's description")
    reader.payload()
    meta = _meta_from(head.get("meta"))
    stream_meta = head["meta"]
    announced = head.get("manifest")
    if not isinstance(announced, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
        for k, v in announced.items()
    ):
        raise ImportRefused("its list of images is damaged")
    target = name or str(stream_meta.get("name", ""))
    if not snapshots.is_moved(target):  # the runtime's own name for a moving kernel
        snapshots.check_user_name(target)
    snapshots.check_name(target)
    snapshots.check_quota(owner, target)
    parent_head = head.get("parent")
    if parent_name is not None and isinstance(parent_head, dict):
        parent_head = {**parent_head, "name": parent_name}
    parent = _parent_of(owner, parent_head)
    owners = Owners((int(stream_meta["uid"]), owner_uid), (int(stream_meta["gid"]), owner_gid))
    draft = snapshots.Draft(owner, target)
    try:
        draft.criu_dir.mkdir(mode=0o700)
        layer = draft.path / "files.rw"
        if parent is not None:
            snapshot_subvolume(snapshots.snapshot_dir(owner, parent) / "files", layer, False)
        else:
            create_subvolume(layer)
            for part in PARTS:
                (layer / part).mkdir()
        shared, digests = _read_records(reader, draft.criu_dir, layer, owner_uid, owner_gid, parent,
                               owner, announced, say)  # fmt: skip
        for part in PARTS:
            work = layer / f"{part}.work"
            if work.exists():
                shutil.rmtree(work)
            work.mkdir()
        if meta["mode"] == "live":
            for image in sorted(draft.criu_dir.iterdir()):
                if rewrite_image(image, owners):  # a small one: hashed again
                    with open(image, "rb") as handle:
                        digests[image.name] = hashlib.file_digest(handle, "sha256").hexdigest()
                        os.fsync(handle.fileno())
                image.chmod(0o644)
        # As a snapshot's own: a restore reads them from inside the kernel's user
        # namespace (see Snapshotting._readable); the snapshot's folder stays 0700.
        give(draft.criu_dir, owner_uid, owner_gid)
        draft.criu_dir.chmod(0o711)
        snapshot_subvolume(layer, draft.files, readonly=True)
        delete_subvolume(layer)
        from .rootfs import tree_sizes

        file_bytes, layer_bytes = tree_sizes(draft.files)
        final = {
            **meta, "created": time.time(), "uid": owner_uid, "gid": owner_gid,
            "cwd": cwd or meta["cwd"] or meta["cwd_inside"], "parent": parent,
            "file_bytes": file_bytes, "layer_bytes": layer_bytes,
            "host": head.get("host") if isinstance(head.get("host"), dict) else None,
            "imported": {"name": stream_meta.get("name"), "time": time.time()},
        }  # fmt: skip
        if parent is not None and shared:
            pmeta = snapshots.load(owner, parent)
            final["shared_bytes"] = shared
            final["shared_with"] = {"kind": "snapshot", "name": parent,
                                    "created": pmeta["created"]}  # fmt: skip
        # Hashed as they were written (and fsynced): not read again.
        committed = draft.commit(final, {rel: {"sha256": d} for rel, d in digests.items()})
    except BaseException:
        with contextlib.suppress(Exception):
            delete_subvolume(draft.path / "files.rw")
        draft.discard()
        raise
    say(f"imported {target}: memory {format_size(committed['memory_bytes'])}, "
        f"files {format_size(file_bytes)}")  # fmt: skip
    return committed


def _parent_of(owner: str, parent: Any) -> str | None:
    """The importer's snapshot a child stream was made against, checked to be the
    same snapshot (its images' checksums); None for a whole stream."""
    if parent is None:
        return None
    if not isinstance(parent, dict) or not isinstance(parent.get("name"), str):
        raise ImportRefused("its parent is not named")
    pname = str(parent["name"])
    try:
        snapshots.check_name(pname)
        snapshots.verify(owner, pname)
        mine: dict[str, dict[str, Any]] = read_json(
            snapshots.snapshot_dir(owner, pname) / "manifest.json"
        )
    except SandboxError:
        raise ImportRefused(
            f"it was exported against its parent {pname!r}, which you do not have; import "
            f"{pname!r} first, or export it whole (without --since)"
        ) from None
    images = parent.get("images")
    if not isinstance(images, dict) or any(
        mine.get(rel, {}).get("sha256") != digest for rel, digest in images.items()
    ):
        raise ImportRefused(
            f"your snapshot {pname!r} is not the parent it was exported against; "
            "export it whole (without --since)"
        )
    return pname


def _read_records(
    reader: Reader,
    images: Path,
    layer: Path,
    uid: int,
    gid: int,
    parent: str | None,
    owner: str,
    announced: dict[str, dict[str, Any]],
    say: Callable[[str], None],
) -> tuple[int, dict[str, str]]:
    """Write the stream's images and entries; the bytes of memory taken from the
    parent, and each image's sha256. Checks every image against ``announced``."""
    from .dedupe import clone_range

    seen: set[str] = set()
    digests: dict[str, str] = {}
    shared = 0
    top = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    writer = LayerWriter(top, uid, gid)
    try:
        while True:
            header = reader.next()
            kind = header["kind"]
            if kind == "end":
                reader.payload()
                if header.get("records") != reader.count - 1:
                    raise ImportRefused("records are missing: the file was cut or changed")
                break
            if kind == "entry":
                writer.write(header, reader.chunks())
                continue
            if kind not in ("image", "pages"):
                raise ImportRefused(f"a record of kind {kind[:40]!r} is not a snapshot's")
            rel = header.get("path")
            if not isinstance(rel, str) or not _IMAGE_NAME.match(rel) or rel in seen:
                raise ImportRefused(f"an image name {str(rel)[:80]!r} is not a CRIU image's")
            if rel not in announced:
                raise ImportRefused(f"the image {rel!r} was not announced")
            seen.add(rel)
            digest = hashlib.sha256()
            fd = os.open(images / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600)  # fmt: skip
            try:
                if kind == "image":
                    for data in reader.chunks():
                        os.write(fd, data)
                        digest.update(data)
                else:
                    shared += _write_pages(fd, header, reader, owner, parent, digest, clone_range)
                os.fsync(fd)
            finally:
                os.close(fd)
            if digest.hexdigest() != announced[rel]["sha256"]:
                raise ImportRefused(f"the image {rel!r} does not match its checksum")
            digests[rel] = digest.hexdigest()
            size = announced[rel].get("size")
            if isinstance(size, int) and size >= _CHUNK:  # the big ones: the memory itself
                say(f"memory: {rel} read, {format_size(size)}")
    finally:
        os.close(top)
    missing = sorted(set(announced) - seen)
    if missing:
        raise ImportRefused(f"the images {', '.join(missing[:5])} are missing")
    return shared, digests


def _write_pages(
    fd: int,
    header: dict[str, Any],
    reader: Reader,
    owner: str,
    parent: str | None,
    digest: Any,
    clone_range: Callable[[int, int, int, int, int], bool],
) -> int:
    """Rebuild a pages image from its segments: the parent's ranges cloned (sharing
    their blocks), the rest from the stream. The bytes taken from the parent."""
    prel = header.get("parent_path")
    if parent is None or not isinstance(prel, str) or not _IMAGE_NAME.match(prel):
        raise ImportRefused("a child's pages name no parent image")
    segments = header.get("segments")
    if not isinstance(segments, list):
        raise ImportRefused("a child's pages have no segments")
    source = snapshots.snapshot_dir(owner, parent) / "criu" / prel
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    shared = 0
    data_left = header["size"]
    stream = _Exact(reader.chunks())
    try:
        size = os.fstat(src).st_size
        at = 0
        for segment in segments:
            if not isinstance(segment, list) or not segment:
                raise ImportRefused("a child's pages segment is damaged")
            if segment[0] == "parent" and len(segment) == 3:
                offset, length = segment[1], segment[2]
                if (not isinstance(offset, int) or not isinstance(length, int) or offset < 0
                        or length <= 0 or offset + length > size
                        or offset % PAGE or length % PAGE):  # fmt: skip
                    raise ImportRefused("a child's pages segment points outside its parent")
                cloned = clone_range(src, offset, fd, at, length)
                for k in range(0, length, _CHUNK):  # hashed (and copied) a chunk at a time
                    data = os.pread(src, min(_CHUNK, length - k), offset + k)
                    if not cloned:
                        os.pwrite(fd, data, at + k)
                    digest.update(data)
                shared += length
                at += length
            elif segment[0] == "data" and len(segment) == 2 and isinstance(segment[1], int):
                length = segment[1]
                if length <= 0 or length > data_left:
                    raise ImportRefused("a child's pages segment is longer than its data")
                data_left -= length
                for piece in stream.take(length):
                    os.pwrite(fd, piece, at)
                    digest.update(piece)
                    at += len(piece)
            else:
                raise ImportRefused("a child's pages segment is damaged")
        if data_left or not stream.empty():
            raise ImportRefused("a child's pages have data no segment uses")
    finally:
        os.close(src)
    return shared


class _Exact:
    """Pieces of a stream of chunks, exactly as many bytes as asked for at a time."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    def take(self, length: int) -> Iterator[bytes]:
        while length:
            if not self.pending:
                self.pending = next(self.chunks, b"")
                if not self.pending:
                    raise ImportRefused("a child's pages end before their segments")
            piece, self.pending = self.pending[:length], self.pending[length:]
            length -= len(piece)
            yield piece

    def empty(self) -> bool:
        return not self.pending and next(self.chunks, b"") == b""
