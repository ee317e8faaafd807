"""How CRIU is run for a kernel's checkpoint and restore.

CRIU reads the rlimits of the processes it dumps. For processes of another user that
needs CAP_SYS_RESOURCE, which some machines withhold even from root (this project's
build machines do). There the dump runs CRIU as the kernel's own user, keeping every
other capability, with CRIU's ``unprivileged`` option; the restore runs as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from sandbox_kernel.errors import RequirementMissing

from . import paths
from .criu import find_criu, keep_kdat_cache
from .fsutil import aflocked, atomic_write, flocked

#: Capability numbers and names, as setpriv spells them (linux/capability.h).
CAPABILITIES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
    "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
    "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
    "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)  # fmt: skip
SYS_RESOURCE = CAPABILITIES.index("sys_resource")
#: Options for every checkpoint and restore: the client's TCP connections are dumped
#: and closed on restore (the client reconnects); the netns is the runtime's own;
#: POSIX file locks (SQLite holds them, IPython's history among others) are kept.
#: A connection still in a listening socket's queue (a client's ZMQ socket
#: reconnecting at the moment of the freeze) is left out: the kernel has not
#: accepted it, and the client retries, as it does after tcp-close. Without that,
#: one snapshot in a few hundred under load failed ("In-flight connection").
BASE_CONFIG = "tcp-established\ntcp-close\nnetwork-lock skip\nfile-locks\nskip-in-flight\n"


def _capabilities(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    return 0


def dump_needs_owner() -> bool:
    """Whether CRIU must dump as the kernel's user (no CAP_SYS_RESOURCE here)."""
    return not _capabilities("CapEff") >> SYS_RESOURCE & 1


def criu_binary() -> str:
    """The CRIU to restore with.

    Raises:
        RequirementMissing: no CRIU >= 4.2 is installed.
    """
    criu = find_criu()
    if criu is None:
        raise RequirementMissing("CRIU >= 4.2", "sandbox-kernel install-criu")
    keep_kdat_cache(criu, paths.state_dir() / "criu.kdat.stamp")
    return criu


def dump_command(uid: int, gid: int) -> tuple[str, dict[str, str], str]:
    """CRIU for dumping a kernel of ``uid``:``gid``: (binary, environment, config).

    The config is what the kernel's ``criu.conf`` must hold during the dump, beyond
    :data:`BASE_CONFIG`.

    Raises:
        RequirementMissing: no CRIU >= 4.2, or no setpriv where one is needed.
    """
    criu = criu_binary()
    if not dump_needs_owner():
        return criu, {}, ""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RequirementMissing("setpriv", "apt-get install -y util-linux")
    bounding = _capabilities("CapBnd")
    caps = ",".join(f"+{name}" for bit, name in enumerate(CAPABILITIES) if bounding >> bit & 1)
    wrapper = paths.state_dir() / "bin" / "criu-as-owner"
    script = (
        "#!/bin/sh\n"
        "# Written by sandbox-kernel: CRIU as the kernel's own user (see checkpoint.py).\n"
        f'exec {setpriv} --reuid="$SANDBOX_KERNEL_UID" --regid="$SANDBOX_KERNEL_GID" '
        f"--clear-groups --inh-caps=-all,{caps} --ambient-caps=-all,{caps} "
        f'{criu} "$@"\n'
    )
    if not wrapper.exists() or wrapper.read_text() != script:
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(wrapper, script.encode(), mode=0o755)
    env = {"SANDBOX_KERNEL_UID": str(uid), "SANDBOX_KERNEL_GID": str(gid)}
    return str(wrapper), env, "unprivileged\n"


#: The ``criu-restore`` wrapper (see :func:`restore_command`); UNSHARE and CRIU are
#: replaced by their paths.
_RESTORE_WRAPPER = """#!/bin/sh
# Written by sandbox-kernel: CRIU in the container's cgroup namespace (see
# checkpoint.py). runc passes SANDBOX_KERNEL_CGROUP on. Shell builtins but for
# one mkdir: this runs at every restore.
if [ "$1" = swrk ] && [ -n "$SANDBOX_KERNEL_CGROUP" ]; then
    dirs=
    for top in /sys/fs/cgroup/*/; do
        [ -f "${top}cgroup.procs" ] && dirs="$dirs ${top}$SANDBOX_KERNEL_CGROUP"
    done
    mkdir -p $dirs || exit 1
    if [ -f /sys/fs/cgroup/cpuset/cgroup.procs ]; then
        d=/sys/fs/cgroup/cpuset
        old_ifs=$IFS
        IFS=/
        for part in $SANDBOX_KERNEL_CGROUP; do
            IFS=$old_ifs
            up=$d
            d=$d/$part
            for f in cpuset.cpus cpuset.mems; do
                v=
                read -r v < "$d/$f"
                if [ -z "$v" ]; then
                    read -r v < "$up/$f"
                    echo "$v" > "$d/$f" || exit 1
                fi
            done
        done
        IFS=$old_ifs
    fi
    for dir in $dirs; do
        echo $$ > "$dir/cgroup.procs" || exit 1
    done
    exec UNSHARE --cgroup CRIU "$@"
fi
exec CRIU "$@"
"""


