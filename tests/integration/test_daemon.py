"""Shared servers: Jupyter servers running as their users start sandboxed kernels
through the real daemon, and no user can see or touch another's."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import signal
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.runtime import Runtime, snapshots
from sandbox_kernel.runtime.criu_images import Owners, core, map_entries
from sandbox_kernel.runtime.record import Start

from .conftest import reachable_by_all, run_cli, wait_until
from .daemon import USER_PYTHON, Daemon, User, UserServer

NOT_FOUND = "no sandboxed kernel with id"


async def test_a_users_server_runs_kernels_as_that_user(daemon: Daemon, users) -> None:
    alice, _ = users
    async with UserServer(alice) as server:
        started = await server.start()
        kid = started["kernel_id"]
        assert started["backend"] == "daemon"
        assert await server.run(kid, "import os; print(os.getuid(), os.getgid())") == (
            f"{alice.uid} {alice.gid}\n"
        )
        record = Runtime().record(kid)
        assert (record.uid, record.belongs_to) == (alice.uid, alice.uid)
        out = await server.run(kid, "x = 41\n%container snapshot s1")
        assert "Snapshot s1" in out
        await server.run(kid, "x = 0")
        done = await alice.cli("restore", kid, "s1")
        assert done.returncode == 0, done.stderr
        assert await wait_until_value(server, kid, "x + 1") == "42"
        ps = await alice.cli("ps")
        assert kid in ps.stdout and alice.name in ps.stdout
        # The server signals its own kernel (its pidfd), as its user.
        interrupted = await server.ask("interrupt", kernel_id=kid)
        assert "KeyboardInterrupt" in interrupted["error"], interrupted
        await server.ask("shutdown", kernel_id=kid)
    assert not Runtime().store.exists(kid)


async def wait_until_value(server: UserServer, kid: str, expr: str) -> str:
    """The value of ``expr`` once the kernel answers again (after a restore)."""

    async def value() -> str | None:
        reply = await server.ask("run", kernel_id=kid, code=f"print({expr})")
        return None if reply.get("error") else str(reply["text"]).strip()

    return str(await wait_until(value, 60, f"{expr} to be evaluated"))


async def test_another_user_cannot_see_or_touch_the_kernel(daemon: Daemon, users) -> None:
    alice, bob = users
    async with UserServer(alice) as server:
        kid = (await server.start())["kernel_id"]
        await server.run(kid, "%container snapshot mine")
        ps = await bob.cli("ps")
        assert ps.returncode == 0 and kid not in ps.stdout
        listed = await bob.cli("snapshots")
        assert "mine" not in listed.stdout
        for args in (
            ["snapshot", kid, "theirs"], ["restore", kid, "mine"], ["reset", kid],
            ["logs", kid], ["limits", kid, "--memory", "1G"], ["snapshots", kid],
        ):  # fmt: skip
            done = await bob.cli(*args)
            assert done.returncode == 2, (args, done)
            assert NOT_FOUND in done.stderr, (args, done.stderr)
        done = await bob.cli("snapshots", "--delete", "mine", "--owner", str(alice.uid))
        assert done.returncode == 2 and "another user" in done.stderr
        # Raw requests, with a body that lies about who asks.
        for op, args in (
            ("stop", {"kernel_id": kid}), ("remove", {"kernel_id": kid}),
            ("diff", {"kernel_id": kid}), ("pid", {"kernel_id": kid}),
            ("adopt", {"kernel_id": kid}), ("restore", {"kernel_id": kid, "name": "mine"}),
            ("prepare", {"kernel_id": kid, "config": _config(bob)}),
            ("delete_snapshot", {"name": "mine", "owner": alice.uid}),
        ):  # fmt: skip
            reply = bob.request(op, **{"uid": alice.uid, "caller": alice.uid, **args})
            if op == "remove":  # removing what you cannot see is a no-op
                assert reply == {"ok": True, "result": None}
                continue
            assert reply["ok"] is False, (op, reply)
        assert bob.request("kernels", uid=0)["result"] == []
        # Alice's kernel and snapshot are untouched.
        assert await server.run(kid, "print('still here')") == "still here\n"
        assert "mine" in snapshots.names(str(alice.uid))


async def test_a_snapshot_exported_by_one_user_is_imported_by_another_as_theirs(
    daemon: Daemon, users, tmp_path: Path
) -> None:
    alice, bob = users
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    reachable_by_all(shared)
    exported = shared / "mine.sks"
    async with UserServer(alice) as server:
        kid = (await server.start())["kernel_id"]
        await server.run(kid, "x = 41\nopen('notes.txt', 'w').write('alice')")
        await server.run(kid, "%container snapshot mine")
        await asyncio.to_thread(snapshots.wait_saved, str(alice.uid), "mine")
    try:
        before = {n: snapshots.load(str(alice.uid), n) for n in snapshots.names(str(alice.uid))}
        # Bob can neither export hers nor name her as the owner.
        done = await bob.cli("snapshot", "export", "mine", str(shared / "stolen.sks"))
        assert done.returncode == 2 and "is not kept" in done.stderr, done.stderr
        done = await bob.cli("snapshot", "export", "mine", str(shared / "stolen.sks"),
                             "--owner", str(alice.uid))  # fmt: skip
        assert done.returncode == 2 and "another user" in done.stderr
        assert not (shared / "stolen.sks").exists()
        done = await alice.cli("snapshot", "export", "mine", str(exported))
        assert done.returncode == 0, done.stderr
        st = exported.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, 0o600)
        done = await bob.cli("snapshot", "import", str(exported))
        assert done.returncode == 2 and "cannot be read by you (Permission denied)" in done.stderr
        exported.chmod(0o644)  # alice hands it over
        done = await bob.cli("snapshot", "import", str(exported), "--name", "from-alice",
                             "--cwd", str(bob.home))  # fmt: skip
        assert done.returncode == 0, done.stderr
        meta = snapshots.verify(str(bob.uid), "from-alice")
        assert (meta["owner"], meta["uid"], meta["gid"]) == (str(bob.uid), bob.uid, bob.gid)
        assert meta["cwd"] == str(bob.home)
        files = snapshots.snapshot_dir(str(bob.uid), "from-alice") / "files"
        owners = {p.lstat().st_uid for p in files.rglob("*")}
        assert alice.uid not in owners and bob.uid in owners, owners

        # The processes' credentials in the images are his (the kernel's; tini's are
        # root's): none of hers is left.
        def holding(image: Path, user: User) -> int:
            """How many entries of core image ``image`` name ``user``'s ids."""
            swap = Owners((user.uid, 0), (user.gid, 0))
            copy = tmp_path / "core-copy.img"
            shutil.copyfile(image, copy)
            return map_entries(copy, lambda entry: (entry, int(core(entry, swap) != entry)))

        cores = list((files.parent / "criu").glob("core-*.img"))
        assert cores and sum(holding(c, bob) for c in cores) > 0
        assert sum(holding(c, alice) for c in cores) == 0
        # Her store is as it was.
        after = {n: snapshots.load(str(alice.uid), n) for n in snapshots.names(str(alice.uid))}
        assert after == before
        listed = await bob.cli("snapshots")
        assert "from-alice" in listed.stdout
        done = await bob.cli("snapshots", "--delete", "from-alice")
        assert done.returncode == 0, done.stderr
        done = await alice.cli("snapshots", "--delete", "mine")
        assert done.returncode == 0, done.stderr
    finally:
        for user, name in ((alice, "mine"), (bob, "from-alice")):
            if name in snapshots.names(str(user.uid)):
                snapshots.delete(str(user.uid), name)


