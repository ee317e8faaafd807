"""The OCI runtime spec (``config.json``) of a kernel container.

Pure logic: :func:`make_spec` turns plain parameters into the dict runc reads. No
namespace, cgroup or pivot_root code lives here or anywhere else in the project;
runc does that part.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .limits import CPU_PERIOD, Limits

#: Where the kernel's run folder (connection file, log) appears inside the container.
RUN_DIR = "/run/sandbox"
CONNECTION_FILE = f"{RUN_DIR}/connection.json"
LOG_FILE = f"{RUN_DIR}/kernel.log"

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]  # fmt: skip
READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]  # fmt: skip


#: Syscalls a kernel gets EPERM for, beyond what having no capability already
#: denies: the ones Docker's default profile withholds from a container without
#: capabilities that the kernel would otherwise reach (namespaces, the new mount
#: API, keyrings, BPF, perf, userfaultfd, io_uring, handles, and the rest).
DENIED_SYSCALLS = [
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "lookup_dcookie",
    "open_by_handle_at", "name_to_handle_at", "quotactl", "quotactl_fd", "nfsservctl",
    "vhangup", "iopl", "ioperm", "syslog", "sysfs", "uselib", "ustat", "fanotify_init",
]  # fmt: skip
#: clone() flags that make namespaces: refused, as Docker does without CAP_SYS_ADMIN.
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}  # fmt: skip
EPERM, ENOSYS = 1, 38
_SECCOMP_ARCHES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


def seccomp_profile() -> dict[str, Any]:
    """The kernel's seccomp filter: allow by default, refuse :data:`DENIED_SYSCALLS`
    and namespace-making ``clone`` calls with EPERM.

    ``clone3`` passes its flags in memory, where a filter cannot read them, so it
    answers ENOSYS and the C library falls back to ``clone`` (Docker does the same).
    Syscalls of other architectures (32-bit calls on x86_64) are refused too.
    """
    syscalls: list[dict[str, Any]] = [
        {"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    for flag in NAMESPACE_FLAGS.values():
        syscalls.append(
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
             "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]}
        )  # fmt: skip
    profile: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": syscalls}
    arch = _SECCOMP_ARCHES.get(platform.machine())
    if arch:  # else runc's default: this machine's own architecture
        profile["architectures"] = [arch]
    return profile


#: The host uid and gid that root inside every kernel's user namespace maps to. It
#: owns the mount points runc makes and nothing else; no kernel process runs as it.
#: It is the same for every kernel, because a restore brings back the user namespace
#: of the snapshot, mappings included (a base is restored into other kernels).
CONTAINER_ROOT = 100000


@dataclass(frozen=True)
class Bind:
    """A host path bind-mounted at the same or another path inside the container."""

    source: Path
    target: str
    readonly: bool = True


@dataclass(frozen=True)
class SpecParams:
    """Everything :func:`make_spec` needs; all paths are host paths unless named target."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    hostname: str
    cgroups_path: str
    limits: Limits
    binds: list[Bind] = field(default_factory=list)
    nofile: int = 4096
    fsize: int | None = None  # largest file the kernel may write, in bytes
    init: str | None = None  # the container's PID 1, which runs argv (see wrap_argv)
    memory_swap: bool = True
    criu_config: Path | None = None
    root_id: int = CONTAINER_ROOT  # the host uid and gid of root inside; 0: no user namespace
    cgroup_binds: list[Bind] | None = None  # the kernel's cgroups, instead of a cgroup mount
    shm: int | None = None  # the size of /dev/shm; None: the memory limit (see shm_options)


def id_mappings(root_id: int, inside: int) -> list[dict[str, int]]:
    """A user namespace's uid (or gid) map: root to ``root_id``, and the kernel's own
    id ``inside`` to itself, so its files on the host keep their owner."""
    maps = [{"containerID": 0, "hostID": root_id, "size": 1}]
    if inside != 0:
        maps.append({"containerID": inside, "hostID": inside, "size": 1})
    return maps


def wrap_argv(argv: list[str], init: str | None = None) -> list[str]:
    """The container's process: a shell that sends stdio to the log, then execs
    ``init -- argv`` (or ``argv`` itself without an init).

    The redirect happens inside the container, so no host file descriptor is left in
    the kernel (CRIU cannot dump one), and the log outlives checkpoint and restore.
    The init (tini) is PID 1: it reaps the orphans a kernel's subprocesses leave,
    which a kernel as PID 1 would not (their pids would stay taken, up to the pids
    limit), and passes signals on to the kernel. With ``-v`` it logs how the kernel
    ended ("Main child exited with signal (with signal 'Bus error')"), which is how
    the runtime learns of a kernel killed by a signal (see ``exits.py``).
    """
    command = [init, "-v", "--", *argv] if init else argv
    return ["/bin/sh", "-c", 'exec >>"$0" 2>&1 </dev/null; exec "$@"', LOG_FILE, *command]


def rlimits(nofile: int, fsize: int | None) -> list[dict[str, Any]]:
    """The kernel's rlimits: open files, and the largest file (the disk size)."""
    found = [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]
    if fsize:
        found.append({"type": "RLIMIT_FSIZE", "hard": fsize, "soft": fsize})
    return found


