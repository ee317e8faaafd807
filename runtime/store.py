"""The kernel store: the only code that knows ``kernels/<id>/record.json``.

Two locks per kernel, both ``flock`` on files of its folder, so they hold across
processes (the Jupyter server, the CLI, a later daemon) and go with a holder that
dies:

- ``record.lock``, held for the moment of one read-modify-write (:meth:`update`).
  Every change of a record goes through it, so two writers never lose each
  other's change: a limit changed from the CLI while a snapshot runs stays.
- ``lock``, held for a whole snapshot, restore or reset (:meth:`exclusive`), so
  those of one kernel run one at a time.

A kernel taken from a warm pool (``pool.py``) was made under an id of its own
before Jupyter chose one: ``aliases/<jupyter id>`` names it, and :meth:`load`,
:meth:`exists` and :meth:`resolve` follow it. Everything else is named by the
kernel's own id (``KernelRecord.kernel_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

from sandbox_kernel.errors import ConfigError, KernelNotFound

from . import paths
from .bundle import CONTAINER_ROOT
from .fsutil import aflocked, flocked, give, read_json, write_json
from .record import KernelRecord

T = TypeVar("T")


def kernel_dir(kernel_id: str) -> Path:
    """The folder of kernel ``kernel_id``.

    Raises:
        ConfigError: the id could name another folder.
    """
    if not kernel_id or "/" in kernel_id or kernel_id.startswith(".") or "\0" in kernel_id:
        raise ConfigError("kernel id", kernel_id, "is not valid; use the id Jupyter gave")
    return paths.kernels_dir() / kernel_id


def private_folder(folder: Path) -> None:
    """Make ``folder`` if needed, closed to every host user but root.

    Below it are other tenants' records, bundles, logs and connection files. It is
    root's, with group :data:`CONTAINER_ROOT` allowed to pass through (0710): runc
    and CRIU reach a kernel's bind sources from inside its user namespace, whose
    root is that host id, and no host user has it (``prepare`` refuses it as a
    kernel's uid or gid). A process that is not root (the unit tests) keeps its own
    ownership.
    """
    folder.mkdir(mode=0o700, exist_ok=True)
    give(folder, 0, CONTAINER_ROOT)
    os.chmod(folder, 0o710)


def aliases_dir() -> Path:
    """``aliases/<jupyter id>``: the kernel id each claimed pool kernel was made under."""
    return paths.state_dir() / "aliases"


class KernelStore:
    """Records of kernels, and their locks. Keeps nothing in memory."""

    def kernel_dir(self, kernel_id: str) -> Path:
        """See :func:`kernel_dir`."""
        return kernel_dir(kernel_id)

    def exists(self, kernel_id: str) -> bool:
        """Whether kernel ``kernel_id`` (or the kernel it is an alias of) has a record."""
        return self.has_record(kernel_dir(self.resolve(kernel_id)))

    def resolve(self, kernel_id: str) -> str:
        """The id kernel ``kernel_id`` was made under: itself, or for an alias (a
        pool kernel's Jupyter id) the pool kernel's.

        Raises:
            ConfigError: the id could name another folder.
        """
        if self.has_record(kernel_dir(kernel_id)):
            return kernel_id
        try:
            target = read_json(aliases_dir() / kernel_id).get("kernel_id")
        except (OSError, ValueError, AttributeError):
            return kernel_id
        if not isinstance(target, str):
            return kernel_id
        kernel_dir(target)  # checks its form
        return target

    def alias(self, alias: str, kernel_id: str) -> None:
        """Make ``alias`` (a Jupyter kernel id) name kernel ``kernel_id``."""
        kernel_dir(alias)  # checks its form
        folder = aliases_dir()
        folder.mkdir(mode=0o700, exist_ok=True)
        write_json(folder / alias, {"kernel_id": kernel_id})

    def unalias(self, alias: str) -> None:
        """Remove ``alias`` (gone already: fine)."""
        kernel_dir(alias)  # checks its form
        with contextlib.suppress(FileNotFoundError):
            (aliases_dir() / alias).unlink()

    def aliases(self) -> dict[str, str]:
        """Every alias and the id it names (``gc`` removes those of no kernel)."""
        found: dict[str, str] = {}
        if aliases_dir().is_dir():
            for entry in aliases_dir().iterdir():
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    found[entry.name] = str(read_json(entry).get("kernel_id"))
        return found

    @staticmethod
    def has_record(folder: Path) -> bool:
        """Whether the kernel folder ``folder`` holds a record (gc asks of every
        folder, whatever its name)."""
        return (folder / "record.json").exists()

    def load(self, kernel_id: str) -> KernelRecord:
        """The record of kernel ``kernel_id``, or of the kernel it is an alias of.

        Raises:
            KernelNotFound: the runtime has no such kernel.
        """
        try:
            data = read_json(kernel_dir(self.resolve(kernel_id)) / "record.json")
        except FileNotFoundError:
            raise KernelNotFound(kernel_id) from None
        return KernelRecord.from_dict(data)

    def records(self) -> list[KernelRecord]:
        """Records of every kernel, oldest first; unreadable ones are left out (see
        :meth:`scan`)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[KernelRecord], list[str]]:
        """One pass over every kernel folder: the records, oldest first, and the ids
        of kernels whose ``record.json`` exists but cannot be read as a record
        (written by a later version, or damaged), which nothing may treat as gone."""
        found, unreadable = [], []
        if paths.kernels_dir().is_dir():
            for entry in paths.kernels_dir().iterdir():
                try:
                    found.append(KernelRecord.from_dict(read_json(entry / "record.json")))
                except FileNotFoundError:
                    continue
                except (OSError, ValueError, KeyError, TypeError):
                    unreadable.append(entry.name)
        return sorted(found, key=lambda r: r.created), unreadable

    def layers_in_use(self) -> set[str]:
        """The image layers every kernel's record names, readable records or not."""
        used: set[str] = set()
        if paths.kernels_dir().is_dir():
            for entry in paths.kernels_dir().iterdir():
                with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                    used.update(read_json(entry / "record.json").get("layers", []))
        return used

    def create(self, record: KernelRecord) -> None:
        """Write a new kernel's first record; its folder exists already."""
        with flocked(kernel_dir(record.kernel_id) / "record.lock"):
            write_json(kernel_dir(record.kernel_id) / "record.json", record.to_dict())

    def update(self, kernel_id: str, change: Callable[[KernelRecord], T]) -> T:
        """Read the record, let ``change`` modify it, write it back; return what
        ``change`` returned. Under the record's lock: no other change is lost.
        Blocks for the moment another update takes; async code runs it in a thread.

        Raises:
            KernelNotFound: no such kernel. Anything ``change`` raises is raised and
                nothing is written.
        """
        folder = kernel_dir(kernel_id)
        if not folder.is_dir():
            raise KernelNotFound(kernel_id)
        with flocked(folder / "record.lock"):
            record = self.load(kernel_id)
            result = change(record)
            write_json(folder / "record.json", record.to_dict())
        return result

    async def aupdate(self, kernel_id: str, change: Callable[[KernelRecord], T]) -> T:
        """:meth:`update` off the event loop."""
        return await asyncio.to_thread(self.update, kernel_id, change)

    @contextlib.asynccontextmanager
    async def exclusive(self, kernel_id: str) -> AsyncIterator[None]:
        """Hold kernel ``kernel_id``'s operation lock: one snapshot, restore or reset
        of it at a time, across processes.

        Raises:
            KernelNotFound: no such kernel.
        """
        folder = kernel_dir(kernel_id)
        if not folder.is_dir():
            raise KernelNotFound(kernel_id)
        async with aflocked(folder / "lock"):
            yield

    def busy(self, kernel_id: str) -> contextlib.AbstractContextManager[int | None]:
        """Try the operation lock without waiting: yields None while a snapshot,
        restore or reset holds it."""
        return flocked(kernel_dir(kernel_id) / "lock", blocking=False)