def _config(user: User, **changes: object) -> dict[str, object]:
    config: dict[str, object] = {
        "image": "host", "limits": {"memory": "512M"}, "network": "none",
        "uid": user.uid, "gid": user.gid, "cwd": str(user.home),
        "executable": "/usr/bin/python3", "base": "",
    }  # fmt: skip
    config.update(changes)
    return config


async def test_a_user_cannot_get_another_uid_or_folder(daemon: Daemon, users) -> None:
    alice, bob = users
    private = alice.home / "private"
    private.mkdir(exist_ok=True)
    private.chmod(0o700)
    link = bob.home / "to-root"
    link.unlink(missing_ok=True)
    link.symlink_to("/root")
    cases = {
        "kernel_uid 0 is not yours": _config(bob, uid=0),
        f"kernel_uid {alice.uid} is not yours": _config(bob, uid=alice.uid),
        "kernel_gid 0 is no group of yours": _config(bob, gid=0),
        "cannot be read by you": _config(bob, cwd=str(private)),
        "working directory '/root'": _config(bob, cwd="/root"),
        "a symlink is refused": _config(bob, cwd=str(link)),
        "kernel executable": _config(bob, executable="/root/.no-python"),
    }
    for i, (message, config) in enumerate(cases.items()):
        reply = bob.request("prepare", kernel_id=f"deadbeef-0000-4000-8000-00000000000{i}",
                            config=config)  # fmt: skip
        assert reply["ok"] is False, (message, reply)
        assert message in reply["error"]["message"], (message, reply)
    assert not [r for r in Runtime().records() if r.belongs_to == bob.uid]


