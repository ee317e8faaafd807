"""Fake drivers for the runtime's orchestration: runc, CRIU, the volume, the
network, mounts and cgroups, in memory and plain folders, with no root.

They satisfy the Protocols of ``runtime/drivers.py`` (mypy checks the
:func:`fake_drivers` assignment), record what was asked of them, and can be told
to fail or to wait at a step. Integration tests use the real drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import CommandError, RequirementMissing
from sandbox_kernel.runtime.cgroups import Usage
from sandbox_kernel.runtime.drivers import Drivers
from sandbox_kernel.runtime.limits import Limits
from sandbox_kernel.runtime.network import Addresses

_pids = itertools.count(40000)


def _refused(what: str, container_id: str) -> CommandError:
    return CommandError(["runc", what, container_id], 1, f"fake runc: {what} refused")


@dataclass
class FakeRunc:
    """Containers as a dict: id -> {"status", "pid"}. ``fail`` names operations that
    raise CommandError; ``crash`` names those that raise :class:`Crash` (the runtime
    dies there); ``hold`` names those that wait until their event is set."""

    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    updates: list[Limits] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)
    crash: set[str] = field(default_factory=set)
    hold: dict[str, asyncio.Event] = field(default_factory=dict)
    entered: dict[str, asyncio.Event] = field(default_factory=dict)

    def state_root(self) -> Path:
        return Path("/nonexistent/runc")

    async def _step(self, what: str, container_id: str) -> None:
        self.calls.append((what, container_id))
        if what in self.hold:
            self.entered.setdefault(what, asyncio.Event()).set()
            await self.hold[what].wait()
        if what in self.crash:
            raise Crash(what)
        if what in self.fail:
            raise _refused(what, container_id)

    def _new(self, container_id: str, status: str) -> int:
        pid = next(_pids)
        self.containers[container_id] = {"status": status, "pid": pid}
        return pid

    async def create(self, container_id: str, bundle: Path, pid_file: Path) -> int:
        await self._step("create", container_id)
        assert (bundle / "config.json").is_file(), "runc create needs the bundle written"
        return self._new(container_id, "created")

    async def start(self, container_id: str) -> None:
        await self._step("start", container_id)
        self.containers[container_id]["status"] = "running"

    async def state(self, container_id: str) -> dict[str, Any] | None:
        found = self.containers.get(container_id)
        return None if found is None else {"id": container_id, **found}

    async def delete(self, container_id: str) -> None:
        await self._step("delete", container_id)
        self.containers.pop(container_id, None)

    async def update(self, container_id: str, limits: Limits, memory_swap: bool) -> None:
        await self._step("update", container_id)
        self.updates.append(limits)

    async def list_containers(self) -> list[dict[str, Any]]:
        return [{"id": cid, **c} for cid, c in self.containers.items()]

    async def pause(self, container_id: str) -> None:
        await self._step("pause", container_id)
        self.containers[container_id]["status"] = "paused"

    async def resume(self, container_id: str) -> None:
        await self._step("resume", container_id)
        self.containers[container_id]["status"] = "running"

    async def checkpoint(
        self, container_id: str, criu: str, images: Path, work: Path, env: dict[str, str]
    ) -> None:
        images.mkdir(parents=True, exist_ok=True)
        await self._step("checkpoint", container_id)
        assert self.containers[container_id]["status"] == "paused", "dumped while running"
        (images / "pages-1.img").write_bytes(b"\x01" * 8192)
        (images / "inventory.img").write_bytes(b"fake inventory")

    async def restore(
        self,
        container_id: str,
        criu: str,
        bundle: Path,
        images: Path,
        work: Path,
        pid_file: Path,
        lazy_lock: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        await self._step("restore", container_id)
        assert (images / "inventory.img").is_file(), "restored from no images"
        return self._new(container_id, "running")


class Crash(BaseException):
    """The runtime's process dies at this step (raised where a kill would strike)."""


