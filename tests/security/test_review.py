"""The outside review's cases: a hostile student on a shared teaching server, attacking
from inside kernels and as a second, unprivileged host user.

Each test is the reviewer's repro (docs/security.md lists them with their outcome):
it failed on the main the review was run against, and passes now. The second host
user is made for this module with ``useradd`` and removed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.runtime import Runtime, paths, saving, snapshots, volume
from sandbox_kernel.runtime.rootfs import LOG_CAP, run_dir

from ..integration.conftest import OWNER, Kernels, fresh, run_cli, wait_until
from ..integration.probe import run_cell

pytestmark = [pytest.mark.integration]

#: Talks to the kernel's control server the way a hostile kernel would: signed with
#: the kernel's own token, but with whatever op and arguments it likes.
SIGNED = textwrap.dedent(
    """
    import hashlib, hmac, json, secrets, socket, time
    creds = json.load(open("/run/sandbox/control.json"))
    def signed(op, args, **extra):
        m = {"op": op, "args": args, "kernel_id": creds["kernel_id"],
             "nonce": secrets.token_hex(16), "time": time.time(), **extra}
        body = json.dumps(m, sort_keys=True)
        m["mac"] = hmac.new(bytes.fromhex(creds["token"]), body.encode(),
                            hashlib.sha256).hexdigest()
        return m
    def send_raw(data, timeout=15):
        with socket.create_connection((creds["host"], creds["port"]), timeout=timeout) as c:
            c.sendall(data)
            line = c.makefile("rb").readline()
            return json.loads(line) if line else None
    def send(message):
        return send_raw(json.dumps(message).encode() + b"\\n")
    """
)


async def cell_json(kc: Any, code: str, timeout: float = 120) -> Any:
    """Run ``code`` (after :data:`SIGNED`) in a kernel; parse the last line it printed."""
    out = (await run_cell(kc, SIGNED + textwrap.dedent(code), timeout=timeout)).check()
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def host_user() -> Iterator[pwd.struct_passwd]:
    """A second, unprivileged host user (another student on the server)."""
    name = f"skp{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


def as_user(user: pwd.struct_passwd, code: str) -> dict[str, str]:
    """Run Python ``code`` as ``user`` (Debian's own python3: the project's may be in a
    folder only root can enter); return the JSON it printed."""
    done = subprocess.run(
        ["/usr/bin/python3", "-c", textwrap.dedent(code)],
        user=user.pw_uid, group=user.pw_gid, extra_groups=[],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cgroup_limits(kernel_id: str) -> tuple[int | None, int | None]:
    """The memory and pids limits the kernel's cgroup holds now."""
    use = Runtime().usage(kernel_id)
    assert use is not None
    return use.memory_limit, use.pids_limit


# ---- 1. a kernel raises its own limits ------------------------------------------------


async def test_1_a_kernel_cannot_raise_its_limits_above_the_kernelspec(
    kernels: Kernels, make_spec: Any
) -> None:
    km, kc = await kernels.start(make_spec(memory="512M", cpus="1", pids="128"))
    cell = await run_cell(kc, "%container limits --memory 64G --cpus 16 --pids 100000")
    assert cell.status == "error" and "ceiling of 512M" in cell.evalue, cell
    assert cgroup_limits(km.kernel_id) == (512 << 20, 128)

    # The same through a signed request straight to the control server.
    for args in ({"pids": "100000"}, {"cpus": "16"}, {"memory": "64G"}):
        reply = await cell_json(kc, f"print(json.dumps(send(signed('limits', {args!r}))))")
        assert reply["ok"] is False and "ceiling" in reply["error"], reply
    assert cgroup_limits(km.kernel_id) == (512 << 20, 128)
    record = Runtime().record(km.kernel_id)
    assert record.limits.cpus == 1.0 and record.ceiling.pids == 128

    # Lowering, and raising back up to the kernelspec's values, is the kernel's to do.
    (await run_cell(kc, "%container limits --pids 64 --memory 256M")).check()
    assert cgroup_limits(km.kernel_id) == (256 << 20, 64)
    (await run_cell(kc, "%container limits --pids 128 --memory 512M")).check()
    assert cgroup_limits(km.kernel_id) == (512 << 20, 128)
    refused = await run_cell(kc, "%container limits --pids 129")
    assert refused.status == "error" and "ceiling of 128" in refused.evalue

    # The operator may go above; the kernel may then use what it was given.
    done = await run_cli("limits", km.kernel_id, "--pids", "200")
    assert done.returncode == 0, done.stderr
    (await run_cell(kc, "%container limits --pids 100")).check()
    (await run_cell(kc, "%container limits --pids 200")).check()
    assert cgroup_limits(km.kernel_id)[1] == 200


# ---- 2. a swapped notebook folder -----------------------------------------------------