async def test_quotas_refuse_with_a_clear_line(daemon: Daemon, users) -> None:
    alice, _ = users
    daemon.config.write_text(
        f'[users.{alice.name}]\nkernels = 1\nmemory = "1G"\nsnapshot_bytes = "1M"\n'
    )
    await daemon.stop()
    await daemon.start()
    async with UserServer(alice) as server:
        kid = (await server.start())["kernel_id"]
        second = await server.ask("start", config={"memory": "512M"}, cwd=str(alice.home))
        assert "quota kernels = 1" in second["error"]
        done = await alice.cli("limits", kid, "--memory", "2G")
        assert done.returncode == 2 and "quota memory = 1G" in done.stderr
        reply = alice.request("prepare", kernel_id="deadbeef-0000-4000-8000-0000000000aa",
                              config=_config(alice, limits={"memory": "4G"}))  # fmt: skip
        assert "quota" in reply["error"]["message"]
        out = await server.run(kid, "b = bytearray(50_000_000)\n%container snapshot big")
        assert "was not taken" in out and "past the limit of 1M" in out, out
        assert "big" not in snapshots.names(str(alice.uid))
        assert await server.run(kid, "print(len(b))") == "50000000\n"


async def test_a_daemon_killed_mid_snapshot_and_mid_restore(daemon: Daemon, users) -> None:
    """SIGKILL in the middle: after a restart the daemon takes the kernel up again,
    it keeps running, and nothing half-written is listed."""
    alice, _ = users
    async with UserServer(alice) as server:
        kid = (await server.start(memory="1G"))["kernel_id"]
        # Every page written, so that a dump or a restore takes a while.
        await server.run(kid, "b = bytearray(b'x') * 300_000_000; b[-1] = 7")
        await server.run(kid, "%container snapshot good")
        # Saved in the background: a kill before then loses it (test_faults.py, f10).
        await asyncio.to_thread(snapshots.wait_saved, str(alice.uid), "good")
        for verb, args in (("snapshot", [kid, "cut"]), ("restore", [kid, "good"])):
            cli = asyncio.ensure_future(alice.cli(verb, *args))
            await _until_busy(kid)
            daemon.kill()
            done = await cli
            assert done.returncode != 0, done
            await daemon.start()
            assert await wait_until_value(server, kid, "b[-1]") == "7"
            names = snapshots.names(str(alice.uid))
            assert set(names) <= {"good", "cut"}, names
            for name in names:
                snapshots.verify(str(alice.uid), name)  # whole, or not listed at all
            assert not snapshots.leftovers()
        assert await server.run(kid, "%container list")


@pytest.mark.parametrize("during", ["dump", "save"])
async def test_a_daemon_killed_mid_checkpoint_loses_only_that_checkpoint(
    daemon: Daemon, users, during: str
) -> None:
    """Autosave's checkpoint cut short by a SIGKILL of the runtime, while the kernel
    is frozen for the dump or while the dump is saved in the background: after a
    restart the kernel runs on with autosave on, the next checkpoint descends from
    the last one saved, and undo still reaches it. The cut one is never offered and
    nothing half-written is listed."""
    alice, _ = users
    owner = str(alice.uid)
    async with UserServer(alice) as server:
        kid = (await server.start(memory="2G", autosave=True))["kernel_id"]
        runtime = Runtime()

        def kept() -> list[dict[str, Any]]:
            return list(runtime.record(kid).extra.get("checkpoints") or [])

        await server.run(kid, "x = 'before'")
        await wait_until(lambda: len(kept()) == 1, 60, "the first checkpoint")
        first = kept()[0]["name"]
        await asyncio.to_thread(snapshots.wait_saved, owner, first)
        # Every page written, so that the next checkpoint's dump and save take a while.
        await server.run(kid, "b = bytearray(b'x') * 600_000_000; b[-1] = 7; x = 'after'")
        if during == "dump":
            await _until_busy(kid)
        else:

            def saving() -> bool:
                return any(
                    n.startswith("ckpt-") and n != first
                    and not (snapshots.snapshot_dir(owner, n) / "meta.json").exists()
                    for n in snapshots.names(owner, every=True)
                )  # fmt: skip

            # Listed on the kernel (the cell's dump is over), and still being saved.
            await wait_until(lambda: len(kept()) == 2 and saving(), 60,
                             "the checkpoint's background save", interval=0.01)  # fmt: skip
        daemon.kill()
        await daemon.start()
        assert await wait_until_value(server, kid, "x, b[-1]") == "after 7"
        names = set(snapshots.names(owner, every=True))
        for name in names:
            snapshots.verify(owner, name)  # whole, or not listed at all
        assert [c["next"] for c in kept() if c["name"] in names][:1] == [2]
        assert not [c for c in kept() if c["next"] == 3 and c["name"] in names], kept()
        done = await run_cli("gc")
        assert done.returncode == 0, done.stderr
        assert not snapshots.leftovers()
        history = await server.run(kid, "%container history")
        assert "x = 'before'" in history, history
        # Autosave is still on, and the checkpoints after the restart descend from
        # the last one saved.
        status = await server.run(kid, "%container autosave")
        assert "Autosave is on" in status, status

        def after_restart() -> list[str]:
            saved = set(snapshots.names(owner, every=True))
            return [c["name"] for c in kept() if c["next"] > 3 and c["name"] in saved]

        await wait_until(after_restart, 60, "a checkpoint after the restart")
        meta = await asyncio.to_thread(snapshots.load, owner, after_restart()[0])
        assert meta["parent"] == first, meta
        undone = await server.run(kid, "%container undo --to 2")
        assert "before cell 2" in undone, undone
        assert await wait_until_value(server, kid, "x, 'b' in dir()") == "before False"
    assert not snapshots.leftovers()