def restore_command(criu: str, cgroup: str) -> tuple[str, dict[str, str]]:
    """CRIU for restoring the container whose cgroup is ``cgroup`` (below each
    hierarchy's root): (binary, environment for runc, which passes it on).

    CRIU gives the restored processes its own cgroup namespace: the images of an
    unprivileged dump have no cgroups, and CRIU keeps the one it runs in. So
    ``criu swrk`` first joins the container's cgroups (made here if runc has not
    yet; a new cpuset takes its parent's cpus and mems) and unshares a cgroup
    namespace rooted there, as ``runc run`` gives a kernel: the kernel then sees
    its own cgroups as ``/``, not the host's paths.

    Raises:
        RequirementMissing: no unshare (util-linux).
    """
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    if unshare is None:
        raise RequirementMissing("unshare", "apt-get install -y util-linux")
    wrapper = paths.state_dir() / "bin" / "criu-restore"
    script = _RESTORE_WRAPPER.replace("UNSHARE", unshare).replace("CRIU", criu)
    if not wrapper.exists() or wrapper.read_text() != script:
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(wrapper, script.encode(), mode=0o755)
    return str(wrapper), {"SANDBOX_KERNEL_CGROUP": cgroup}


#: Who may open a userfaultfd that also catches the kernel's own faults: 0, only
#: holders of CAP_SYS_PTRACE in the host's user namespace.
UFFD_SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")


def _uffd_lock() -> Path:
    """Held while :func:`userfaultfd_window` is open; it holds the sysctl's own value."""
    return paths.state_dir() / "userfaultfd.lock"


@contextlib.asynccontextmanager
async def userfaultfd_window() -> AsyncIterator[None]:
    """Let processes without privilege open userfaultfds for the time of a lazy restore.

    In a lazy restore each restored process opens its own userfaultfd and hands it
    to CRIU's lazy-pages daemon. The kernel's processes live in a user namespace,
    so they lack CAP_SYS_PTRACE on the host, and this machine's
    ``vm.unprivileged_userfaultfd`` of 0 refuses them. It is set to 1 only while a
    lazy restore runs (a fraction of a second), one restore at a time, and set back.
    The kernels themselves can never open one: their seccomp filter refuses the
    syscall. The value to go back to is kept in the lock file, so if this process
    dies in between, the next window or ``gc`` puts it back (:func:`close_stale_window`).
    """
    if not UFFD_SYSCTL.exists():
        yield
        return
    lock = _uffd_lock()
    lock.parent.mkdir(parents=True, exist_ok=True)
    async with aflocked(lock) as fd:
        before = _saved_value(fd) or UFFD_SYSCTL.read_text().strip()
        if before != "1":
            os.pwrite(fd, before.encode(), 0)
            os.fsync(fd)
            UFFD_SYSCTL.write_text("1\n")
        try:
            yield
        finally:
            if before != "1":
                UFFD_SYSCTL.write_text(f"{before}\n")
                os.ftruncate(fd, 0)


def _saved_value(fd: int) -> str:
    """The sysctl value a window left in the lock file when its process died."""
    return os.pread(fd, 16, 0).decode(errors="replace").strip()


def close_stale_window() -> bool:
    """Put ``vm.unprivileged_userfaultfd`` back if a process died inside
    :func:`userfaultfd_window`; True if it did. A window still open is left alone."""
    lock = _uffd_lock()
    if not lock.exists() or not UFFD_SYSCTL.exists():
        return False
    with flocked(lock, blocking=False) as fd:
        if fd is None:
            return False  # a restore is in its window right now
        saved = _saved_value(fd)
        if not saved:
            return False
        UFFD_SYSCTL.write_text(f"{saved}\n")
        os.ftruncate(fd, 0)
        return True
