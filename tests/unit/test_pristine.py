"""Pristine bases: the fingerprint, and relocating a base's images to a kernel's folder."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from sandbox_kernel.runtime import pristine
from sandbox_kernel.runtime.criu_images import ImageError, encode, parse

MAGIC = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def _image(path: Path, entries: list[bytes]) -> None:
    path.write_bytes(MAGIC + b"".join(struct.pack("<I", len(e)) + e for e in entries))


def _entries(path: Path) -> list[bytes]:
    data, i, out = path.read_bytes(), 8, []
    while i < len(data):
        (size,) = struct.unpack_from("<I", data, i)
        out.append(data[i + 4 : i + 4 + size])
        i += 4 + size
    return out


def _mount(mnt_id: int, point: str, key: str | None) -> bytes:
    fields = [(2, 0, mnt_id), (6, 2, b"/"), (7, 2, point.encode()), (8, 2, b"overlay")]
    if key is not None:
        fields.append((18, 2, key.encode()))
    return encode(fields)


def _reg(file_id: int, name: str) -> bytes:
    reg = encode([(1, 0, file_id), (2, 0, 0), (3, 0, 0), (5, 2, b""), (6, 2, name.encode())])
    return encode([(1, 0, 1), (2, 0, file_id), (3, 2, reg)])


def _names(path: Path) -> list[str]:
    names = []
    for entry in _entries(path):
        reg = next(v for n, w, v in parse(entry) if n == 3)
        assert isinstance(reg, bytes)
        names += [v.decode() for n, w, v in parse(reg) if n == 6 and isinstance(v, bytes)]
    return names


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "criu"
    folder.mkdir()
    _image(
        folder / "mountpoints-13.img",
        [_mount(1, "/", None), _mount(218, "/srv/template", "/srv/template"),
         _mount(219, "/srv/template-other", "/srv/template-other")],
    )  # fmt: skip
    _image(
        folder / "files.img",
        [_reg(6, "/srv/template"), _reg(7, "/srv/template/sub/f.txt"),
         _reg(8, "/usr/lib/libc.so.6"), _reg(9, "/srv/template-other")],
    )  # fmt: skip
    (folder / "pages-1.img").write_bytes(b"/srv/template" * 100)
    return folder


def test_relocate_moves_the_mount_and_the_paths_under_it(images: Path, tmp_path: Path) -> None:
    moved = pristine.relocate(images, tmp_path / "moved", "/srv/template", "/home/a b/nb")
    points = [
        {n: v for n, w, v in parse(e)} for e in _entries(moved / "mountpoints-13.img")
    ]  # fmt: skip
    assert [(p[7], p.get(18)) for p in points] == [
        (b"/", None), (b"/home/a b/nb", b"/home/a b/nb"),
        (b"/srv/template-other", b"/srv/template-other"),  # a prefix of the name only
    ]  # fmt: skip
    assert _names(moved / "files.img") == [
        "/home/a b/nb", "/home/a b/nb/sub/f.txt", "/usr/lib/libc.so.6", "/srv/template-other",
    ]  # fmt: skip
    # Everything else is copied as it is, and the base's own images are untouched.
    assert (moved / "pages-1.img").read_bytes() == (images / "pages-1.img").read_bytes()
    assert _names(images / "files.img")[0] == "/srv/template"
    assert (moved / "mountpoints-13.img.new").exists() is False


def test_relocate_refuses_images_that_do_not_mount_the_folder(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="mount /elsewhere 0 times"):
        pristine.relocate(images, tmp_path / "moved", "/elsewhere", "/home/nb")


def test_fingerprint_follows_the_environment(tmp_path: Path) -> None:
    prefix = tmp_path / "venv"
    site = prefix / "lib/python3.11/site-packages"
    site.mkdir(parents=True)
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\n")
    inputs = {"python_prefixes": [str(prefix)], "argv": ["python"]}
    made = {**inputs, "environment": pristine.environment_state([str(prefix)]),
            "package": pristine.package_state()}  # fmt: skip
    key = pristine.fingerprint(made)
    meta = {"id": "0" * 16, "pristine": {"key": key, "inputs": made}}
    assert pristine.fingerprint(dict(reversed(made.items()))) == key  # order does not count
    assert not pristine.is_stale(meta)
    (site / "tinypkg").mkdir()  # what a pip install does to the folder
    assert pristine.is_stale(meta)
    assert pristine.fingerprint({**made, "argv": ["python", "-X"]}) != key


def test_a_failed_making_is_not_tried_again_for_a_while(tmp_path: Path) -> None:
    from sandbox_kernel.runtime import pristine_make

    marker = tmp_path / "key.failed"
    assert pristine_make._recent_failure(marker) == ""
    marker.write_text("the template kernel did not load the %container magic within 60 s")
    why = pristine_make._recent_failure(marker)
    assert why == (
        "its pristine base could not be made 0 min ago: "
        "the template kernel did not load the %container magic within 60 s"
    )
    old = pristine_make.time.time() - pristine_make.RETRY_AFTER - 1
    os.utime(marker, (old, old))
    assert pristine_make._recent_failure(marker) == ""
