"""Giving CRIU images to another user: the wire-level rewrite of the ids."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sandbox_kernel.runtime.criu_images import ImageError, Owners, encode, parse, rewrite_image

OWNERS = Owners((65534, 1001), (65534, 1002))


def message(*fields: tuple[int, int, int | bytes]) -> bytes:
    return encode(list(fields))


def image(path: Path, *entries: bytes) -> Path:
    path.write_bytes(b"MAGICMAG" + b"".join(struct.pack("<I", len(e)) + e for e in entries))
    return path


def entries(path: Path) -> list[bytes]:
    data, out, i = path.read_bytes(), [], 8
    while i < len(data):
        (size,) = struct.unpack_from("<I", data, i)
        out.append(data[i + 4 : i + 4 + size])
        i += 4 + size
    return out


def test_parse_and_encode_are_inverses() -> None:
    data = message((1, 0, 300), (2, 2, b"abc"), (3, 5, b"\x01\x02\x03\x04"), (4, 1, b"12345678"))
    assert encode(parse(data)) == data
    assert parse(data)[0] == (1, 0, 300)


def test_a_threads_credentials_change_owner_and_nothing_else(tmp_path: Path) -> None:
    creds = message(
        *((n, 0, 65534) for n in range(1, 9)), (9, 0, 7), (13, 0, 0), (14, 0, 65534), (14, 0, 5),
        (15, 2, b"unconfined"),
    )  # fmt: skip
    thread_core = message((1, 0, 99), (10, 2, creds), (40, 0, 65534))  # 40: unknown, kept
    core = message((1, 0, 1), (5, 2, thread_core), (3, 2, message((1, 0, 65534))))
    path = image(tmp_path / "core-7.img", core)

    assert rewrite_image(path, OWNERS)

    (entry,) = entries(path)
    top = parse(entry)
    assert top[2] == (3, 2, message((1, 0, 65534)))  # the task's own fields: untouched
    thread = parse(top[1][2])  # type: ignore[arg-type]
    assert thread[0] == (1, 0, 99) and thread[2] == (40, 0, 65534)
    got = {(n, v) for n, _, v in parse(thread[1][2])}  # type: ignore[arg-type]
    assert got == {
        (1, 1001), (3, 1001), (5, 1001), (7, 1001), (2, 1002), (4, 1002), (6, 1002), (8, 1002),
        (9, 7), (13, 0), (14, 1002), (14, 5), (15, b"unconfined"),
    }  # fmt: skip


def test_the_auxv_and_the_user_namespace_change_owner(tmp_path: Path) -> None:
    auxv = [(13, 0, v) for v in (6, 4096, 11, 65534, 12, 65534, 13, 65534, 14, 65534, 23, 0)]
    mm = image(tmp_path / "mm-7.img", message((1, 0, 4096), *auxv))
    extent = message((1, 0, 65534), (2, 0, 65534), (3, 0, 1))
    root = message((1, 0, 0), (2, 0, 100000), (3, 0, 1))
    ns = image(tmp_path / "userns-14.img", message((1, 2, root), (1, 2, extent), (2, 2, extent)))

    assert rewrite_image(mm, OWNERS) and rewrite_image(ns, OWNERS)

    values = [v for n, _, v in parse(entries(mm)[0]) if n == 13]
    assert values == [6, 4096, 11, 1001, 12, 1001, 13, 1002, 14, 1002, 23, 0]
    maps = parse(entries(ns)[0])
    assert maps[0] == (1, 2, root)  # root inside stays the shared container root
    assert parse(maps[1][2]) == [(1, 0, 1001), (2, 0, 1001), (3, 0, 1)]  # type: ignore[arg-type]
    assert parse(maps[2][2]) == [(1, 0, 1002), (2, 0, 1002), (3, 0, 1)]  # type: ignore[arg-type]


def test_other_images_are_left_alone(tmp_path: Path) -> None:
    pages = tmp_path / "pages-1.img"
    pages.write_bytes(b"\x00" * 64)
    assert not rewrite_image(pages, OWNERS)
    assert pages.read_bytes() == b"\x00" * 64


def test_a_truncated_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "core-1.img"
    path.write_bytes(b"MAGICMAG" + struct.pack("<I", 50) + b"\x08\x01")
    with pytest.raises(ImageError, match="ends inside an entry"):
        rewrite_image(path, OWNERS)
