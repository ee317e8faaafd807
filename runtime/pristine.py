"""Pristine bases: every start of a kernelspec without a base is a restore.

The first start of a kernel configuration (image, Python environment, user, launch
command...) makes a *pristine base*: a template kernel of the same configuration
starts cold in an empty folder, and once its ``%container`` magic is up, idle and
before any cell, it is snapshotted and the snapshot becomes a base
(``bases.make_base``). That start, and every later one of the same configuration,
restores the base instead of starting Python: the process takes its own key,
hostname and execution count as any kernel from a base does (``magics/handoff.py``).

It is keyed by a fingerprint of what the process depends on (:func:`inputs`):
the image's layers, the Python environment's ``site-packages`` folders (a
``pip install`` changes them), this package's code, the user, the network mode,
the size of /dev/shm, the launch command and its environment. Another fingerprint
makes another base; ``gc`` removes those whose environment has changed since.

A kernel's working folder is its own: the template ran in :func:`template_cwd`,
and the CRIU images a kernel restores are a copy whose mount and open paths of
that folder name the kernel's own instead (:func:`relocate`). The handoff then
points ``sys.path``, ``_dh`` and ``PWD`` at it and takes the launch's environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from . import bases, layers, paths, snapshots
from .bundle import shm_options
from .criu_images import ImageError, encode, map_entries, parse
from .pyenv import package_dirs
from .record import KernelRecord

#: The names of the snapshots pristine bases are made from (gone once made).
SNAPSHOT_PREFIX = snapshots.PRISTINE_PREFIX
#: Launch variables that differ from one notebook to the next: the handoff applies
#: them, so they are not part of the fingerprint.
PER_LAUNCH_ENV = frozenset({"JPY_SESSION_NAME"})


def template_cwd() -> Path:
    """The empty folder a template kernel runs in (root's; nothing is ever written)."""
    # Beside the state folder, not in it: no kernel may work inside the state.
    state = paths.state_dir()
    folder = state.with_name(f"{state.name}-pristine-cwd")
    folder.mkdir(mode=0o755, exist_ok=True)
    if folder.is_symlink() or not folder.is_dir():
        raise OSError(f"{folder} is not a folder")
    os.chmod(folder, 0o755)
    return folder


def _site_packages(prefix: Path) -> list[Path]:
    found: list[Path] = []
    for lib in ("lib", "lib64"):
        found += sorted((prefix / lib).glob("python*/site-packages"))
    return found


def environment_state(prefixes: list[str]) -> list[list[Any]]:
    """What changes when the Python environment does: each prefix's
    ``site-packages`` folders (their mtime changes with every package installed or
    removed) and its ``pyvenv.cfg``."""
    state: list[list[Any]] = []
    for prefix in prefixes:
        for path in [*_site_packages(Path(prefix)), Path(prefix) / "pyvenv.cfg"]:
            try:
                st = path.stat()
            except OSError:
                continue
            state.append([str(path), st.st_ino, st.st_mtime_ns])
    return state


def package_state() -> str:
    """A digest of this package's code (what the template kernel imported)."""
    h = hashlib.sha256()
    for folder in package_dirs():
        for path in sorted(folder.rglob("*.py")):
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def inputs(record: KernelRecord, argv: list[str], env: dict[str, str], criu: str) -> dict[str, Any]:
    """What a pristine base for kernel ``record`` launched with ``argv`` and ``env``
    depends on (see the module's docstring)."""
    return {
        "image": record.image,
        "image_layers": list(record.layers[1:]),
        "executable": record.executable,
        "python_prefixes": list(record.python_prefixes),
        "environment": environment_state(record.python_prefixes),
        "package": package_state(),
        "uid": record.uid,
        "gid": record.gid,
        "network": record.network,
        "shm": shm_options(record.shm, record.limits.memory),
        "argv": list(argv),
        "env": {k: v for k, v in sorted(env.items()) if k not in PER_LAUNCH_ENV},
        "criu": criu,
    }


def fingerprint(data: dict[str, Any]) -> str:
    """The key of a pristine base made from ``data`` (see :func:`inputs`)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def find(key: str) -> dict[str, Any] | None:
    """The pristine base of fingerprint ``key``, or None."""
    for meta in bases.listing(pristine=True):
        if (meta.get("pristine") or {}).get("key") == key and not is_broken(meta):
            return meta
    return None


def is_broken(meta: dict[str, Any]) -> bool:
    """Whether a layer the base's kernels mount is gone (``gc`` removes it then)."""
    return not all(layers.layer_path(d).is_dir() for d in meta.get("layers", []))


def is_stale(meta: dict[str, Any]) -> bool:
    """Whether a pristine base's environment or this package changed since it was
    made: no start will ever use it again."""
    made = (meta.get("pristine") or {}).get("inputs")
    if not isinstance(made, dict):
        return False
    now = {**made, "environment": environment_state(made.get("python_prefixes", []))}
    now["package"] = package_state()
    return bool(fingerprint(now) != meta["pristine"]["key"])


# ---- a kernel's own working folder ---------------------------------------------------

#: mnt_entry: mountpoint (7), ext_key (18); file_entry.reg (3) -> reg_file_entry.name (6).
_MOUNTPOINT, _EXT_KEY, _REG, _NAME = 7, 18, 3, 6


def _moved(path: str, old: str, new: str) -> str | None:
    if path == old:
        return new
    if path.startswith(old.rstrip("/") + "/"):
        return new.rstrip("/") + path[len(old.rstrip("/")) :]
    return None


def _rewrite_fields(data: bytes, numbers: tuple[int, ...], old: str, new: str) -> tuple[bytes, int]:
    fields, changed = [], 0
    for n, w, v in parse(data):
        if n in numbers and w == 2 and isinstance(v, bytes):
            moved = _moved(v.decode(errors="surrogateescape"), old, new)
            if moved is not None:
                v, changed = moved.encode(errors="surrogateescape"), changed + 1
        fields.append((n, w, v))
    return (encode(fields), changed) if changed else (data, 0)


def relocated(base_dir: Path, old: str, new: str) -> Path:
    """The images of the pristine base in ``base_dir``, whose template ran in
    ``old``, relocated to working folder ``new`` (see :func:`relocate`); made once
    per folder and kept with the base (deleted with it): every start in that folder
    uses them.

    Raises:
        ImageError: see :func:`relocate`.
        OSError: they could not be written.
    """
    target = base_dir / "moved" / hashlib.sha256(new.encode()).hexdigest()[:16]
    if (target / "files.img").exists():
        return target
    target.parent.mkdir(mode=0o700, exist_ok=True)
    draft = Path(tempfile.mkdtemp(dir=target.parent, prefix=".moving-"))
    try:
        relocate(base_dir / "criu", draft, old, new)
        try:
            draft.rename(target)
        except OSError:
            if not (target / "files.img").exists():
                raise
            shutil.rmtree(draft)  # made by another start meanwhile
    except BaseException:
        shutil.rmtree(draft, ignore_errors=True)
        raise
    return target


def relocate(images: Path, target: Path, old: str, new: str) -> Path:
    """A copy in ``target`` of CRIU ``images`` in which the working folder ``old``
    is mounted at ``new``, and the open paths under it (the processes' working
    directories) name ``new``. Images share their blocks with ``images``' (or are
    copies, on another filesystem), except the two rewritten. Returns ``target``.

    Raises:
        ImageError: the images do not mount ``old`` once, or are not what this
            code expects.
    """
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    st = images.stat()  # CRIU reads them partly from inside the kernel's user namespace
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    for file in sorted(images.iterdir()):
        # A reflink: a hard link would change the image's ctime, which its stamp
        # holds, and every start would then hash the base again (bases.verify).
        try:
            bases.clone(file, target / file.name, sync=False)
        except OSError:  # not on the volume: a plain copy
            shutil.copy2(file, target / file.name)
    mounted = sum(
        map_entries(p, lambda e: _rewrite_fields(e, (_MOUNTPOINT, _EXT_KEY), old, new))
        for p in sorted(target.glob("mountpoints-*.img"))
    )
    if mounted != 2:  # its mount point and its key, once
        raise ImageError(f"the images mount {old} {mounted // 2} times, not once")

    def file_entry(entry: bytes) -> tuple[bytes, int]:
        fields, changed = [], 0
        for n, w, v in parse(entry):
            if n == _REG and w == 2 and isinstance(v, bytes):
                v, count = _rewrite_fields(v, (_NAME,), old, new)
                changed += count
            fields.append((n, w, v))
        return (encode(fields), changed) if changed else (entry, 0)

    map_entries(target / "files.img", file_entry)
    return target
