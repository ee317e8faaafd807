"""Content-addressed, read-only filesystem layers and the images made of them.

A layer is a folder under ``layers/sha256-<hex>/`` whose name is the digest of its
whole tree (paths, types, modes, owners, link targets and file contents). Two kernels
that use the same layer share one copy, read-only, as an overlay lower layer.

An image is a named, ordered list of layers in ``images/<name>.json``. The built-in
image ``host`` is a read-only view of this machine's system: the runtime adds bind
mounts of /usr and of the kernel's Python environment on top of its one layer.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from sandbox_kernel.errors import ConfigError, ImageNotFound

from . import paths
from .fsutil import fsync_dir, read_json, write_json

HOST_IMAGE = "host"

#: Entries of the host's /etc that a Python program and its libraries read.
#: passwd, group, hosts, hostname and resolv.conf are made per kernel instead.
HOST_ETC = (
    "alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf",
    "debian_version", "ethertypes", "fonts", "gai.conf", "host.conf", "inputrc",
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "magic", "mailcap",
    "mime.types", "nsswitch.conf", "os-release", "profile", "protocols", "rpc",
    "services", "ssl", "timezone",
)  # fmt: skip
#: Files each kernel gets its own copy of, bind-mounted over these mount points.
PER_KERNEL_ETC = ("passwd", "group", "hosts", "hostname", "resolv.conf")
#: Top-level names that are symlinks into /usr on merged-/usr systems.
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_DIRS = {
    "usr": 0o755, "etc": 0o755, "home": 0o755, "root": 0o700, "run": 0o755,
    "run/sandbox": 0o755, "proc": 0o555, "sys": 0o555, "dev": 0o755, "mnt": 0o755,
    "opt": 0o755, "srv": 0o755, "var": 0o755, "var/lib": 0o755, "var/cache": 0o755,
    "var/log": 0o755, "tmp": 0o1777, "var/tmp": 0o1777,
}  # fmt: skip


def digest_tree(root: Path) -> str:
    """The sha256 of a whole tree: each entry's path, type, mode, owner and content."""
    h = hashlib.sha256()
    for entry in _walk(root):
        st = entry.lstat()
        rel = entry.relative_to(root).as_posix()
        h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}:{st.st_gid}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(entry).encode())
        elif stat.S_ISREG(st.st_mode):
            with open(entry, "rb") as handle:
                h.update(hashlib.file_digest(handle, "sha256").digest())
        h.update(b"\n")
    return f"sha256-{h.hexdigest()}"


def _walk(root: Path) -> Iterator[Path]:
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            yield base / name


def layer_path(digest: str) -> Path:
    """Where the layer ``digest`` lives (it may not exist)."""
    return paths.layers_dir() / digest


def commit_layer(tree: Path) -> str:
    """Move the finished tree ``tree`` into the layer store; return its digest.

    ``tree`` must be on the store's filesystem. If the store already has an equal
    layer, ``tree`` is deleted and the existing layer is shared.
    """
    digest = digest_tree(tree)
    target = layer_path(digest)
    if target.exists():
        shutil.rmtree(tree)
        return digest
    try:
        os.rename(tree, target)
    except OSError as e:
        # Another process committed the same layer between the check and the
        # rename (ten kernels starting at once build the same mount-point layer).
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
            raise
        shutil.rmtree(tree)
        return digest
    fsync_dir(target.parent)
    return digest


def new_layer_tree() -> Path:
    """An empty folder inside the store to build a layer in, then pass to commit."""
    paths.layers_dir().mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=paths.layers_dir(), prefix=".building-"))