async def test_2_a_swapped_working_folder_is_never_mounted(
    kernels: Kernels, make_spec: Any, names: list[str], tmp_path: Path
) -> None:
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "secret.txt").write_text("root's secret\n")
    (secret / "secret.txt").chmod(0o644)
    work = kernels.cwd
    _, kc = await kernels.start(make_spec())
    name = fresh(names)
    (await run_cell(kc, f"%container snapshot {name}")).check()

    moved = work.with_name("work.orig")
    work.rename(moved)
    try:
        work.symlink_to(secret)  # the user's swap: a symlink where the folder was
        for command in ("reset", f"restore {name}"):
            cell = await run_cell(kc, f"%container {command}", timeout=60)
            assert cell.status == "error", (command, cell)
            assert "moved or replaced" in cell.evalue, cell.evalue
            # Refused before the kernel was touched: it runs on, and sees no secret.
            out = (await run_cell(kc, "import os; print(sorted(os.listdir('.')))")).check()
            assert "secret.txt" not in out
        work.unlink()
        work.mkdir()  # another folder at the same path
        cell = await run_cell(kc, "%container reset", timeout=60)
        assert cell.status == "error" and "another folder" in cell.evalue, cell
        work.rmdir()
    finally:
        if work.is_symlink():
            work.unlink()
        moved.rename(work)
    # The folder it started in is back: the same operations work again.
    (await run_cell(kc, "%container reset", timeout=60)).check()


# ---- 3 and 4. a second host user and the volume ---------------------------------------


async def test_3_4_another_host_user_reads_and_plants_nothing(
    kernels: Kernels, make_spec: Any, names: list[str], host_user: pwd.struct_passwd
) -> None:
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "open('notes.txt', 'w').write('private\\n'); open('/tmp/x', 'w')")).check()
    name = fresh(names)
    (await run_cell(kc, f"%container snapshot {name}")).check()
    kid = km.kernel_id
    vol = volume.volume_dir()
    state = paths.state_dir()
    targets = {
        "image": str(volume.image_path()),
        "cwd": str(vol / "kernels" / kid / "cwd"),
        "notes": str(vol / "kernels" / kid / "cwd" / "notes.txt"),
        "record": str(state / "kernels" / kid / "record.json"),
        "config": str(state / "kernels" / kid / "config.json"),
        "connection": str(run_dir(kid) / "connection.json"),
        "log": str(run_dir(kid) / "kernel.log"),
        "snapshots": str(vol / "snapshots" / OWNER),
        "reservations": str(paths.net_dir()),
    }
    plant = str(vol / "kernels" / kid / "root" / "tmp" / "fill")
    report = await asyncio.to_thread(
        as_user,
        host_user,
        f"""
        import json, os
        out = {{}}
        for key, path in {targets!r}.items():
            try:
                if os.path.isdir(path):
                    os.listdir(path)
                else:
                    open(path, "rb").read(1)
                out[key] = "read"
            except OSError as err:
                out[key] = type(err).__name__
        try:
            open({plant!r}, "wb").write(b"x" * 1024)
            out["plant"] = "planted"
        except OSError as err:
            out["plant"] = type(err).__name__
        print(json.dumps(out))
        """,
    )
    assert set(report.values()) == {"PermissionError"}, report
    assert volume.image_path().stat().st_mode & 0o777 == 0o600
    for folder in (vol, vol / "kernels", vol / "snapshots", vol / "bases", vol / "run"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    kdir = state / "kernels" / kid
    for folder in (kdir.parent, kdir):
        st = folder.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o710), folder
        with pytest.raises(KeyError):
            # The group that may pass through is root-inside-a-kernel's: no host group.
            grp.getgrgid(st.st_gid)
        assert all(st.st_gid not in os.getgrouplist(u.pw_name, u.pw_gid) for u in pwd.getpwall())
    # Snapshot, restore and a live kernel still work behind the closed folders.
    out = (await run_cell(kc, f"%container restore {name}", timeout=120)).check()
    assert "Restored to snapshot" in out


# ---- 5. a flood of connections to the control server -----------------------------------


