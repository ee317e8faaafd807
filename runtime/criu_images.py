"""Giving CRIU images of one user's process to another user.

A class's base is a process of the teacher's kernel: CRIU restores it with the
credentials it was dumped with, in a user namespace with the dumped mappings (the
kernel's uid maps to itself on the host). A student's kernel runs as the student,
so their copy of the base has the teacher's ids replaced by theirs, in:

- ``core-*.img``: each thread's credentials (``thread_core.creds``: the real,
  effective, saved and filesystem uid and gid, and the supplementary groups);
- ``mm-*.img``: the saved ELF auxiliary vector's ``AT_UID``, ``AT_EUID``,
  ``AT_GID`` and ``AT_EGID``;
- ``userns-*.img``: the user namespace's uid and gid maps.

An image is two magic numbers, then entries, each a little-endian u32 length and a
protobuf message. The messages are rewritten at the wire level, by field numbers
from CRIU's ``images/*.proto`` (stable across CRIU versions: fields are only
added), so fields this code does not know pass through untouched.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from sandbox_kernel.errors import SandboxError

#: core_entry.thread_core (5) -> thread_core_entry.creds (10).
_THREAD_CORE, _CREDS = 5, 10
#: creds_entry: uid, euid, suid, fsuid; gid, egid, sgid, fsgid; groups.
_CRED_UIDS, _CRED_GIDS, _CRED_GROUPS = (1, 3, 5, 7), (2, 4, 6, 8), 14
#: mm_entry.mm_saved_auxv: pairs of (type, value).
_AUXV = 13
_AT_UIDS, _AT_GIDS = (11, 12), (13, 14)  # AT_UID, AT_EUID; AT_GID, AT_EGID
#: userns_entry.uid_map (1), .gid_map (2) -> uid_gid_extent: first (1), lower_first (2).
_UID_MAP, _GID_MAP, _FIRST, _LOWER = 1, 2, 1, 2

Field = tuple[int, int, "int | bytes"]


class ImageError(SandboxError):
    """A CRIU image is not what this code expects."""


# ---- protobuf's wire format ---------------------------------------------------------


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ImageError("a truncated or overlong varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def parse(data: bytes) -> list[Field]:
    """A message's fields in order: (number, wire type, int or raw bytes)."""
    fields: list[Field] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
            if len(value) != size:
                raise ImageError("a truncated length-delimited field")
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = data[i : i + width], i + width
        else:
            raise ImageError(f"wire type {wire} is not used by CRIU's images")
        fields.append((number, wire, value))
    return fields


def encode(fields: list[Field]) -> bytes:
    """The message of ``fields`` (the inverse of :func:`parse`)."""
    out = bytearray()
    for number, wire, value in fields:
        out += _encode_varint(number << 3 | wire)
        if wire == 0:
            assert isinstance(value, int)
            out += _encode_varint(value)
        else:
            assert isinstance(value, bytes)
            if wire == 2:
                out += _encode_varint(len(value))
            out += value
    return bytes(out)


def _packed(data: bytes) -> list[int]:
    values, i = [], 0
    while i < len(data):
        value, i = _varint(data, i)
        values.append(value)
    return values


# ---- the rewrites -------------------------------------------------------------------


class Owners:
    """One user's ids replaced by another's: ``uid``, ``gid`` (old -> new)."""

    def __init__(self, uid: tuple[int, int], gid: tuple[int, int]) -> None:
        self.uid, self.gid = uid, gid

    def swap_uid(self, value: int) -> int:
        return self.uid[1] if value == self.uid[0] else value

    def swap_gid(self, value: int) -> int:
        return self.gid[1] if value == self.gid[0] else value


def _rewrite_submessage(
    fields: list[Field], number: int, change: Callable[[bytes], bytes]
) -> list[Field]:
    return [
        (n, w, change(v)) if n == number and w == 2 and isinstance(v, bytes) else (n, w, v)
        for n, w, v in fields
    ]


