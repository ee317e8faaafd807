"""The OCI spec of a kernel container: isolation settings that must never regress."""

from pathlib import Path

from sandbox_kernel.runtime import bundle
from sandbox_kernel.runtime.bundle import (
    Bind,
    SpecParams,
    make_spec,
    resources,
    shm_options,
    wrap_argv,
)
from sandbox_kernel.runtime.limits import Limits


def params(**changes: object) -> SpecParams:
    base = dict(
        argv=["/venv/bin/python", "-m", "ipykernel_launcher", "-f", "/run/sandbox/c.json"],
        env={"HOME": "/home/kernel"},
        cwd="/work/nb",
        uid=1000,
        gid=1000,
        hostname="kernel-1234",
        cgroups_path="/sandbox-kernel/sk-1",
        limits=Limits.parse(memory="1G", cpus="1.5", pids="100"),
        binds=[Bind(Path("/usr"), "/usr"), Bind(Path("/x/mnt"), "/work/nb", readonly=False)],
    )
    base.update(changes)
    return SpecParams(**base)  # type: ignore[arg-type]


def test_every_namespace_is_new_and_owned_by_the_user_namespace() -> None:
    spec = make_spec(params())
    kinds = [ns["type"] for ns in spec["linux"]["namespaces"]]
    # The user namespace first, no namespace joined by path: CRIU dumps a user
    # namespace only together with every namespace it owns.
    assert kinds[0] == "user"
    assert set(kinds) == {"user", "pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert not any("path" in ns for ns in spec["linux"]["namespaces"])
    assert spec["hostname"] == "kernel-1234"


def test_root_inside_is_an_unprivileged_host_id_and_the_kernel_keeps_its_own() -> None:
    linux = make_spec(params())["linux"]
    root = {"containerID": 0, "hostID": bundle.CONTAINER_ROOT, "size": 1}
    assert linux["uidMappings"] == [root, {"containerID": 1000, "hostID": 1000, "size": 1}]
    assert linux["gidMappings"] == [root, {"containerID": 1000, "hostID": 1000, "size": 1}]
    assert bundle.CONTAINER_ROOT != 0
    assert bundle.id_mappings(7, 0) == [{"containerID": 0, "hostID": 7, "size": 1}]


def test_unprivileged_process() -> None:
    process = make_spec(params())["process"]
    assert process["user"] == {"uid": 1000, "gid": 1000}
    assert process["noNewPrivileges"] is True
    assert all(caps == [] for caps in process["capabilities"].values())
    assert process["terminal"] is False


def test_limits_with_swap_capped_at_memory() -> None:
    res = resources(Limits.parse(memory="1G", cpus="1.5", pids="100"))
    assert res["memory"] == {"limit": 1 << 30, "swap": 1 << 30}
    assert res["cpu"] == {"quota": 150_000, "period": 100_000}
    assert res["pids"] == {"limit": 100}
    assert res["devices"] == [{"allow": False, "access": "rwm"}]


def test_no_swap_setting_where_the_host_cannot_limit_it() -> None:
    assert "swap" not in resources(Limits.parse(memory="1G"), memory_swap=False)["memory"]


def test_unlimited_sets_nothing() -> None:
    assert resources(Limits()) == {"devices": [{"allow": False, "access": "rwm"}]}


def test_stdio_goes_to_the_log_inside_the_container() -> None:
    argv = wrap_argv(["python", "-m", "ipykernel_launcher"])
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3] == "/run/sandbox/kernel.log"
    assert argv[4:] == ["python", "-m", "ipykernel_launcher"]


def test_binds_are_read_only_unless_asked_and_sorted_parents_first() -> None:
    spec = make_spec(
        params(binds=[Bind(Path("/a/b"), "/w/x/y"), Bind(Path("/c"), "/w", readonly=False)])
    )
    binds = [m for m in spec["mounts"] if m["type"] == "bind"]
    assert [m["destination"] for m in binds] == ["/w", "/w/x/y"]
    assert "rw" in binds[0]["options"]
    assert "ro" in binds[1]["options"]


def test_proc_is_masked_and_sys_read_only() -> None:
    spec = make_spec(params())
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert "/proc/sysrq-trigger" in spec["linux"]["readonlyPaths"]
    sysfs = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    cgroup = next(m for m in spec["mounts"] if m["destination"] == "/sys/fs/cgroup")
    assert "ro" in sysfs["options"] and "ro" in cgroup["options"]
    assert cgroup["type"] == "cgroup"


def test_v1_cgroups_are_read_only_binds_of_the_kernels_own() -> None:
    own = Bind(Path("/sys/fs/cgroup/memory/sandbox-kernel/sk-1"), "/sys/fs/cgroup/memory")
    spec = make_spec(params(cgroup_binds=[own]))
    cgroup = next(m for m in spec["mounts"] if m["destination"] == "/sys/fs/cgroup")
    assert cgroup["type"] == "tmpfs"
    assert "/sys/fs/cgroup" in spec["linux"]["readonlyPaths"]
    memory = next(m for m in spec["mounts"] if m["destination"] == "/sys/fs/cgroup/memory")
    assert memory["type"] == "bind" and memory["source"] == str(own.source)
    assert "ro" in memory["options"]
    # The tmpfs is mounted before the binds on it.
    points = [m["destination"] for m in spec["mounts"]]
    assert points.index("/sys/fs/cgroup") < points.index("/sys/fs/cgroup/memory")


def test_seccomp_refuses_namespaces_keys_and_the_new_mount_api() -> None:
    profile = bundle.seccomp_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {
        name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO"
        and rule["errnoRet"] == bundle.EPERM and "args" not in rule for name in rule["names"]
    }  # fmt: skip
    assert {"unshare", "setns", "keyctl", "add_key", "bpf", "fsopen", "userfaultfd"} <= denied
    clone_rules = [r for r in profile["syscalls"] if r["names"] == ["clone"]]
    flags = {r["args"][0]["value"] for r in clone_rules}
    assert flags == set(bundle.NAMESPACE_FLAGS.values())
    for rule in clone_rules:  # (flags & flag) == flag: only calls that set the flag
        assert rule["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
        assert rule["args"][0]["valueTwo"] == rule["args"][0]["value"]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": bundle.ENOSYS} in (
        profile["syscalls"]
    )


def test_rlimits_cap_open_files_and_file_size_at_the_disk_size() -> None:
    assert bundle.rlimits(4096, 10 << 30) == [
        {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096},
        {"type": "RLIMIT_FSIZE", "hard": 10 << 30, "soft": 10 << 30},
    ]
    assert bundle.rlimits(4096, None) == [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}]


def _shm(spec: dict[str, object]) -> list[str]:
    (mount,) = [m for m in spec["mounts"] if m["destination"] == "/dev/shm"]  # type: ignore[attr-defined]
    return list(mount["options"])


def test_dev_shm_follows_the_memory_limit_or_its_own_setting() -> None:
    assert "size=524288k" in _shm(make_spec(params(limits=Limits.parse(memory="512M"))))
    assert "size=131072k" in _shm(
        make_spec(params(limits=Limits.parse(memory="512M"), shm=128 << 20))
    )
    # Unlimited memory and no setting: tmpfs's own default; never the old fixed 64M.
    unlimited = _shm(make_spec(params(limits=Limits())))
    assert not [o for o in unlimited if o.startswith("size=")]
    assert shm_options(None, None) == [] and shm_options(None, 1 << 30) == ["size=1048576k"]
