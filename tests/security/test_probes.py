"""The probe battery of ../shared/SECURITY.md: notebook code a user could type, each
asserting the safe outcome.

Each probe prints a JSON report of what it tried and what happened; a probe that
reaches something it must not fails with that report. Numbers in test names are the
probes' numbers in SECURITY.md. Network probes reach only this machine: the
kernels' own addresses, the host ends of their veths, and addresses that have no
route from a kernel (192.0.2.1 is reserved for documentation).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.runtime import Runtime, bundle, volume
from sandbox_kernel.runtime.mounts import mounts_under

from ..integration.probe import run_cell
from .conftest import SECRETS

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

#: ctypes set-up shared by the probes that make raw syscalls.
LIBC = textwrap.dedent(
    """
    import ctypes, errno, json, os
    libc = ctypes.CDLL(None, use_errno=True)
    def call(fn, *args, restype=ctypes.c_int):
        fn.restype = restype
        res = fn(*args)
        return 'ok' if res >= 0 else errno.errorcode[ctypes.get_errno()]
    def sys_(nr, *args):
        return call(libc.syscall, ctypes.c_long(nr), *args, restype=ctypes.c_long)
    """
)


async def probe(kc: Any, code: str, libc: bool = False) -> dict[str, Any]:
    """Run ``code`` (which prints one JSON object last) in the kernel; return it.
    With ``libc``, the ctypes helpers of :data:`LIBC` come first."""
    cell = await run_cell(kc, (LIBC if libc else "") + textwrap.dedent(code), timeout=120)
    out = cell.check().strip().splitlines()
    assert out, f"the probe printed nothing: {cell.stderr}"
    report: dict[str, Any] = json.loads(out[-1])
    return report


async def test_01_no_other_users_files(pair) -> None:
    probes, _, kc, _, _ = pair
    r = await probe(
        kc,
        f"""
        import os, json, sys
        def ls(path):
            try:
                return sorted(os.listdir(path))
            except OSError as err:
                return err.strerror
        print(json.dumps({{
            "home": ls("/home"), "up": ls("../.."),
            # Folders on the way to the Python environment's mounts are fine.
            "root": [e for e in (ls("/root") if isinstance(ls("/root"), list) else [])
                     if not any(p.startswith(os.path.join("/root", e) + "/")
                                for p in (sys.prefix, sys.base_prefix, sys.exec_prefix))],
            "secret": os.path.exists({str(probes.secret_file)!r}),
            "parent_secret": os.path.exists("../host-secret.txt"),
            "state": os.path.exists("/var/lib/sandbox-kernel"),
        }}))
    """,
    )
    assert isinstance(r["home"], list) and len(r["home"]) <= 1, f"other homes visible: {r}"
    assert not r["root"], f"/root shows more than the way to Python: {r}"
    assert not r["secret"] and not r["parent_secret"], f"a host file next to cwd is visible: {r}"
    assert not r["state"], f"the runtime's state is visible: {r}"
    assert "host-secret.txt" not in r["up"], f"../.. shows host files: {r}"


async def test_02_only_the_kernels_own_processes(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import os, json
        cmds = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmds[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
                except OSError:
                    pass
        print(json.dumps({"cmds": cmds, "ppid_of_1": open("/proc/1/stat").read().split()[3]}))
    """,
    )
    cmds = r["cmds"]
    assert cmds["1"].startswith("/usr/bin/tini -v -- "), (
        f"PID 1 is not the container's init: {cmds}"
    )
    assert r["ppid_of_1"] == "0"
    strangers = {
        p: c for p, c in cmds.items() if p != "1" and "ipykernel" not in c and "python" not in c
    }
    assert not strangers, f"processes that are not the kernel's are visible: {strangers}"


