"""Warm pools: the size check, the key, and the aliases a claim writes (``pool.py``,
``store.py``). Claims of real kernels are in tests/integration/test_pool.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sandbox_kernel.errors import ConfigError, KernelNotFound
from sandbox_kernel.runtime.callers import Caller
from sandbox_kernel.runtime.hostpath import Identity
from sandbox_kernel.runtime.lifecycle import KernelConfig
from sandbox_kernel.runtime.limits import Limits
from sandbox_kernel.runtime.pool import POOL_MAX, check_pool, pool_key
from sandbox_kernel.runtime.record import KernelRecord
from sandbox_kernel.runtime.store import KernelStore, aliases_dir


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KernelStore:
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(tmp_path))
    return KernelStore()


def record(kernel_id: str, **extra: object) -> KernelRecord:
    limits = Limits.parse(memory="1G")
    return KernelRecord(
        kernel_id=kernel_id, container_id=f"sk-{kernel_id}", hostname="h", image="host",
        layers=[], executable="/usr/bin/python3", python_prefixes=[], prefix_identities=[],
        cwd="/w", cwd_identity=Identity(1, 2, 1000), cwd_inside="/w", limits=limits,
        ceiling=limits, network="none", index=0, kernel_ip="10.0.0.2", uid=1000, gid=1000,
        user="u", home="/home/u", created=0.0, owner={"pid": 1}, extra=dict(extra),
    )  # fmt: skip


def made(store: KernelStore, rec: KernelRecord) -> KernelRecord:
    store.kernel_dir(rec.kernel_id).mkdir(parents=True)
    store.create(rec)
    return rec


@pytest.mark.parametrize("size", [0, 1, POOL_MAX])
def test_a_pool_size_from_0_to_the_most_passes(size: int) -> None:
    assert check_pool(size) == size


@pytest.mark.parametrize("size", [-1, POOL_MAX + 1, True, "2", 1.5, None])
def test_another_pool_size_is_refused_with_its_range(size: object) -> None:
    with pytest.raises(ConfigError, match=f"from 0 to {POOL_MAX}"):
        check_pool(size)


def test_the_pool_key_holds_owner_user_configuration_and_command() -> None:
    config = KernelConfig(
        image="host", limits=Limits.parse(memory="1G"), network="none", uid=1000, gid=1000,
        cwd="/home/u", executable="/usr/bin/python3",
    )  # fmt: skip
    caller = Caller(1000, 1000, 4242, ())
    key = pool_key(caller, config, "spec")
    assert key == pool_key(caller, config, "spec")
    others = [
        pool_key(Caller(1000, 1000, 4343, ()), config, "spec"),  # another server
        pool_key(Caller(1001, 1001, 4242, ()), config, "spec"),  # another user
        pool_key(caller, dataclasses.replace(config, cwd="/home/u/x"), "spec"),
        pool_key(caller, dataclasses.replace(config, limits=Limits.parse(memory="2G")), "spec"),
        pool_key(caller, dataclasses.replace(config, network="egress"), "spec"),
        pool_key(caller, config, "another kernelspec command"),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_an_alias_leads_to_the_pool_kernel(store: KernelStore) -> None:
    made(store, record("pool-1", alias="jupyter-1"))
    store.alias("jupyter-1", "pool-1")
    assert store.resolve("jupyter-1") == "pool-1"
    assert store.exists("jupyter-1")
    loaded = store.load("jupyter-1")
    assert loaded.kernel_id == "pool-1" and loaded.public_id == "jupyter-1"
    assert store.aliases() == {"jupyter-1": "pool-1"}
    assert (aliases_dir().stat().st_mode & 0o777) == 0o700
    store.unalias("jupyter-1")
    with pytest.raises(KernelNotFound):
        store.load("jupyter-1")
    store.unalias("jupyter-1")  # gone already: fine


def test_a_kernels_own_record_wins_over_an_alias(store: KernelStore) -> None:
    made(store, record("k1"))
    made(store, record("pool-1"))
    store.alias("k1", "pool-1")
    assert store.load("k1").kernel_id == "k1"


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", ""])
def test_an_alias_never_names_another_folder(store: KernelStore, bad: str) -> None:
    with pytest.raises(ConfigError):
        store.alias(bad, "pool-1")
    # Nor does an alias file, whoever wrote it, lead outside the kernels' folder.
    aliases_dir().mkdir(mode=0o700, exist_ok=True)
    (aliases_dir() / "j").write_text(f'{{"kernel_id": "{bad}"}}')
    with pytest.raises(ConfigError):
        store.resolve("j")


def test_a_pool_kernel_is_known_by_its_own_id_until_claimed() -> None:
    waiting = record("pool-1", pool={"key": "k", "ready": True})
    assert waiting.pooled and waiting.public_id == "pool-1"
    claimed = record("pool-1", alias="jupyter-1", claimed=True)
    assert not claimed.pooled and claimed.public_id == "jupyter-1"
    assert "jupyter-1" in claimed.describe()


def test_an_unsubscribe_may_be_called_twice(store: KernelStore) -> None:
    """jupyter_client cleans a kernel up twice when nbclient shuts it down: the
    provisioner's cleanup unsubscribes each time."""
    from sandbox_kernel.runtime.service import KernelService

    service = KernelService()
    seen: list[object] = []
    unsubscribe = service.subscribe(seen.append)
    unsubscribe()
    unsubscribe()
    service.emit({"event": "started"})
    assert seen == []