def resources(limits: Limits, memory_swap: bool = True) -> dict[str, Any]:
    """The ``linux.resources`` block for ``limits``.

    ``memory_swap`` says whether the host can limit memory plus swap (cgroup v1 needs
    swap accounting for that). Where it can, swap is capped at the memory limit, so
    swap cannot be used to escape it.
    """
    res: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if limits.memory:
        res["memory"] = {"limit": limits.memory}
        if memory_swap:
            res["memory"]["swap"] = limits.memory
    if limits.cpus:
        res["cpu"] = {"quota": int(limits.cpus * CPU_PERIOD), "period": CPU_PERIOD}
    if limits.pids:
        res["pids"] = {"limit": limits.pids}
    return res


#: The container's own filesystems, before the binds.
_BASE_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
     "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
]  # fmt: skip
#: With ``cgroup_binds``: a small tmpfs at /sys/fs/cgroup for them, instead of cgroupfs.
_CGROUP_TMPFS: dict[str, Any] = {
    "destination": "/sys/fs/cgroup", "type": "tmpfs", "source": "cgroup",
    "options": ["nosuid", "noexec", "nodev", "mode=755", "size=16k"],
}  # fmt: skip
_NAMESPACES = ("pid", "network", "ipc", "uts", "mount", "cgroup")


def shm_options(shm: int | None, memory: int | None) -> list[str]:
    """The size of the kernel's /dev/shm: ``shm`` if the kernelspec sets one, else
    the memory limit, else the tmpfs default (half the host's memory). Its pages are
    charged to the kernel's memory cgroup, so the memory limit holds either way;
    PyTorch's DataLoader, Ray and Arrow put their shared buffers there."""
    size = shm or memory
    return [f"size={size // 1024}k"] if size else []


def _mounts(p: SpecParams) -> tuple[list[dict[str, Any]], list[str]]:
    """The spec's ``mounts`` and its read-only paths: the container's own filesystems,
    then the binds, parents before what is mounted below them."""
    mounts = copy.deepcopy(_BASE_MOUNTS)
    for mount in mounts:
        if mount["destination"] == "/dev/shm":
            mount["options"] += shm_options(p.shm, p.limits.memory)
    binds = list(p.binds)
    readonly = list(READONLY_PATHS)
    if p.cgroup_binds is not None:
        # Each hierarchy's own cgroup of the kernel, bound read-only onto a small
        # tmpfs that is made read-only last: CRIU restores a v1 cgroup mount by
        # mounting cgroupfs anew, which a user namespace may not; binds it can.
        mounts[-1] = copy.deepcopy(_CGROUP_TMPFS)
        binds += p.cgroup_binds
        readonly.append("/sys/fs/cgroup")
    for bind in sorted(binds, key=lambda b: len(Path(b.target).parts)):
        options = ["rbind", "nosuid", "nodev", "rprivate"]
        options.append("ro" if bind.readonly else "rw")
        mounts.append(
            {"destination": bind.target, "type": "bind", "source": str(bind.source),
             "options": options}
        )  # fmt: skip
    return mounts, readonly


def _process(p: SpecParams) -> dict[str, Any]:
    """The spec's ``process``: ``p.uid``:``p.gid``, no capabilities, no_new_privs."""
    no_caps: dict[str, list[str]] = {
        k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
    }
    return {
        "terminal": False,
        "user": {"uid": p.uid, "gid": p.gid},
        "args": wrap_argv(p.argv, p.init),
        "env": [f"{k}={v}" for k, v in sorted(p.env.items())],
        "cwd": p.cwd,
        "capabilities": no_caps,
        "rlimits": rlimits(p.nofile, p.fsize),
        "noNewPrivileges": True,
    }


def _linux(p: SpecParams, readonly: list[str]) -> dict[str, Any]:
    """The spec's ``linux``: limits, namespaces (the user namespace first, with its
    maps, unless ``p.root_id`` is 0), seccomp, and the masked and read-only paths."""
    linux: dict[str, Any] = {
        "resources": resources(p.limits, p.memory_swap),
        "cgroupsPath": p.cgroups_path,
        "namespaces": [{"type": kind} for kind in _NAMESPACES],
        "seccomp": seccomp_profile(),
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": readonly,
    }
    if p.root_id:
        linux["namespaces"].insert(0, {"type": "user"})
        linux["uidMappings"] = id_mappings(p.root_id, p.uid)
        linux["gidMappings"] = id_mappings(p.root_id, p.gid)
    return linux


def make_spec(p: SpecParams) -> dict[str, Any]:
    """The OCI config for a kernel container with the parameters ``p``.

    The container has its own user, pid, network, mount, uts, ipc and cgroup
    namespaces, all made by runc, so that all of them belong to its user namespace
    (CRIU dumps a user namespace only with everything it owns). Root inside is
    ``p.root_id`` on the host; the kernel's own uid and gid are themselves. The
    runtime moves one end of a veth pair into the network namespace once it exists.
    The process runs as ``p.uid``:``p.gid`` with no capabilities and no_new_privs.
    """
    mounts, readonly = _mounts(p)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": _process(p),
        "root": {"path": "rootfs", "readonly": False},
        "hostname": p.hostname,
        "mounts": mounts,
        "linux": _linux(p, readonly),
    }
    if p.criu_config is not None:
        # runc passes this file to CRIU on checkpoint and restore; it must be in the
        # spec the container was created with.
        spec["annotations"] = {"org.criu.config": str(p.criu_config)}
    return spec