async def test_5_a_flood_from_one_kernel_leaves_the_server_working(
    kernels: Kernels, make_spec: Any
) -> None:
    _, kc_a = await kernels.start(make_spec())
    _, kc_b = await kernels.start(make_spec())
    fds_before = len(os.listdir("/proc/self/fd"))
    rss_before = _rss()
    flood = textwrap.dedent(
        """
        import json, socket, threading
        held, refused = [], 0
        for i in range(1100):
            try:
                s = socket.create_connection((creds["host"], creds["port"]), timeout=2)
                held.append(s)
            except OSError:
                refused += 1
        sent = 0
        for s in held[:200]:
            try:
                s.sendall(b"x" * (1 << 20))  # a megabyte without a newline
                sent += 1
            except OSError:
                pass
        print(json.dumps({"held": len(held), "refused": refused, "sent": sent}))
        """
    )
    report = await cell_json(kc_a, flood, timeout=240)
    assert report["held"] + report["refused"] == 1100
    # While A holds its connections: the server has not taken them all, nor buffered them.
    assert len(os.listdir("/proc/self/fd")) - fds_before < 100
    assert _rss() - rss_before < 64 << 20
    out = (await run_cell(kc_b, "%container list")).check()
    assert "Your snapshots" in out
    # A lets go of its connections; its own magic works again.
    (await run_cell(kc_a, "for s in held: s.close()\nheld.clear()")).check()

    async def a_works() -> bool:
        cell = await run_cell(kc_a, "%container list")
        return cell.status == "ok"

    await wait_until(a_works, 60, "kernel A's control server to answer again", interval=1)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- 6. the disk quota across restores, and the snapshot store's limit --------------------


async def test_6_restores_do_not_grow_a_kernels_files_past_its_disk(
    kernels: Kernels, make_spec: Any, names: list[str]
) -> None:
    _, kc = await kernels.start(make_spec(disk="200M"))
    write = textwrap.dedent(
        """
        import errno, json, os
        def fill(path, mb):
            try:
                with open(path, "wb") as f:
                    for _ in range(mb):
                        f.write(os.urandom(1 << 20))
                    f.flush(); os.fsync(f.fileno())
                return "ok"
            except OSError as err:
                return errno.errorcode[err.errno]
        """
    )
    (await run_cell(kc, write)).check()
    first = (await run_cell(kc, "print(fill('/tmp/a', 150))")).check()
    assert first.strip() == "ok"
    name = fresh(names)
    (await run_cell(kc, f"%container snapshot {name}", timeout=120)).check()
    (await run_cell(kc, f"%container restore {name}", timeout=120)).check()
    # Before the fix the restored layer started at zero: 150 + 100 MB fitted in 200M.
    second = (await run_cell(kc, "print(fill('/tmp/b', 100))", timeout=120)).check()
    assert second.strip() == "EDQUOT", second

    # A kernel with a smaller disk in the same folder may not restore those files.
    _, kc_small = await kernels.start(make_spec(disk="100M"))
    cell = await run_cell(kc_small, f"%container restore {name}", timeout=120)
    assert cell.status == "error" and "more than this kernel's disk size" in cell.evalue, cell