async def test_03_no_server_secrets_in_the_environment(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import os, json
        print(json.dumps({"env": dict(os.environ), "init": open("/proc/1/environ").read()}))
    """,
    )
    for name, value in SECRETS.items():
        assert name not in r["env"], f"{name} reached the kernel"
        assert value not in r["init"], f"the value of {name} is in PID 1's environment"


async def test_04_other_kernels_and_host_services_are_unreachable(pair) -> None:
    _, km_a, kc, km_b, _ = pair
    listener = socket.create_server(("0.0.0.0", 0))  # a host service on every address
    host_port = listener.getsockname()[1]
    gateway = Runtime().record(km_a.kernel_id).kernel_ip.rsplit(".", 1)[0]
    gateway += "." + str(int(km_a.ip.rsplit(".", 1)[1]) - 1)
    targets = [(km_b.ip, km_b.shell_port), (km_b.ip, km_b.iopub_port), (gateway, host_port),
               ("127.0.0.1", host_port)]  # fmt: skip
    try:
        r = await probe(
            kc,
            f"""
            import socket, json
            out = {{}}
            for host, port in {targets!r}:
                s = socket.socket(); s.settimeout(2)
                try:
                    s.connect((host, port)); out[f"{{host}}:{{port}}"] = "reached"
                except OSError as err:
                    out[f"{{host}}:{{port}}"] = err.strerror or "timed out"
                finally:
                    s.close()
            print(json.dumps(out))
        """,
        )
    finally:
        listener.close()
    reached = {t: v for t, v in r.items() if v == "reached"}
    assert not reached, f"the kernel reached {reached}"
    # Its own connection file: 0600 on the host, with an HMAC key.
    info = json.loads(Path(km_a.connection_file).read_text())
    assert os.stat(km_a.connection_file).st_mode & 0o777 == 0o600
    assert info["key"] and info["signature_scheme"] == "hmac-sha256"


async def test_05_mount_and_umount_are_refused(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        libc=True,
        code="""
        os.makedirs("/tmp/m", exist_ok=True)
        print(json.dumps({
            "mount": call(libc.mount, b"none", b"/tmp/m", b"tmpfs", ctypes.c_ulong(0), None),
            "umount": call(libc.umount2, b"/proc", 0),
            "umount_cwd": call(libc.umount2, os.getcwd().encode(), 2),
        }))
    """,
    )
    assert r == {"mount": "EPERM", "umount": "EPERM", "umount_cwd": "EPERM"}, r


async def test_06_no_user_namespace_and_no_release_agent(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        libc=True,
        code="""
        import glob, shutil, subprocess
        out = {"unshare": call(libc.unshare, 0x10000000 | 0x00020000)}  # NEWUSER | NEWNS
        if shutil.which("unshare"):
            done = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
            out["unshare -Urm"] = done.returncode
        writable = []
        for agent in glob.glob("/sys/fs/cgroup/**/release_agent", recursive=True):
            try:
                open(agent, "w").write("/tmp/x")
                writable.append(agent)
            except OSError:
                pass
        out["release_agent_writable"] = writable
        print(json.dumps(out))
    """,
    )
    assert r["unshare"] == "EPERM", r
    assert r.get("unshare -Urm", 1) != 0, f"unshare -Urm worked: {r}"
    assert not r["release_agent_writable"], r


async def test_06_root_inside_is_an_unprivileged_host_uid(pair) -> None:
    # The hardening behind probes 5 to 18: a user namespace. Root inside maps to an
    # unused host uid; the kernel's own uid and gid map to themselves, so its files
    # keep their owner on the host.
    _, km, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, os
        print(json.dumps({
            "uid": os.getuid(), "gid": os.getgid(),
            "uid_map": open("/proc/self/uid_map").read().split(),
            "gid_map": open("/proc/self/gid_map").read().split(),
            "setgroups": open("/proc/self/setgroups").read().strip(),
        }))
    """,
    )
    root, uid, gid = str(bundle.CONTAINER_ROOT), str(r["uid"]), str(r["gid"])
    assert r["uid_map"] == ["0", root, "1", uid, uid, "1"], f"uid map: {r}"
    assert r["gid_map"] == ["0", root, "1", gid, gid, "1"], f"gid map: {r}"
    pid = await Runtime().container_pid(km.kernel_id)
    assert pid is not None
    # Every namespace of the kernel is its own (none is the host's); the user
    # namespace is not the host's.
    for kind in ("user", "net", "mnt", "pid", "ipc", "uts", "cgroup"):
        inside = os.readlink(f"/proc/{pid}/ns/{kind}")
        assert inside != os.readlink(f"/proc/self/ns/{kind}"), f"{kind} namespace is the host's"


