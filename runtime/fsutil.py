"""Durable file writes: temp file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half.

    The file is the runtime's own (mode 0600 unless ``mode`` says otherwise): records
    and metas name other tenants' folders, users and addresses. The temp file is made
    in the same directory, fsynced, renamed over ``path``,
    then the directory is fsynced. On any error the temp file is removed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    """:func:`atomic_write` of ``data`` as indented JSON."""
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path) -> Any:
    """Parse a JSON file written by :func:`write_json`."""
    return json.loads(path.read_text())
