"""The runtime's orchestration (lifecycle, snapshotting, restoring) with fake drivers.

No root, no runc, no CRIU: ``fakes.py`` stands in for them, and the state lives in
a temporary folder. What is checked is the order of the steps and what the record
says after each outcome: the cold fallback of a base, a files-only restore, a
restore cut short and finished, a snapshot that fails mid-commit, limits changed
during a snapshot, and a reset. The same paths run against real containers in
tests/integration and tests/security.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.errors import KernelNotFound
from sandbox_kernel.runtime import bases, paths, snapshots
from sandbox_kernel.runtime.fsutil import write_json
from sandbox_kernel.runtime.lifecycle import KernelConfig
from sandbox_kernel.runtime.limits import Limits
from sandbox_kernel.runtime.record import Start
from sandbox_kernel.runtime.rootfs import Rootfs, allocated_bytes, tree_bytes, tree_sizes
from sandbox_kernel.runtime.runtime import Runtime

from .fakes import Crash, Fakes, fake_drivers

CONNECTION = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4,
              "hb_port": 5, "ip": "10.0.0.2", "key": b"secret", "transport": "tcp",
              "signature_scheme": "hmac-sha256"}  # fmt: skip
LAYER = "sha256-" + "0" * 64
ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "/run/sandbox/connection.json"]


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    """Fake drivers, a state folder of the test's own, and the snapshot and base
    stores pointed at the fake volume (they call btrfs by name)."""
    state = tmp_path / "state"
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(state))
    # An image of one empty layer: building the `host` image reads all of /etc.
    paths.images_dir().mkdir(parents=True)
    write_json(paths.images_dir() / "fake.json", {"name": "fake", "layers": [LAYER]})
    (paths.layers_dir() / LAYER / "usr").mkdir(parents=True)
    made = fake_drivers(state / "volume")
    vol = made.volume
    for module in (snapshots, bases):
        monkeypatch.setattr(module, "ensure_volume", vol.ensure_volume)
        monkeypatch.setattr(module, "delete_subvolume", vol.delete_subvolume)
    monkeypatch.setattr(snapshots, "compress", vol.compress)
    monkeypatch.setattr(snapshots, "is_subvolume", vol.is_subvolume)
    monkeypatch.setattr(bases, "snapshot_subvolume", vol.snapshot_subvolume)
    monkeypatch.setattr(
        bases, "clone", lambda src, dst, sync=True: dst.write_bytes(src.read_bytes())
    )
    yield made


def make_runtime(fakes: Fakes) -> Runtime:
    drivers = fakes.drivers
    return Runtime(drivers, Rootfs(drivers, make_home=lambda executable, store, uid, gid: None))


def config(cwd: Path, base: str = "", memory: str = "1G", class_name: str = "") -> KernelConfig:
    return KernelConfig(
        image="fake", limits=Limits.parse(memory=memory, cpus="1", pids="256", disk="1G"),
        network="none", uid=os.getuid(), gid=os.getgid(), cwd=str(cwd),
        executable=sys.executable, base=base, class_name=class_name,
    )  # fmt: skip


async def started(runtime: Runtime, cwd: Path, kid: str = "k1", **kwargs: Any) -> int:
    cwd.mkdir(exist_ok=True)
    await runtime.prepare(kid, config(cwd, **kwargs))
    return await runtime.start(kid, ARGV, {"LANG": "C.UTF-8"}, CONNECTION)


def upper(runtime: Runtime, kid: str = "k1") -> Path:
    """Where the kernel's writes to its root filesystem land."""
    return runtime.rootfs.layer_dir(kid) / "root"