async def test_07_processes_outside_are_invisible(pair) -> None:
    _, _, kc, _, _ = pair
    me = os.getpid()  # this test runner, on the host
    r = await probe(
        kc,
        libc=True,
        code=f"""
        out = {{"kill": None, "ptrace": call(libc.ptrace, 16, {me}, None, None)}}
        try:
            os.kill({me}, 0); out["kill"] = "ok"
        except OSError as err:
            out["kill"] = errno.errorcode[err.errno]
        print(json.dumps(out))
    """,
    )
    assert r["ptrace"] in ("ESRCH", "EPERM"), f"ptrace of a host process: {r}"
    assert r["kill"] in ("ESRCH", "EPERM"), f"a host process answered kill 0: {r}"


async def test_08_raw_and_packet_sockets_are_refused(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import socket, json, errno
        out = {}
        for name, args in {"raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                           "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0)}.items():
            try:
                socket.socket(*args).close(); out[name] = "ok"
            except OSError as err:
                out[name] = errno.errorcode[err.errno]
        print(json.dumps(out))
    """,
    )
    assert r == {"raw": "EPERM", "packet": "EPERM"}, r


@pytest.mark.parametrize(
    ("number", "address"), [("09", "192.0.2.1"), ("10", "169.254.169.254")]
)  # fmt: skip
async def test_09_10_no_route_out_with_network_none(pair, number: str, address: str) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        f"""
        import socket, json, errno
        s = socket.socket(); s.settimeout(5)
        try:
            s.connect(({address!r}, 80)); out = "reached"
        except socket.timeout:
            out = "timed out"
        except OSError as err:
            out = errno.errorcode[err.errno]
        print(json.dumps({{"connect": out}}))
    """,
    )
    assert r["connect"] == "ENETUNREACH", f"probe {number}: {address} gave {r}"


async def test_11_cgroup_files_are_read_only(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import glob, json
        wrote, tried = [], 0
        for name in ("cgroup.procs", "memory.limit_in_bytes", "memory.max", "pids.max",
                     "cpu.cfs_quota_us", "tasks"):
            for path in glob.glob(f"/sys/fs/cgroup/**/{name}", recursive=True):
                tried += 1
                try:
                    open(path, "w").write("1")
                    wrote.append(path)
                except OSError:
                    pass
        print(json.dumps({"tried": tried, "wrote": wrote}))
    """,
    )
    assert r["tried"] > 0, "no cgroup file found to try"
    assert not r["wrote"], f"the kernel wrote cgroup files: {r['wrote']}"


async def test_12_keyrings_are_refused_and_proc_keys_masked(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        libc=True,
        code="""
        out = {"add_key": sys_(248, b"user", b"probe", b"x", 1, -3),  # to the session keyring
               "keyctl": sys_(250, 0, -3, 0)}  # KEYCTL_GET_KEYRING_ID
        try:
            out["proc_keys"] = open("/proc/keys").read()
        except OSError as err:
            out["proc_keys"] = errno.errorcode[err.errno]
        print(json.dumps(out))
    """,
    )
    assert r["add_key"] == "EPERM" and r["keyctl"] == "EPERM", r
    assert r["proc_keys"] in ("", "EACCES", "ENOENT", "EPERM"), f"/proc/keys shows {r}"


async def test_13_kernel_modules_are_refused(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        libc=True,
        code="""
        fd = os.open("/dev/null", os.O_RDONLY)
        print(json.dumps({"init_module": sys_(175, None, 0, b""),
                          "finit_module": sys_(313, fd, b"", 0),
                          "delete_module": sys_(176, b"loop", 0)}))
    """,
    )
    assert set(r.values()) == {"EPERM"}, r