def _creds(data: bytes, owners: Owners) -> bytes:
    out: list[Field] = []
    for number, wire, value in parse(data):
        if wire == 0 and isinstance(value, int):
            if number in _CRED_UIDS:
                value = owners.swap_uid(value)
            elif number in _CRED_GIDS or number == _CRED_GROUPS:
                value = owners.swap_gid(value)
        elif number == _CRED_GROUPS and wire == 2 and isinstance(value, bytes):  # packed
            value = b"".join(_encode_varint(owners.swap_gid(g)) for g in _packed(value))
        out.append((number, wire, value))
    return encode(out)


def core(data: bytes, owners: Owners) -> bytes:
    """A ``core_entry`` with its thread's credentials given to the new owner."""

    def thread(thread_core: bytes) -> bytes:
        return encode(_rewrite_submessage(parse(thread_core), _CREDS, lambda c: _creds(c, owners)))

    return encode(_rewrite_submessage(parse(data), _THREAD_CORE, thread))


def mm(data: bytes, owners: Owners) -> bytes:
    """An ``mm_entry`` whose saved auxiliary vector names the new owner."""
    fields = parse(data)
    auxv = [(i, v) for i, (n, w, v) in enumerate(fields) if n == _AUXV and w == 0]
    for (_, kind), (j, value) in zip(auxv[::2], auxv[1::2], strict=False):
        assert isinstance(kind, int) and isinstance(value, int)
        if kind in _AT_UIDS:
            fields[j] = (_AUXV, 0, owners.swap_uid(value))
        elif kind in _AT_GIDS:
            fields[j] = (_AUXV, 0, owners.swap_gid(value))
    return encode(fields)


def userns(data: bytes, owners: Owners) -> bytes:
    """A ``userns_entry`` that maps the new owner's ids to themselves."""

    def extent(swap: Callable[[int], int]) -> Callable[[bytes], bytes]:
        def change(data: bytes) -> bytes:
            out: list[Field] = []
            for n, w, v in parse(data):
                if n in (_FIRST, _LOWER) and w == 0 and isinstance(v, int):
                    v = swap(v)
                out.append((n, w, v))
            return encode(out)

        return change

    fields = _rewrite_submessage(parse(data), _UID_MAP, extent(owners.swap_uid))
    return encode(_rewrite_submessage(fields, _GID_MAP, extent(owners.swap_gid)))


#: Which images are rewritten, by name prefix.
REWRITES: dict[str, Callable[[bytes, Owners], bytes]] = {
    "core-": core,
    "mm-": mm,
    "userns-": userns,
}


def rewrite_image(path: Path, owners: Owners) -> bool:
    """Rewrite the entries of image ``path`` (a new file: the old one may share its
    blocks with the base); whether it was one to rewrite."""
    change = next((f for prefix, f in REWRITES.items() if path.name.startswith(prefix)), None)
    if change is None or path.suffix != ".img":
        return False
    map_entries(path, lambda entry: (change(entry, owners), 1))
    return True


def map_entries(path: Path, change: Callable[[bytes], tuple[bytes, int]]) -> int:
    """Pass each entry of image ``path`` through ``change``, which returns the new
    entry and how many changes it made; if any, write the image anew (a new file,
    with the old one's owner and mode: the old one may be a base's, shared).
    Returns the number of changes."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ImageError(f"{path.name} is too short for a CRIU image")
    out, i, changed = bytearray(data[:8]), 8, 0
    while i < len(data):
        if i + 4 > len(data):
            raise ImageError(f"{path.name} ends inside an entry's length")
        (size,) = struct.unpack_from("<I", data, i)
        entry = data[i + 4 : i + 4 + size]
        if len(entry) != size:
            raise ImageError(f"{path.name} ends inside an entry")
        new, count = change(entry)
        out += struct.pack("<I", len(new)) + new
        changed += count
        i += 4 + size
    if changed:
        st = path.stat()
        fresh = path.with_name(path.name + ".new")
        fresh.write_bytes(bytes(out))
        os.chown(fresh, st.st_uid, st.st_gid)
        os.chmod(fresh, stat.S_IMODE(st.st_mode))
        fresh.replace(path)
    return changed