async def test_6_the_snapshot_store_has_a_limit_per_owner(
    kernels: Kernels, make_spec: Any, names: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not snapshots.names(OWNER), "another test left snapshots of this owner"
    monkeypatch.setenv("SANDBOX_KERNEL_SNAPSHOT_COUNT", "2")
    _, kc = await kernels.start(make_spec())
    for _ in range(2):
        (await run_cell(kc, f"%container snapshot {fresh(names)}", timeout=120)).check()
    third = fresh(names)
    cell = await run_cell(kc, f"%container snapshot {third}", timeout=120)
    assert cell.status == "error" and "the limit of 2" in cell.evalue, cell
    assert third not in snapshots.names(OWNER)
    out = (await run_cell(kc, "%container list")).check()
    assert "Your snapshots: 2 of 2" in out, out

    # Bytes: a snapshot that takes the owner past the limit is not kept.
    monkeypatch.setenv("SANDBOX_KERNEL_SNAPSHOT_COUNT", "100")
    # Saved in the background: until then each counts whole (no pages shared yet).
    assert saving.wait_all(120)
    used = snapshots.usage(OWNER)["bytes"]
    monkeypatch.setenv("SANDBOX_KERNEL_SNAPSHOT_QUOTA", str(used + (40 << 20)))
    (await run_cell(kc, "import os; big = os.urandom(80 << 20)")).check()
    over = fresh(names)
    cell = await run_cell(kc, f"%container snapshot {over}", timeout=120)
    assert cell.status == "error" and "past the limit of" in cell.evalue, cell
    assert over not in snapshots.names(OWNER)
    assert not snapshots.leftovers()


# ---- 7. kernels of one uid in other folders ----------------------------------------------


async def test_7_kernels_of_one_uid_in_other_folders_share_no_snapshots(
    kernels: Kernels, make_spec: Any, names: list[str], tmp_path: Path
) -> None:
    _, kc_a = await kernels.start(make_spec())
    theirs = fresh(names)
    (await run_cell(kc_a, f"%container snapshot {theirs} -m 'my secret plan'")).check()
    other = tmp_path / "another-class"
    other.mkdir()
    other.chmod(0o755)
    km_b, kc_b = await kernels.start(make_spec(), cwd=other)
    assert str(Runtime().record(km_b.kernel_id).uid) == OWNER  # the same uid
    out = (await run_cell(kc_b, "%container list")).check()
    assert theirs not in out and "secret plan" not in out
    for command in (f"delete {theirs}", f"diff {theirs}", f"restore {theirs}"):
        cell = await run_cell(kc_b, f"%container {command}", timeout=60)
        assert cell.status == "error" and f"no snapshot named {theirs!r}" in cell.evalue, cell
    assert theirs in snapshots.names(OWNER)


# ---- 8. the kernel's log -----------------------------------------------------------------


async def test_8_the_kernel_log_is_capped_and_keeps_its_tail(
    kernels: Kernels, make_spec: Any
) -> None:
    km, kc = await kernels.start(make_spec())
    runtime = Runtime()
    log = runtime.log_path(km.kernel_id)
    assert log.is_relative_to(volume.volume_dir()), "the log is on the host's root filesystem"
    flood = textwrap.dedent(
        """
        import errno
        result = "ok"
        with open("/run/sandbox/kernel.log", "ab", buffering=0) as f:
            for _ in range(200):
                try:
                    f.write(b"y" * (1 << 20))
                except OSError as err:
                    result = errno.errorcode[err.errno]
                    break
        print(result)
        """
    )
    out = (await run_cell(kc, flood, timeout=120)).check()
    assert out.strip() == "EDQUOT", out
    assert log.stat().st_size <= LOG_CAP

    # The provisioner's poll keeps the tail; then the kernel can write again.
    def trimmed() -> bool:
        # Done, not under way: a trim empties the log, then writes its note and the
        # tail (what the kernel appends in between lands before the tail).
        with open(log, "rb") as handle:
            return log.stat().st_size < LOG_CAP // 2 and handle.read(15) == b"[sandbox-kernel"

    await wait_until(trimmed, 30, "the log to be trimmed")
    (
        await run_cell(kc, "open('/run/sandbox/kernel.log', 'a').write('\\nthe-tail-marker\\n')")
    ).check()
    done = await run_cli("logs", km.kernel_id, "--tail", "1")
    assert done.stdout.strip() == "the-tail-marker", done


# ---- 9 and 10. names and malformed requests ----------------------------------------------


async def test_9_10_bad_names_and_malformed_requests_are_refused(
    kernels: Kernels, make_spec: Any
) -> None:
    _, kc = await kernels.start(make_spec())
    report = await cell_json(
        kc,
        """
        deep = b"[" * 100000 + b"]" * 100000 + b"\\n"
        out = {
            "newline": send(signed("snapshot", {"name": "x\\n"})),
            "list_json": send_raw(b"[]\\n"),
            "null_json": send_raw(b"null\\n"),
            "deep": send_raw(deep),
            "nan_time": send(signed("list", {}, time=float("nan"))),
            "args_list": send(signed("list", [])),
        }
        print(json.dumps({k: (v or {}).get("error", repr(v)) for k, v in out.items()}))
        """,
    )
    assert "is not valid" in report.pop("newline"), report
    assert "stale" in report.pop("nan_time"), report
    for case, error in report.items():
        assert error and "Traceback" not in error, (case, error)
    out = (await run_cell(kc, "%container list")).check()
    assert "Your snapshots" in out


# ---- 11. a cross-kernel restore under load ------------------------------------------------


async def test_11_no_message_leaves_a_restored_process_with_the_old_key(
    kernels: Kernels, make_spec: Any, names: list[str]
) -> None:
    spec = make_spec(memory="1G")
    km_a, kc_a = await kernels.start(spec)
    # 300 MB: restored lazily (SANDBOX_KERNEL_LAZY_RESTORE is 256M by default).
    (await run_cell(kc_a, "import numpy as np; big = np.ones(300 << 20, dtype=np.uint8)")).check()
    name = fresh(names)
    (await run_cell(kc_a, f"%container snapshot {name}", timeout=120)).check()
    kc_a.stop_channels()
    await km_a.shutdown_kernel(now=True)
    # The machine busy: three CPU spinners on two cores (bounded to ten minutes).
    spin = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"
    spinners = [await asyncio.create_subprocess_exec(sys.executable, "-c", spin) for _ in range(3)]
    try:
        for round_ in range(20):
            km_b, kc_b = await kernels.start(spec)
            try:
                # jupyter_client raises "Invalid Signature" on a message signed with
                # kernel A's key; a Jupyter server would drop it and the cell hang.
                cell = await run_cell(kc_b, f"%container restore {name}", timeout=120)
                assert cell.status == "ok", (round_, cell)
                assert "Restored to snapshot" in cell.stdout, (round_, cell)
                out = (await run_cell(kc_b, "print(int(big[:1000].sum()))")).check()
                assert out.strip() == "1000", (round_, out)
            finally:
                kc_b.stop_channels()
                with contextlib.suppress(Exception):
                    await km_b.shutdown_kernel(now=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            await spinner.wait()