async def test_14_sysrq_and_core_pattern_are_read_only(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, errno
        out = {}
        for path, text in (("/proc/sysrq-trigger", "h"), ("/proc/sys/kernel/core_pattern", "|/tmp/x")):
            try:
                open(path, "w").write(text); out[path] = "written"
            except OSError as err:
                out[path] = errno.errorcode[err.errno]
        print(json.dumps(out))
    """,
    )
    assert "written" not in r.values(), r


async def test_15_kcore_timer_list_and_firmware_are_masked(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, os, errno
        out = {}
        for path in ("/proc/kcore", "/proc/timer_list"):
            try:
                out[path] = len(open(path, "rb").read(4096))
            except OSError as err:
                out[path] = errno.errorcode[err.errno]
        try:
            out["/sys/firmware"] = os.listdir("/sys/firmware")
        except OSError as err:
            out["/sys/firmware"] = errno.errorcode[err.errno]
        print(json.dumps(out))
    """,
    )
    assert r["/proc/kcore"] in (0, "EACCES", "EPERM", "ENOENT"), r
    assert r["/proc/timer_list"] in (0, "EACCES", "EPERM", "ENOENT"), r
    assert r["/sys/firmware"] in ([], "EACCES", "EPERM", "ENOENT"), r


async def test_16_only_the_standard_devices(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, os, stat, errno
        devices = sorted(n for n in os.listdir("/dev")
                         if stat.S_ISCHR(os.lstat(f"/dev/{n}").st_mode)
                         or stat.S_ISBLK(os.lstat(f"/dev/{n}").st_mode))
        opened = {}
        for path in ("/dev/sda", "/dev/vda", "/dev/mem", "/dev/fuse", "/dev/kmsg"):
            try:
                os.close(os.open(path, os.O_RDONLY)); opened[path] = "opened"
            except OSError as err:
                opened[path] = errno.errorcode[err.errno]
        try:
            os.mknod("/tmp/null2", 0o666 | stat.S_IFCHR, os.makedev(1, 3)); mknod = "ok"
        except OSError as err:
            mknod = errno.errorcode[err.errno]
        print(json.dumps({"devices": devices, "opened": opened, "mknod": mknod}))
    """,
    )
    allowed = {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "console"}
    assert set(r["devices"]) <= allowed, f"extra devices: {set(r['devices']) - allowed}"
    assert "opened" not in r["opened"].values(), r
    assert r["mknod"] == "EPERM", r


async def test_17_setuid_binaries_give_nothing(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, shutil, subprocess
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
        out = {"no_new_privs": status["NoNewPrivs"].strip()}
        for tool in ("su", "sudo", "passwd"):
            path = shutil.which(tool)
            if path:
                done = subprocess.run([path, "-c", "id -u"] if tool == "su" else [path, "id", "-u"],
                                      capture_output=True, text=True, stdin=subprocess.DEVNULL)
                out[tool] = (done.returncode, done.stdout.strip())
        print(json.dumps(out))
    """,
    )
    assert r.pop("no_new_privs") == "1"
    gained = {tool: res for tool, res in r.items() if res[0] == 0 and res[1] == "0"}
    assert not gained, f"a setuid binary gave root: {gained}"