async def _until_busy(kid: str) -> None:
    """Wait until a snapshot or restore of ``kid`` holds its lock (is under way)."""
    store = Runtime().store

    def busy() -> bool:
        with store.busy(kid) as held_here:
            return held_here is None

    await wait_until(busy, 60, "the operation to start", interval=0.01)


async def test_detach_starts_one_daemon_and_a_second_is_refused(tmp_path: Path) -> None:
    sock = "/run/sandbox-kernel-detach-test/daemon.sock"
    pid_file, log = tmp_path / "daemon.pid", tmp_path / "daemon.log"
    args = ("daemon", "--detach", "--socket", sock, "--pid-file", str(pid_file), "--log", str(log))
    done = await run_cli(*args)
    assert done.returncode == 0, done.stderr
    pid = int(pid_file.read_text())
    try:
        assert f"pid {pid}" in done.stdout
        again = await run_cli(*args)
        assert again.returncode == 2
        assert f"already (pid {pid})" in again.stderr
        me = await DaemonClient(sock).call("whoami")
        assert me["uid"] == 0 and me["admin"] is True
    finally:
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not Path(sock).exists(), 30, "the daemon to stop")
        Path(sock).parent.rmdir()


async def test_events_reach_the_owner_and_admins_only(daemon: Daemon, users) -> None:
    alice, bob = users
    seen: list[dict[str, object]] = []

    async def follow() -> None:
        async for event in daemon.client.events():  # root: an admin sees every user's
            seen.append(event)

    watcher = asyncio.ensure_future(follow())
    bobs = await asyncio.create_subprocess_exec(
        *bob.argv(str(USER_PYTHON), "-m", "sandbox_kernel.cli", "events"),
        stdout=asyncio.subprocess.PIPE, cwd="/",
    )  # fmt: skip
    try:
        async with UserServer(alice) as server:
            kid = (await server.start())["kernel_id"]
            await server.run(kid, "%container snapshot ev")
            await wait_until(
                lambda: {"started", "snapshot"} <= {e["event"] for e in seen}, 30, "the events"
            )
            await server.ask("shutdown", kernel_id=kid)
            await wait_until(lambda: "removed" in {e["event"] for e in seen}, 30, "removed")
        assert all(e["owner_uid"] == alice.uid for e in seen if e["kernel_id"] == kid)
    finally:
        watcher.cancel()
        bobs.terminate()
        out, _ = await bobs.communicate()
    assert out == b"", out  # Bob saw none of Alice's