def build_host_layer() -> str:
    """Build (or find) the one layer of the ``host`` image and return its digest.

    The layer holds the standard folders, the merged-/usr symlinks exactly as the host
    has them, empty mount points for the per-kernel /etc files, and copies of the
    parts of the host's /etc listed in :data:`HOST_ETC`.
    """
    tree = new_layer_tree()
    try:
        for rel, mode in _DIRS.items():
            (tree / rel).mkdir(parents=True, exist_ok=True)
            os.chmod(tree / rel, mode)
        for name in MERGED_USR:
            host = Path("/") / name
            if host.is_symlink():
                (tree / name).symlink_to(os.readlink(host))
        for name in HOST_ETC:
            src = Path("/etc") / name
            dst = tree / "etc" / name
            if src.is_symlink():
                dst.symlink_to(os.readlink(src))
            elif src.is_dir():
                shutil.copytree(src, dst, symlinks=True)
            elif src.is_file():
                shutil.copy2(src, dst)
        for name in PER_KERNEL_ETC:
            (tree / "etc" / name).touch(0o644)
        return commit_layer(tree)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        raise


def mountpoint_layer(points: Iterable[Path]) -> str:
    """:func:`build_mountpoint_layer`, remembered per process for the same points."""
    key = tuple(sorted({str(p) for p in points}))
    digest = _remembered_mountpoint_layer(key)
    if not layer_path(digest).is_dir():  # removed by gc since
        _remembered_mountpoint_layer.cache_clear()
        digest = _remembered_mountpoint_layer(key)
    return digest


@functools.lru_cache(maxsize=256)
def _remembered_mountpoint_layer(points: tuple[str, ...]) -> str:
    return build_mountpoint_layer(Path(p) for p in points)


def build_mountpoint_layer(points: Iterable[Path]) -> str:
    """A layer of empty folders where the runtime bind-mounts host folders.

    Stacked above the image's layers, so runc never has to create mount points in
    the kernel's writable layer. Each folder keeps its host mode (``/tmp`` stays
    1777) plus read and search for everyone, so the kernel's user can reach what is
    mounted below it.
    """
    tree = new_layer_tree()
    try:
        for point in points:
            rel = point.relative_to("/")
            for parent in [*reversed(rel.parents[:-1]), rel]:
                (tree / parent).mkdir(exist_ok=True)
                os.chmod(tree / parent, _mountpoint_mode(Path("/") / parent))
        return commit_layer(tree)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        raise


def _mountpoint_mode(host_path: Path) -> int:
    try:
        mode = stat.S_IMODE(host_path.stat().st_mode)
    except OSError:
        mode = 0o755
    return mode | 0o755


def image_names() -> list[str]:
    """Every image the runtime can start kernels from, ``host`` first."""
    found = sorted(p.stem for p in paths.images_dir().glob("*.json"))
    return [HOST_IMAGE, *[n for n in found if n != HOST_IMAGE]]


def check_image_name(name: str) -> str:
    """Validate an image name for use in a kernelspec.

    Raises:
        ConfigError: the name has characters other than letters, digits, ``.-_``.
        ImageNotFound: no image of that name exists.
    """
    # ASCII only: str.isalnum() also takes letters and digits of every other script.
    if (
        not name
        or not name.isascii()
        or not all(c.isalnum() or c in ".-_" for c in name)
        or name.startswith(".")
    ):
        raise ConfigError("image name", name, "is not valid; use letters, digits, '.', '-', '_'")
    if name not in image_names():
        raise ImageNotFound(name, image_names())
    return name


def image_layers(name: str, refresh: bool = False) -> list[str]:
    """The layer digests of image ``name``, topmost first, building ``host`` if needed.

    Raises:
        ImageNotFound: no such image, or one of its layers is gone.
    """
    record = paths.images_dir() / f"{name}.json"
    if name == HOST_IMAGE and (refresh or not record.exists()):
        paths.images_dir().mkdir(parents=True, exist_ok=True)
        write_json(record, {"name": name, "layers": [build_host_layer()], "created": time.time()})
    if not record.exists():
        raise ImageNotFound(name, image_names())
    layers: list[str] = read_json(record)["layers"]
    missing = [d for d in layers if not layer_path(d).is_dir()]
    if missing and name == HOST_IMAGE:
        return image_layers(name, refresh=True)
    if missing:
        raise ImageNotFound(f"{name} (its layer {missing[0]} is gone)", image_names())
    return layers