async def test_18_no_capabilities(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json
        print(json.dumps({k: v.strip() for k, v in (l.split(":", 1) for l in
              open("/proc/self/status").read().splitlines()) if k.startswith("Cap")}))
    """,
    )
    assert set(r.values()) == {"0000000000000000"}, r


async def test_19_fork_bomb_stops_at_the_pids_limit(pair) -> None:
    _, _, kc, _, kc_b = pair
    r = await probe(
        kc,
        """
        import json, subprocess, sys
        bomb = (
            "import os, signal, errno\\n"
            "n = 0\\n"
            "try:\\n"
            "    while True:\\n"
            "        if os.fork() == 0:\\n"
            "            signal.pause()\\n"
            "        n += 1\\n"
            "except OSError as err:\\n"
            "    print(n, errno.errorcode[err.errno], flush=True)\\n"
            "os.killpg(0, signal.SIGKILL)\\n"
        )
        done = subprocess.run([sys.executable, "-c", bomb], capture_output=True, text=True,
                              start_new_session=True, timeout=60)
        count, code = done.stdout.split()
        print(json.dumps({"forked": int(count), "errno": code}))
    """,
    )
    assert r["errno"] == "EAGAIN" and r["forked"] < 128, r
    assert (await run_cell(kc_b, "print(1 + 1)")).check().strip() == "2"
    assert (await run_cell(kc, "print(2 + 2)")).check().strip() == "4"


async def test_20_memory_bomb_is_killed_inside_the_kernels_cgroup(pair) -> None:
    _, km_a, kc, _, kc_b = pair
    r = await probe(
        kc,
        """
        import json, subprocess, sys
        done = subprocess.run([sys.executable, "-c", "b = bytearray(2 << 30)"], capture_output=True)
        print(json.dumps({"returncode": done.returncode}))
    """,
    )
    assert r["returncode"] == -9, f"the 2 GB child of a 512 MB kernel was not OOM-killed: {r}"
    assert Runtime().oom_killed(km_a.kernel_id)
    assert (await run_cell(kc, "print('alive')")).check().strip() == "alive"
    assert (await run_cell(kc_b, "print('alive')")).check().strip() == "alive"


async def test_21_busy_loops_are_held_to_the_cpu_quota(pair) -> None:
    _, _, kc, _, _ = pair
    # Each spinner's own CPU time, from its rusage as it is reaped: os.times()'s
    # children_* would also count every child the shared kernel reaped in earlier
    # probes (the fork bomb, the memory bomb).
    r = await probe(
        kc,
        """
        import json, os, subprocess, sys, time
        spin = "import time\\nend = time.time() + 2\\nwhile time.time() < end: pass"
        cores = os.cpu_count() or 2
        start = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
        cpu = []
        for p in procs:
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            cpu.append(usage.ru_utime + usage.ru_stime)
        wall = time.monotonic() - start
        print(json.dumps({"cpu": cpu, "wall": wall, "cores": cores,
                          "codes": [p.returncode for p in procs]}))
    """,
    )
    assert r["codes"] == [0] * r["cores"], f"a spinner failed: {r}"
    if r["cores"] < 2:
        pytest.skip("one core: spinners cannot use more than a 1-CPU quota here")
    # 1 CPU of quota: the spinners together get at most about one core's time;
    # without it they would use about one core each.
    used = sum(r["cpu"]) / r["wall"]
    assert used < 1.3, f"{r['cores']} spinners used {used:.2f} cores: {r}"


async def test_22_a_disk_fill_stops_at_the_kernels_quota(pair) -> None:
    _, _, kc, _, kc_b = pair
    before = shutil.disk_usage(volume.volume_dir()).free
    r = await probe(
        kc,
        """
        import errno, json, os
        chunk, written, err, files = b"x" * (64 << 20), 0, None, 0
        try:
            while written < (4 << 30):
                with open(f"fill-{files}", "wb") as handle:
                    files += 1
                    handle.write(chunk)
                    written += len(chunk)
        except OSError as e:
            err = errno.errorcode[e.errno]
        small = 0
        try:
            while small < 100000:
                open(f"small-{small}", "w").close()
                small += 1
        except OSError as e:
            small_err = errno.errorcode[e.errno]
        for name in os.listdir("."):
            if name.startswith(("fill-", "small-")):
                os.unlink(name)
        print(json.dumps({"written": written, "errno": err, "small_errno": small_err}))
    """,
    )
    # The kernelspec's disk is 1G: its layer takes no more (data and metadata).
    assert r["errno"] == "EDQUOT" and r["written"] <= 1 << 30, r
    assert r["small_errno"] == "EDQUOT", r
    assert before - shutil.disk_usage(volume.volume_dir()).free < 1200 << 20
    out = await run_cell(kc_b, "open('mine', 'wb').write(b'y' * (64 << 20)); print('ok')")
    assert out.check().strip() == "ok", "the neighbour could not write"
    await run_cell(kc_b, "import os; os.unlink('mine')")


async def test_23_file_descriptors_stop_at_the_limit(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, os, resource, errno
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fds, err = [], None
        try:
            while len(fds) < 100000:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            err = errno.errorcode[e.errno]
        for fd in fds:
            os.close(fd)
        print(json.dumps({"soft": soft, "hard": hard, "opened": len(fds), "errno": err}))
    """,
    )
    assert r["errno"] == "EMFILE" and r["hard"] == 4096 and r["opened"] < 4096, r