async def test_classes_belong_to_their_teacher(
    daemon: Daemon, users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.runtime import bases, classes

    alice, bob = users
    name = f"sk-test-{uuid.uuid4().hex[:6]}"
    # Not a teacher: refused, with what to do.
    done = await alice.cli("class", "publish", name, "--from", "lesson")
    assert done.returncode == 2 and "teacher_group" in done.stderr, done
    kernels_folder = tmp_path / "class-kernels"
    monkeypatch.setenv("SANDBOX_KERNEL_CLASS_KERNELS", str(kernels_folder))
    teacher = grp.getgrgid(alice.gid).gr_name  # alice's own group (useradd made it)
    daemon.config.write_text(f'teacher_group = "{teacher}"\n')
    await daemon.stop()
    await daemon.start()
    try:
        async with UserServer(alice) as server:
            kid = (await server.start())["kernel_id"]
            out = await server.run(kid, "lesson = 1\n%container snapshot lesson")
            assert "Snapshot lesson: live" in out, out
        done = await alice.cli("class", "publish", name, "--from", "lesson")
        assert done.returncode == 0, done.stderr
        spec = json.loads((kernels_folder / f"class-{name}" / "kernel.json").read_text())
        assert spec["metadata"]["kernel_provisioner"]["config"]["class_name"] == name
        listed = await alice.cli("class", "ps")
        assert name in listed.stdout, listed
        # Another user sees no such class, and cannot reset or replace it.
        for args in (("ps", name), ("reset", name)):
            done = await bob.cli("class", *args)
            assert done.returncode == 2 and "does not exist" in done.stderr, done
        assert name not in (await bob.cli("class", "ps")).stdout

        # A student's kernel of the class starts from the teacher's base, as the
        # student: their own copy of it, with the ids in its images theirs.
        async with UserServer(bob) as server:
            kid = (await server.start(class_name=name))["kernel_id"]
            record = Runtime().record(kid)
            assert record.start is Start.BASE, record.base_note
            copy = bases.load(record.base)
            assert copy["derived_from"] == classes.load(name)["base"] and copy["uid"] == bob.uid
            check = (
                "import os, socket\nprint(lesson, os.getuid(), os.getgid(), socket.gethostname())"
            )
            out = await server.run(kid, check)
            assert out == f"1 {bob.uid} {bob.gid} kernel-{kid[:8]}\n", out
            out = await server.run(kid, "open('mine.txt', 'w').write('x')\nlesson = 5")
            out = await server.run(kid, "%container reset")
            assert "reset to its base" in out, out
            assert (await server.run(kid, check)).startswith(f"1 {bob.uid} "), out
        # gc keeps the copy while the class's base is current, and no kernel is left.
        assert copy["id"] in {b["id"] for b in bases.listing(copies=True)}
    finally:
        meta = next((m for m in classes.listing() if m["name"] == name), None)
        if meta is not None:
            (classes.classes_dir() / f"{name}.json").unlink()
            for base in bases.listing(copies=True):
                if meta["base"] in (base["id"], base.get("derived_from")):
                    bases.delete(base["id"])


async def test_a_users_pool_is_theirs_within_their_quota_and_goes_with_their_server(
    daemon: Daemon, users
) -> None:
    alice, bob = users
    daemon.config.write_text(f"[users.{alice.name}]\nkernels = 3\n")
    await daemon.stop()
    await daemon.start()
    runtime = Runtime()

    def waiting() -> list[str]:
        return [
            r.kernel_id for r in runtime.records()
            if r.pooled and r.belongs_to == alice.uid and r.extra["pool"]["ready"]
        ]  # fmt: skip

    async with UserServer(alice) as server:
        first = (await server.start(pool=1))["kernel_id"]
        [pooled] = await wait_until(waiting, 120, "alice's pool kernel")
        record = runtime.record(pooled)
        assert (record.uid, record.belongs_to) == (alice.uid, alice.uid)
        # Bob sees nothing of it and reaches it by no id.
        assert pooled not in (await bob.cli("ps")).stdout
        reply = bob.request("prepare", kernel_id=pooled, config=_config(bob))
        assert reply["ok"] is False and NOT_FOUND in reply["error"]["message"], reply
        assert NOT_FOUND in (await alice.cli("logs", pooled)).stderr  # nor does alice
        # Alice's next start takes it, as her kernel.
        second = (await server.start(pool=1))["kernel_id"]
        assert runtime.record(second).kernel_id == pooled
        assert await server.run(second, "import os; print(os.getuid())") == f"{alice.uid}\n"
        [refill] = await wait_until(waiting, 120, "the pool to refill")  # her third kernel
        # A start of another configuration at her quota: the pool kernel makes room.
        other = (await server.start(memory="256M"))["kernel_id"]
        assert not runtime.store.exists(refill)
        assert runtime.record(other).kernel_id == other
        assert await server.run(other, "print('other')") == "other\n"
        # At her quota, with nothing pooled, a start is refused as before.
        refused = await server.ask("start", config={"memory": "512M"}, cwd=str(alice.home))
        assert "quota kernels = 3" in refused["error"], refused
        for kid in (second, other):
            await server.ask("shutdown", kernel_id=kid)
        await server.start(pool=1)  # no pool kernel ready: a start of its own
        await wait_until(waiting, 120, "the pool to refill")
        assert first in {r.public_id for r in runtime.records()}
    # The server's exit asks the daemon to remove its pool kernels.
    await wait_until(
        lambda: not [r for r in runtime.records() if r.belongs_to == alice.uid],
        60, "alice's kernels to be gone",
    )  # fmt: skip
