"""Classes: a teacher's base snapshot, under a name, with a kernelspec for the students.

``sandbox-kernel class publish NAME --from SNAPSHOT`` (or ``%container class publish``)
makes a base of the snapshot (see ``bases.py``), records it as class ``NAME``'s
current base in ``classes/NAME.json`` and writes the kernelspec ``class-NAME``, whose
kernels carry the class's name. Such a kernel starts from the class's *current* base
at every start, restarts included, and a reset takes it back there: publishing
again replaces the base for the next start or reset, never under a running kernel.
The base a running kernel came from is kept until no kernel uses it.

A base holds a process of the teacher's kernel, restored as it was, user included:
it fits kernels that run as the same user (a root Jupyter server's kernels, or the
teacher's own). A kernel of another user starts cold and its log says why (see
``lifecycle.fitting_base``).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError

from . import bases, paths
from .fsutil import read_json, write_json

#: A class's name: it becomes part of a kernelspec's name and a file's name.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}", re.ASCII)
#: Where class kernelspecs are written: a folder every Jupyter on the machine reads.
DEFAULT_KERNELS = "/usr/local/share/jupyter/kernels"
#: The provisioner's name in a kernelspec (``sandbox_kernel.kernelspec``).
PROVISIONER_NAME = "sandbox-provisioner"


def check_name(name: object) -> str:
    """``name`` if it is a class name.

    Raises:
        ConfigError: it is not.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            "class name", name,
            "is not valid; use up to 32 lowercase letters, digits and '-', e.g. intro-2026",
        )  # fmt: skip
    return name


def kernelspec_name(name: str) -> str:
    """The name of class ``name``'s kernelspec."""
    return f"class-{name}"


def kernels_folder() -> Path:
    """Where class kernelspecs go: ``$SANDBOX_KERNEL_CLASS_KERNELS``, else the
    system-wide folder of every Jupyter on the machine."""
    return Path(os.environ.get("SANDBOX_KERNEL_CLASS_KERNELS", DEFAULT_KERNELS))


def classes_dir() -> Path:
    return paths.state_dir() / "classes"


def load(name: str) -> dict[str, Any]:
    """Class ``name``'s meta: ``name``, ``owner_uid``, ``base``, ``snapshot``,
    ``display_name``, ``published``, ``kernelspec``.

    Raises:
        ConfigError: there is no such class.
    """
    try:
        meta: dict[str, Any] = read_json(classes_dir() / f"{check_name(name)}.json")
    except FileNotFoundError:
        raise ConfigError(
            "class", name, "does not exist; `sandbox-kernel class publish NAME --from SNAPSHOT`"
        ) from None
    return meta


def listing() -> list[dict[str, Any]]:
    """Every class's meta, by name."""
    folder = classes_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        if _NAME_RE.fullmatch(path.stem):
            found.append(read_json(path))
    return found


def current_base(name: str) -> str:
    """The id of class ``name``'s current base.

    Raises:
        ConfigError: no such class.
    """
    base: str = load(name)["base"]
    return base


def publish(
    name: str, owner_uid: int, snapshot_owner: str, snapshot: str, display_name: str = ""
) -> tuple[dict[str, Any], str | None]:
    """Make class ``name``'s base from live snapshot ``snapshot`` of ``snapshot_owner``
    and record it; return (the class's meta, the base it replaced or None). Whether
    the caller may is the service's to check.

    Raises:
        ConfigError: a bad name, or a snapshot of files only.
        SnapshotNotFound, SnapshotCorrupt: the snapshot is missing or damaged.
    """
    check_name(name)
    base = bases.make_base(snapshot_owner, snapshot)
    try:
        old = load(name)
    except ConfigError:
        old = {}
    before: str | None = old.get("base")
    # A replaced base stays while kernels use it (see retire_unused).
    retired = set(old.get("retired", [])) | ({before} if before else set())
    retired.discard(base["id"])
    meta = {
        # An admin who publishes another's class again leaves it theirs.
        "name": name, "owner_uid": old.get("owner_uid", owner_uid), "base": base["id"],
        "snapshot": snapshot, "snapshot_owner": snapshot_owner,
        "display_name": display_name or f"{name} (class)", "published": time.time(),
        "kernelspec": kernelspec_name(name), "retired": sorted(retired),
    }  # fmt: skip
    folder = classes_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    write_json(folder / f"{name}.json", meta)
    return meta, before if before != base["id"] else None


def retire_unused(used: set[str], dry_run: bool = False) -> list[str]:
    """Delete the classes' replaced bases that no kernel in ``used`` (base ids of
    every kernel record) starts from any more, and users' copies of bases that
    are no class's now and that no kernel uses; return what was deleted."""
    copies = bases.listing(copies=True)
    origin: dict[str, str] = {m["id"]: m.get("derived_from") or "" for m in copies}
    # A base is in use while a kernel runs on it or on a user's copy of it.
    used = used | {origin[b] for b in used if origin.get(b)}
    removed = []
    current = set()
    for meta in listing():
        current.add(meta["base"])
        kept = []
        for base_id in meta.get("retired", []):
            if base_id in used or base_id == meta["base"]:
                kept.append(base_id)
                continue
            removed.append(f"base {base_id}, replaced in class {meta['name']}")
            if not dry_run and base_id in origin:
                bases.delete(base_id)
        if not dry_run and kept != meta.get("retired", []):
            write_json(classes_dir() / f"{meta['name']}.json", {**meta, "retired": kept})
    # Users' copies of bases no class uses any more, that no kernel runs on.
    for meta in copies:
        source = meta.get("derived_from")
        if source and source not in current and meta["id"] not in used:
            removed.append(f"base {meta['id']}, a user's copy of base {source}")
            if not dry_run:
                bases.delete(meta["id"])
    return removed


def kernelspec(
    meta: dict[str, Any], base: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """Class ``meta``'s ``kernel.json``: the base's Python, the provisioner with
    ``config`` (limits, network), the class's name and its current base. The user
    is left to the server (a root server's default user is the base's in the
    classroom set-up; through the daemon each user's kernel runs as them)."""
    argv = [base["executable"], "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    provisioner = {
        **config, "image": base["image"], "base": meta["base"], "class_name": meta["name"],
    }  # fmt: skip
    return {
        "argv": argv,
        "display_name": meta["display_name"],
        "language": "python",
        "metadata": {
            "debugger": True,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": provisioner},
        },
    }


def write_kernelspec(meta: dict[str, Any], spec: dict[str, Any]) -> Path:
    """Write class ``meta``'s kernelspec into :func:`kernels_folder` (readable by
    every user, so every user's Jupyter lists it); return its folder."""
    folder = kernels_folder() / kernelspec_name(check_name(meta["name"]))
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    write_json(folder / "kernel.json", spec, mode=0o644)
    return folder


def remove_kernelspec(name: str) -> None:
    """Remove class ``name``'s kernelspec, if written."""
    folder = kernels_folder() / kernelspec_name(check_name(name))
    (folder / "kernel.json").unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