async def test_24_no_descriptors_leak_in_from_the_host(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, os
        out = {}
        for fd in os.listdir("/proc/1/fd"):
            try:
                out[fd] = os.readlink(f"/proc/1/fd/{fd}")
            except OSError:
                pass
        print(json.dumps(out))
    """,
    )
    # ipykernel puts pipes on 1 and 2 to capture output; the log stays open too.
    assert r["0"] == "/dev/null" and "/run/sandbox/kernel.log" in r.values(), r
    paths = {fd: t for fd, t in r.items() if t.startswith("/")}
    outside = {fd: t for fd, t in paths.items() if t.endswith("(deleted)") or "sandbox-kernel" in t}
    assert not outside, f"host files are open in the kernel: {outside}"


async def test_25_no_container_runtime_socket(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import json, os, stat
        sockets = []
        for base in ("/run", "/var/run", "/tmp"):
            for folder, _, files in os.walk(base):
                for name in files:
                    path = os.path.join(folder, name)
                    try:
                        if stat.S_ISSOCK(os.lstat(path).st_mode):
                            sockets.append(path)
                    except OSError:
                        pass
        known = [p for p in ("/var/run/docker.sock", "/run/containerd/containerd.sock",
                             "/run/crio/crio.sock", "/run/podman/podman.sock", "/run/runc")
                 if os.path.exists(p)]
        print(json.dumps({"sockets": sockets, "known": known}))
    """,
    )
    assert not r["sockets"] and not r["known"], r


async def test_26_no_tty_to_inject_keystrokes_into(pair) -> None:
    _, _, kc, _, _ = pair
    r = await probe(
        kc,
        """
        import fcntl, json, os, termios, errno
        out = {"tty_nr": open("/proc/self/stat").read().rsplit(")", 1)[1].split()[4]}
        try:
            fcntl.ioctl(0, termios.TIOCSTI, b"x"); out["tiocsti"] = "ok"
        except OSError as err:
            out["tiocsti"] = errno.errorcode[err.errno]
        try:
            os.close(os.open("/dev/tty", os.O_RDWR)); out["dev_tty"] = "opened"
        except OSError as err:
            out["dev_tty"] = errno.errorcode[err.errno]
        print(json.dumps(out))
    """,
    )
    assert r["tty_nr"] == "0", r
    assert r["tiocsti"] != "ok" and r["dev_tty"] != "opened", r


async def test_27_mounts_do_not_propagate_to_the_host(pair) -> None:
    _, km_a, kc, _, _ = pair
    kdir = Runtime().kernel_dir(km_a.kernel_id)
    before = set(mounts_under(kdir))
    r = await probe(
        kc,
        libc=True,
        code="""
        os.makedirs("/tmp/p", exist_ok=True)
        print(json.dumps({"bind": call(libc.mount, b"/tmp", b"/tmp/p", None, ctypes.c_ulong(4096), None)}))
    """,
    )  # 4096: MS_BIND
    assert r["bind"] == "EPERM", r
    assert set(mounts_under(kdir)) == before


async def test_28_the_control_channel_refuses_forged_and_replayed_requests(pair) -> None:
    _, _, kc, km_b, _ = pair
    r = await probe(
        kc,
        f"""
        import hashlib, hmac, json, secrets, socket, time
        creds = json.load(open("/run/sandbox/control.json"))
        def send(message):
            with socket.create_connection((creds["host"], creds["port"]), timeout=10) as conn:
                conn.sendall(json.dumps(message).encode() + b"\\n")
                return json.loads(conn.makefile().readline())
        def signed(kernel_id, token):
            m = {{"op": "list", "args": {{}}, "kernel_id": kernel_id,
                  "nonce": secrets.token_hex(16), "time": time.time()}}
            body = json.dumps(m, sort_keys=True)
            m["mac"] = hmac.new(bytes.fromhex(token), body.encode(), hashlib.sha256).hexdigest()
            return m
        good = signed(creds["kernel_id"], creds["token"])
        out = {{
            "own": send(good)["ok"],
            "replayed": send(good),
            "other_kernel": send(signed({km_b.kernel_id!r}, creds["token"])),
            "forged": send(signed(creds["kernel_id"], "00" * 32)),
        }}
        print(json.dumps(out))
    """,
    )
    assert r["own"] is True, r
    assert "replayed" in r["replayed"]["error"], r
    assert "another kernel" in r["other_kernel"]["error"], r
    assert "signature" in r["forged"]["error"], r