@dataclass
class FakeCriu:
    """A CRIU that is there (``missing`` False) and dumps as root."""

    BASE_CONFIG: str = "tcp-established\n"
    missing: bool = False

    def criu_binary(self) -> str:
        if self.missing:
            raise RequirementMissing("CRIU >= 4.2", "sandbox-kernel install-criu")
        return "/fake/criu"

    def dump_command(self, uid: int, gid: int) -> tuple[str, dict[str, str], str]:
        return self.criu_binary(), {}, ""

    def restore_command(self, criu: str, cgroup: str) -> tuple[str, dict[str, str]]:
        return criu, {}

    @contextlib.asynccontextmanager
    async def _window(self) -> AsyncIterator[None]:
        yield

    def userfaultfd_window(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._window()

    def close_stale_window(self) -> bool:
        return False


@dataclass
class FakeVolume:
    """Subvolumes as plain folders below ``root``; snapshots are copies."""

    root: Path
    limits: dict[Path, int] = field(default_factory=dict)

    def volume_dir(self) -> Path:
        return self.root

    def ensure_volume(self) -> Path:
        for sub in ("", "kernels", "run", "snapshots", "bases"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.root

    def create_subvolume(self, path: Path) -> None:
        path.mkdir()

    def snapshot_subvolume(self, source: Path, target: Path, readonly: bool) -> None:
        shutil.copytree(source, target, symlinks=True)

    def delete_subvolume(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        self.limits.pop(path, None)

    def limit_subvolume(self, path: Path, size: int) -> bool:
        self.limits[path] = size
        return True

    def check_disk_size(self, disk: int | None) -> None:
        pass

    @staticmethod
    def is_subvolume(path: Path) -> bool:
        return path.is_dir()

    @staticmethod
    def compress(folder: Path) -> None:
        pass


@dataclass
class FakeNetwork:
    """Addresses from a counter; attaching records the pid."""

    VETH_PREFIX: str = "skv"
    held: dict[int, str] = field(default_factory=dict)
    attached: list[int] = field(default_factory=list)

    def reserve_index(self, kernel_id: str) -> int:
        index = next(i for i in itertools.count(1) if i not in self.held)
        self.held[index] = kernel_id
        return index

    def release_index(self, index: int) -> None:
        self.held.pop(index, None)

    def reservations(self) -> dict[int, str]:
        return dict(self.held)

    async def remove_stale_veth(self, addr: Addresses) -> None:
        pass

    async def attach(self, pid: int, addr: Addresses, egress: bool) -> None:
        self.attached.append(pid)

    async def attach_host(self, addr: Addresses, egress: bool) -> None:
        pass

    def restore_script(self, addr: Addresses, egress: bool) -> str:
        return "#!/bin/sh\n"

    async def allow_egress(self, veth: str) -> None:
        pass

    async def destroy(self, addr: Addresses, egress: bool) -> None:
        pass

    async def delete_veth(self, veth: str) -> None:
        pass

    async def delete_netns(self, netns: str) -> None:
        pass

    def leftover_namespaces(self) -> list[str]:
        return []

    def leftover_veths(self) -> list[str]:
        return []


@dataclass
class FakeMounts:
    """Mount points as a set of targets."""

    points: set[Path] = field(default_factory=set)

    def mount_overlay(self, target: Path, lower: Sequence[Path], upper: Path, work: Path) -> None:
        assert upper.is_dir() and work.is_dir(), f"overlay of a missing layer: {upper}"
        self.points.add(target)

    def bind(self, source: Path, target: Path) -> None:
        assert source.exists(), f"bind of a missing source: {source}"
        self.points.add(target)

    def unmount(self, target: Path) -> None:
        self.points.discard(target)

    def mounts_under(self, prefix: Path) -> list[Path]:
        found = [p for p in self.points if p.is_relative_to(prefix)]
        return sorted(found, key=lambda p: len(p.parts), reverse=True)


@dataclass
class FakeCgroups:
    """No cgroups; ``use`` is what :meth:`usage` reports."""

    use: Usage | None = None

    def usage(self, rel: str) -> Usage | None:
        return self.use

    def frozen(self, rel: str) -> bool:
        return False

    def swap_limit_supported(self) -> bool:
        return True

    def hierarchies(self) -> list[Path]:
        return []

    def leftover_cgroups(self, parent: str) -> list[Path]:
        return []

    def remove_cgroup(self, path: Path, timeout: float = 5.0) -> None:
        pass


@dataclass
class Fakes:
    """One set of fake drivers, and the :class:`Drivers` made of them."""

    runc: FakeRunc
    criu: FakeCriu
    volume: FakeVolume
    network: FakeNetwork
    mounts: FakeMounts
    cgroups: FakeCgroups

    @property
    def drivers(self) -> Drivers:
        return Drivers(
            runc=self.runc, criu=self.criu, volume=self.volume, network=self.network,
            mounts=self.mounts, cgroups=self.cgroups,
        )  # fmt: skip


def fake_drivers(volume_root: Path) -> Fakes:
    """A fresh set of fakes whose volume lives in ``volume_root``."""
    return Fakes(
        FakeRunc(), FakeCriu(), FakeVolume(volume_root), FakeNetwork(), FakeMounts(),
        FakeCgroups(),
    )  # fmt: skip