async def test_start_cold_and_remove_leave_nothing(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    pid = await started(runtime, tmp_path / "work")
    record = runtime.record("k1")
    assert record.start is Start.IMAGE
    assert fakes.runc.containers[record.container_id] == {"status": "running", "pid": pid}
    assert fakes.network.attached == [pid]
    assert await runtime.container_pid("k1") == pid
    await runtime.remove("k1")
    assert fakes.runc.containers == {}
    assert fakes.mounts.points == set()
    assert fakes.network.held == {}
    assert not runtime.kernel_dir("k1").exists()
    assert not runtime.rootfs.layer_dir("k1").exists()


async def test_a_base_that_fails_to_restore_starts_cold(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work", kid="donor")
    await runtime.snapshot("donor", "ready")
    base = bases.make_base(str(os.getuid()), "ready")
    fakes.runc.fail.add("restore")

    pid = await started(runtime, tmp_path / "work", kid="k1", base=base["id"])

    record = runtime.record("k1")
    assert record.start is Start.COLD
    assert record.base == base["id"]
    assert record.base_note.startswith("the base could not be restored: ")
    assert "fake runc: restore refused" in record.base_note
    assert "started cold: the base could not be restored" in runtime.log_path("k1").read_text()
    assert fakes.runc.containers[record.container_id]["pid"] == pid
    # A restart tries the base again, and falls back again, saying so.
    await runtime.stop("k1")
    await runtime.start("k1", ARGV, {}, CONNECTION)
    assert runtime.record("k1").start is Start.COLD
    assert fakes.runc.calls.count(("restore", record.container_id)) == 2


async def test_a_base_that_restores_is_used(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work", kid="donor")
    (upper(runtime, "donor") / "from-the-base").write_text("x")
    await runtime.snapshot("donor", "ready")
    base = bases.make_base(str(os.getuid()), "ready")

    await started(runtime, tmp_path / "work", kid="k1", base=base["id"])

    assert runtime.record("k1").start is Start.BASE
    assert (upper(runtime) / "from-the-base").read_text() == "x"
    assert ("restore", runtime.record("k1").container_id) in fakes.runc.calls


async def test_restarts_and_resets_of_a_class_kernel_land_on_the_base(
    fakes: Fakes, tmp_path: Path
) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work", kid="donor")
    (upper(runtime, "donor") / "from-the-base").write_text("x")
    await runtime.snapshot("donor", "ready")
    base = bases.make_base(str(os.getuid()), "ready")
    await started(runtime, tmp_path / "work", kid="k1", base=base["id"])
    cid = runtime.record("k1").container_id

    # A restart: the files the kernel wrote are gone, the base's are back.
    (upper(runtime) / "scribble").write_text("y")
    await runtime.stop("k1")
    await runtime.start("k1", ARGV, {}, CONNECTION)
    assert runtime.record("k1").start is Start.BASE
    assert not (upper(runtime) / "scribble").exists()
    assert (upper(runtime) / "from-the-base").read_text() == "x"
    assert fakes.runc.calls.count(("restore", cid)) == 2

    # A reset: the same, with no restart of the server's side.
    (upper(runtime) / "scribble").write_text("y")
    done = await runtime.reset("k1")
    assert done["to"] == "base"
    assert not (upper(runtime) / "scribble").exists()
    assert (upper(runtime) / "from-the-base").read_text() == "x"
    assert fakes.runc.calls.count(("restore", cid)) == 3

    # A pristine reset: the image's files, a cold start; the next restart is the base's.
    done = await runtime.reset("k1", pristine=True)
    assert done["to"] == "image"
    assert not (upper(runtime) / "from-the-base").exists()
    assert fakes.runc.calls.count(("restore", cid)) == 3
    await runtime.stop("k1")
    await runtime.start("k1", ARGV, {}, CONNECTION)
    assert (upper(runtime) / "from-the-base").read_text() == "x"


async def test_a_class_kernel_follows_its_classs_new_base_at_a_reset(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.runtime import classes

    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work", kid="donor")
    (upper(runtime, "donor") / "lesson").write_text("1")
    await runtime.snapshot("donor", "one")
    (upper(runtime, "donor") / "lesson").write_text("2")
    await runtime.snapshot("donor", "two")
    owner = str(os.getuid())
    first, replaced = classes.publish("intro", os.getuid(), owner, "one")
    assert replaced is None
    await started(runtime, tmp_path / "work", kid="k1", class_name="intro")
    assert runtime.record("k1").base == first["base"]
    assert (upper(runtime) / "lesson").read_text() == "1"

    second, replaced = classes.publish("intro", os.getuid(), owner, "two")
    assert replaced == first["base"] != second["base"]
    # Publishing touches no running kernel...
    assert runtime.record("k1").base == first["base"]
    assert (upper(runtime) / "lesson").read_text() == "1"
    # ... until it is reset (or restarts): then it is on the new base.
    done = await runtime.reset("k1")
    assert done["to"] == "base"
    assert runtime.record("k1").base == second["base"]
    assert (upper(runtime) / "lesson").read_text() == "2"
    # The replaced base is kept while a kernel uses it, and gc deletes it after.
    assert classes.load("intro")["retired"] == [first["base"]]
    assert bases.base_dir(first["base"]).is_dir()
    removed = await runtime.gc()
    assert f"base {first['base']}, replaced in class intro" in removed
    assert not bases.base_dir(first["base"]).exists()
    assert classes.load("intro")["retired"] == []


async def test_files_only_restore_brings_files_back_and_starts_afresh(
    fakes: Fakes, tmp_path: Path
) -> None:
    runtime = make_runtime(fakes)
    first = await started(runtime, tmp_path / "work")
    (upper(runtime) / "kept").write_text("then")
    meta = await runtime.snapshot("k1", "s1", live=False)
    assert meta["mode"] == "files" and meta["reason"] == "asked for files only"
    (upper(runtime) / "kept").write_text("now")
    (upper(runtime) / "later").write_text("gone after the restore")

    done = await runtime.restore("k1", "s1")

    assert done["mode"] == "files" and done["name"] == "s1"
    assert done["pid"] != first
    assert (upper(runtime) / "kept").read_text() == "then"
    assert not (upper(runtime) / "later").exists()
    record = runtime.record("k1")
    assert record.snapshot == "s1" and record.restoring is None
    assert ("restore", record.container_id) not in fakes.runc.calls
    assert fakes.runc.containers[record.container_id]["status"] == "running"


async def test_live_restore_without_criu_falls_back_to_files(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    assert (await runtime.snapshot("k1", "s1"))["mode"] == "live"
    fakes.criu.missing = True
    done = await runtime.restore("k1", "s1")
    assert done["mode"] == "files"
    assert "CRIU >= 4.2" in done["reason"]


async def test_restore_cut_short_is_finished_on_the_next_look(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    (upper(runtime) / "marker").write_text("snapshot")
    await runtime.snapshot("k1", "s1")
    (upper(runtime) / "marker").write_text("after")
    fakes.runc.crash.add("restore")

    with pytest.raises(Crash):
        await runtime.restore("k1", "s1")

    # The old process is gone and the new one never ran: the record says so.
    record = runtime.record("k1")
    assert record.restoring == "s1"
    assert record.container_id not in fakes.runc.containers
    fakes.runc.crash.clear()

    pid = await runtime.finish_restore("k1")

    assert pid is not None
    record = runtime.record("k1")
    assert record.restoring is None and record.snapshot == "s1"
    assert fakes.runc.containers[record.container_id] == {"status": "running", "pid": pid}
    assert (upper(runtime) / "marker").read_text() == "snapshot"
    assert "finishing the restore of s1, cut short" in runtime.log_path("k1").read_text()
    assert await runtime.finish_restore("k1") is None


async def test_a_restore_that_fails_again_is_not_retried_forever(
    fakes: Fakes, tmp_path: Path
) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    await runtime.snapshot("k1", "s1")
    fakes.runc.crash.add("restore")
    with pytest.raises(Crash):
        await runtime.restore("k1", "s1")
    fakes.runc.crash.clear()
    fakes.runc.fail.update({"restore", "create"})
    with pytest.raises(Exception, match="create refused"):
        await runtime.finish_restore("k1")
    assert runtime.record("k1").restoring is None
    assert fakes.mounts.mounts_under(runtime.kernel_dir("k1")) == []


async def test_a_restore_whose_snapshot_files_cannot_be_taken_keeps_the_kernels_files(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    (upper(runtime) / "marker").write_text("snapshot")
    await runtime.snapshot("k1", "s1")
    (upper(runtime) / "marker").write_text("after")

    def gone(source: Path, target: Path, readonly: bool) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(source))

    monkeypatch.setattr(fakes.volume, "snapshot_subvolume", gone)
    with pytest.raises(FileNotFoundError):
        await runtime.restore("k1", "s1")
    # The kernel's own layer is whole, so its restart starts on its files (CI saw
    # the restart fail to mount a layer the restore had already deleted).
    assert (upper(runtime) / "marker").read_text() == "after"
    assert sorted(p.name for p in runtime.rootfs.layer_dir("k1").parent.iterdir()) == ["k1"]


def test_a_delete_waits_for_a_reader_of_the_snapshot(fakes: Fakes) -> None:
    owner = str(os.getuid())
    folder = snapshots.snapshot_dir(owner, "s1")
    folder.mkdir(parents=True)
    write_json(folder / "meta.json", {"name": "s1"})
    deleting = threading.Thread(target=snapshots.delete, args=(owner, "s1"))
    with snapshots.reading(owner, "s1"):
        deleting.start()
        deleting.join(0.5)
        assert deleting.is_alive(), "the delete did not wait for the reader"
        assert (folder / "meta.json").exists()
    deleting.join(10)
    assert not deleting.is_alive() and not folder.exists()


def test_a_reader_that_waited_for_a_delete_finds_the_snapshot_gone(fakes: Fakes) -> None:
    owner = str(os.getuid())
    folder = snapshots.snapshot_dir(owner, "s1")
    folder.mkdir(parents=True)
    write_json(folder / "meta.json", {"name": "s1"})
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            with snapshots.reading(owner, "s1"):
                outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    with snapshots._no_readers(folder):
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(0.5)
        assert reader.is_alive(), "the reader did not wait for the delete"
        os.rename(folder, folder.with_name(".deleting.s1"))
    reader.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], snapshots.SnapshotNotFound)


async def test_snapshot_failing_mid_commit_keeps_nothing(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    await runtime.snapshot("k1", "s1")
    calls = 0

    def fsync_fails(file: Path) -> str:
        nonlocal calls
        calls += 1
        raise OSError(errno.EIO, "Input/output error", str(file))

    monkeypatch.setattr(snapshots, "_sha256_and_fsync", fsync_fails)

    with pytest.raises(OSError, match="Input/output error"):
        await runtime.snapshot("k1", "s2")

    assert calls > 0, "the commit was not reached"
    owner = str(os.getuid())
    assert snapshots.names(owner) == ["s1"]
    assert snapshots.leftovers() == []
    assert [p.name for p in snapshots.owner_dir(owner).iterdir()] == ["s1"]
    record = runtime.record("k1")
    assert record.snapshot == "s1"
    assert fakes.runc.containers[record.container_id]["status"] == "running"


async def test_snapshot_on_a_full_volume_says_so_and_keeps_nothing(
    fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fakes.volume, "snapshot_subvolume", full)
    with pytest.raises(snapshots.StoreFull):
        await runtime.snapshot("k1", "s1")
    assert snapshots.names(str(os.getuid())) == []
    assert snapshots.leftovers() == []
    assert fakes.runc.containers[runtime.record("k1").container_id]["status"] == "running"


async def test_limits_changed_during_a_snapshot_are_kept(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    fakes.runc.hold["checkpoint"] = release = asyncio.Event()
    snapshot = asyncio.create_task(runtime.snapshot("k1", "s1"))
    entered = fakes.runc.entered.setdefault("checkpoint", asyncio.Event())
    await asyncio.wait_for(entered.wait(), 10)

    # Not blocked by the snapshot's lock: limits apply at once.
    new = await asyncio.wait_for(
        runtime.update_limits("k1", Limits.parse(memory="3G"), operator=True), 10
    )
    assert new.memory == 3 << 30
    release.set()
    meta = await asyncio.wait_for(snapshot, 10)

    record = runtime.record("k1")
    assert meta["mode"] == "live"
    assert record.snapshot == "s1"
    assert record.limits.memory == 3 << 30
    assert record.ceiling.memory == 3 << 30  # an operator raised it
    assert fakes.runc.updates == [Limits.parse(memory="3G")]
    # The next start (or restore) makes the container with the new limit.
    await runtime.stop("k1")
    await runtime.start("k1", ARGV, {}, CONNECTION)
    spec = (runtime.kernel_dir("k1") / "config.json").read_text()
    assert f'"limit": {3 << 30}' in spec


async def test_a_restore_brings_the_limits_set_since_the_start(
    fakes: Fakes, tmp_path: Path
) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    await runtime.snapshot("k1", "s1")
    await runtime.update_limits("k1", Limits.parse(memory="512M"))
    await runtime.restore("k1", "s1")
    spec = (runtime.kernel_dir("k1") / "config.json").read_text()
    assert f'"limit": {512 << 20}' in spec


async def test_a_kernel_cannot_raise_its_limits_above_the_ceiling(
    fakes: Fakes, tmp_path: Path
) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    with pytest.raises(ValueError, match="above this kernel's ceiling of 1G"):
        await runtime.update_limits("k1", Limits.parse(memory="2G"))
    assert fakes.runc.updates == []
    assert runtime.record("k1").limits.memory == 1 << 30


async def test_reset_gives_pristine_files_and_a_new_process(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    first = await started(runtime, tmp_path / "work")
    await runtime.snapshot("k1", "s1")
    (upper(runtime) / "homework").write_text("mine")

    done = await runtime.reset("k1")

    record = runtime.record("k1")
    assert done["pid"] != first
    assert fakes.runc.containers[record.container_id] == {"status": "running", "pid": done["pid"]}
    assert not (upper(runtime) / "homework").exists()
    assert record.snapshot is None
    assert snapshots.names(str(os.getuid())) == ["s1"], "snapshots stay"
    kdir = runtime.kernel_dir("k1")
    assert kdir / "rootfs" in fakes.mounts.points and kdir / "mnt/cwd" in fakes.mounts.points


async def test_reset_refused_when_the_folder_was_swapped_leaves_the_kernel(
    fakes: Fakes, tmp_path: Path
) -> None:
    runtime = make_runtime(fakes)
    work = tmp_path / "work"
    pid = await started(runtime, work)
    work.rename(tmp_path / "moved")
    work.mkdir()
    with pytest.raises(ValueError, match="moved or replaced"):
        await runtime.reset("k1")
    record = runtime.record("k1")
    assert fakes.runc.containers[record.container_id] == {"status": "running", "pid": pid}
    assert ("delete", record.container_id) not in fakes.runc.calls


async def test_diff_lists_what_changed_since_a_snapshot(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    (upper(runtime) / "old").write_text("1")
    (upper(runtime) / "gone").write_text("1")
    await runtime.snapshot("k1", "s1")
    (upper(runtime) / "old").write_text("22")
    (upper(runtime) / "gone").unlink()
    (upper(runtime) / "new").write_text("3")
    changes = runtime.diff("k1")
    assert changes["since"] == "s1"
    assert "/new" in changes["added"]
    assert "/old" in changes["changed"]
    assert "/gone" in changes["deleted"]


async def test_gc_removes_kernels_whose_server_is_gone(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")

    def orphan(record: Any) -> None:
        record.owner = {"pid": 2**22 + 1, "start": 1}

    runtime.store.update("k1", orphan)
    removed = await runtime.gc()
    assert any(line.startswith("kernel k1 ") for line in removed)
    assert runtime.records() == []
    assert fakes.runc.containers == {}


async def test_operations_on_an_unknown_kernel_say_so(fakes: Fakes) -> None:
    runtime = make_runtime(fakes)
    for call in (
        runtime.snapshot("nope", "s1"),
        runtime.restore("nope", "s1"),
        runtime.reset("nope"),
    ):
        with pytest.raises(KernelNotFound):
            await call


async def test_gc_leaves_a_kernel_whose_record_it_cannot_read(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    record = runtime.kernel_dir("k1") / "record.json"
    data = json.loads(record.read_text())
    data["start"] = "from-a-later-version"
    record.write_text(json.dumps(data))
    removed = await runtime.gc()
    assert removed == ["nothing of kernel k1: its record cannot be read; left alone"]
    assert fakes.network.held and fakes.runc.containers
    assert runtime.kernel_dir("k1").is_dir() and runtime.rootfs.layer_dir("k1").is_dir()


async def test_records_stay_readable_by_earlier_versions(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    path = runtime.kernel_dir("k1") / "record.json"
    data = json.loads(path.read_text())
    assert data["start"] == "image" and data["started_from"] is None
    # An earlier version restarted the kernel cold since, and wrote its own mark.
    data["started_from"] = "cold"
    for key in ("cwd_identity", "prefix_identities", "start"):
        del data[key]
    path.write_text(json.dumps(data))
    record = runtime.record("k1")
    assert record.start is Start.COLD and record.cwd_identity is None
    with pytest.raises(ValueError, match="restart the kernel"):
        await runtime.reset("k1")
    adopted = runtime.adopt("k1")
    assert adopted.cwd_identity is not None and adopted.prefix_identities is not None
    assert json.loads(path.read_text())["started_from"] == "cold"


async def test_a_snapshot_after_its_parent_was_deleted(fakes: Fakes, tmp_path: Path) -> None:
    runtime = make_runtime(fakes)
    await started(runtime, tmp_path / "work")
    await runtime.snapshot("k1", "s1")
    runtime.delete_snapshot("k1", "s1")
    meta = await runtime.snapshot("k1", "s2")
    assert meta["mode"] == "live" and meta["parent"] == "s1"
    assert meta["shared_bytes"] == 0 and meta["shared_with"] == {}
    assert runtime.record("k1").snapshot == "s2"


def test_tree_sizes_counts_regular_files_and_every_block(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data").write_bytes(b"x" * 10_000)
    (tmp_path / "link").symlink_to("sub/data")
    size, blocks = tree_sizes(tmp_path)
    assert size == 10_000  # the symlink is not counted again
    assert blocks >= 10_000
    assert (size, blocks) == (tree_bytes(tmp_path), allocated_bytes(tmp_path))
