"""The kernel provisioner: jupyter_client's way into a sandboxed kernel.

Selected by a kernelspec's ``metadata.kernel_provisioner``::

    "kernel_provisioner": {
        "provisioner_name": "sandbox-provisioner",
        "config": {"image": "host", "memory": "2G", "cpus": 1.5, "pids": 512}
    }

``config`` sets the traits below. jupyter_client's KernelManager calls
``pre_launch``, ``launch_kernel``, ``poll``, ``wait``, ``send_signal``, ``kill``,
``terminate`` and ``cleanup``; a server that persists kernels calls
``get_provisioner_info`` and, after a restart, ``load_provisioner_info``.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Enum, Float, Int, List, Unicode, Union, default, validate

from .display import format_size
from .errors import KernelStateError, SandboxError
from .runtime import KernelConfig, Limits, Runtime
from .runtime.bundle import CONNECTION_FILE
from .runtime.control import ControlServer, write_credentials
from .runtime.layers import check_image_name
from .runtime.network import NETWORK_MODES, Addresses
from .runtime.process import wait_exit
from .runtime.runtime import KERNEL_PORTS, default_uid, describe

#: How long a kernel restored from a base has to confirm it took its new key.
BASE_CONFIRM_TIMEOUT = 10.0

#: The IPython extension every sandboxed kernel loads: the ``%container`` magic.
MAGICS = "sandbox_kernel.magics"
#: Variables of the server's environment a kernel gets by default. Everything else
#: (tokens, cloud keys, other users' settings) stays out.
DEFAULT_ENV_ALLOWLIST = ["LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "JPY_SESSION_NAME",
                         "PYTHONUNBUFFERED", "PYTHONHASHSEED", "MPLBACKEND"]  # fmt: skip


class SandboxProvisioner(KernelProvisionerBase):
    """Runs each kernel in its own runc container with its own network namespace.

    The kernel binds its ZMQ ports on every interface of its namespace; the
    connection info the client gets points at the container's own address, which
    only the host can reach.
    """

    base = Unicode(
        "", help="Id of a base snapshot (`sandbox-kernel install --base SNAPSHOT` sets it): "
        "new kernels start by restoring its files and memory. Empty: a cold start."
    ).tag(config=True)  # fmt: skip
    image = Unicode(
        "host", help="Image the kernel's root filesystem comes from; `host` is a read-only "
        "view of this machine's system and of the kernel's Python environment."
    ).tag(config=True)  # fmt: skip
    memory = Union(
        [Unicode(), Int()], default_value="2G",
        help="Memory limit of the kernel's container, in bytes or with K, M, G (e.g. 2G). "
        "Swap cannot be used beyond it. Empty: unlimited.",
    ).tag(config=True)  # fmt: skip
    cpus = Union(
        [Unicode(), Int(), Float()],
        default_value="1",
        help="CPU quota of the kernel's container, in cores (e.g. 1.5). Empty: unlimited.",
    ).tag(config=True)  # fmt: skip
    pids = Union(
        [Unicode(), Int()], default_value=512,
        help="Most processes and threads the kernel's container may have. Empty: unlimited.",
    ).tag(config=True)  # fmt: skip
    disk = Union(
        [Unicode(), Int()], default_value="10G",
        help="Size of the kernel's writable layer, in bytes or with K, M, G (e.g. 5G).",
    ).tag(config=True)  # fmt: skip
    network = Enum(
        list(NETWORK_MODES), default_value="none",
        help="`none`: no route out and no host service reachable. `egress`: outbound "
        "access through NAT, still with no host services.",
    ).tag(config=True)  # fmt: skip
    kernel_uid = Int(
        help="User id the kernel runs as. Default: the server's user; when the server "
        "runs as root, the owner of the working directory, or `unprivileged_uid`."
    ).tag(config=True)  # fmt: skip
    unprivileged_uid = Int(
        65534, help="User id for kernels of a root server whose files are root's."
    ).tag(config=True)  # fmt: skip
    kernel_gid = Int(help="Group id the kernel runs as. Default: equal to the user id.").tag(
        config=True
    )
    env_allowlist = List(
        Unicode(), default_value=DEFAULT_ENV_ALLOWLIST,
        help="Names of the server's environment variables passed to the kernel; a "
        "trailing * matches a prefix. The kernelspec's own `env` always passes.",
    ).tag(config=True)  # fmt: skip

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Per instance, never the base class's shared dict.
        self.connection_info: KernelConnectionInfo = {}
        self.runtime = Runtime()
        self.pid: int | None = None
        self._pidfd: int | None = None
        self._cwd: str = str(Path.cwd())
        self._signalled: int | None = None
        self._shutdown_requested = False
        self._exit_status: int | None = None
        self._launched = False
        self.control: ControlServer | None = None

    # ---- traits ------------------------------------------------------------------

    @validate("memory", "disk")
    def _check_size(self, proposal: dict[str, Any]) -> Any:
        value = proposal["value"]
        name = proposal["trait"].name
        Limits.parse(**{name: value})
        return value

    @validate("cpus")
    def _check_cpus(self, proposal: dict[str, Any]) -> Any:
        Limits.parse(cpus=proposal["value"])
        return proposal["value"]

    @validate("pids")
    def _check_pids(self, proposal: dict[str, Any]) -> Any:
        Limits.parse(pids=proposal["value"])
        return proposal["value"]

    @validate("image")
    def _check_image(self, proposal: dict[str, Any]) -> str:
        return check_image_name(str(proposal["value"]))

    @default("kernel_uid")
    def _default_uid(self) -> int:
        return default_uid(self._cwd, self.unprivileged_uid)

    @default("kernel_gid")
    def _default_gid(self) -> int:
        return int(self.kernel_uid)

    @property
    def limits(self) -> Limits:
        """The limits the kernelspec asks for."""
        return Limits.parse(memory=self.memory, cpus=self.cpus, pids=self.pids, disk=self.disk)

    # ---- launch ------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.pid is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Prepare the container and point the connection info at its address.

        Called by ``KernelManager.pre_start_kernel``, also on every restart. The
        superclass method is called last, with the final command, to apply the
        kernelspec's env substitutions.
        """
        km = self.parent
        self._cwd = str(kwargs.get("cwd") or str(Path.cwd()))
        config = KernelConfig(
            image=self.image,
            limits=self.limits,
            network=self.network,
            uid=self.kernel_uid,
            gid=self.kernel_gid,
            cwd=self._cwd,
            executable=self.kernel_spec.argv[0],
            base=self.base,
        )
        record = await self.runtime.prepare(self.kernel_id, config)
        if self.control is None:
            host = Addresses.of(record["index"]).host_ip
            run_dir = self.runtime.run_dir(self.kernel_id)
            token = write_credentials(run_dir, host, self.kernel_id, record["uid"], record["gid"])
            self.control = ControlServer(
                self.runtime, self.kernel_id, host, record["kernel_ip"], token, self._adopt
            )
        extra_arguments = kwargs.pop("extra_arguments", [])
        if km is None:
            raise KernelStateError(self.kernel_id, "the provisioner has no KernelManager")
        km.transport = "tcp"
        km.ip = record["kernel_ip"]
        for name, port in KERNEL_PORTS.items():
            setattr(km, name, port)
        env = kwargs.get("env", {})
        km.write_connection_file(jupyter_session=env.get("JPY_SESSION_NAME", ""))
        self.connection_info = km.get_connection_info()
        cmd = km.format_kernel_cmd(extra_arguments=extra_arguments)
        self._signalled = None
        self._shutdown_requested = False
        self._exit_status = None
        return await super().pre_launch(cmd=cmd, **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the container. Called by ``KernelManager.launch_kernel``.

        The host's connection file in ``cmd`` is replaced by the container's copy,
        and only allowed variables of ``env`` reach the kernel.
        """
        km = self.parent
        host_file = km.connection_file if km is not None else ""
        argv = [CONNECTION_FILE if arg == host_file else arg for arg in cmd]
        argv.append(f"--ext={MAGICS}")
        env = self._kernel_env(kwargs.get("env", {}))
        try:
            pid = await self.runtime.start(self.kernel_id, argv, env, dict(self.connection_info))
        except BaseException:
            if not self._launched:
                # A first launch that failed leaves nothing; jupyter_client will not
                # call cleanup for a kernel that never started.
                await self.runtime.remove(self.kernel_id)
            raise
        self._launched = True
        self._track(pid)
        if self.control is not None and not self.control.listening:
            await self.control.start()
        record = self.runtime.record(self.kernel_id)
        if record.get("started_from") == "base":
            await self._confirm_base_start()
        elif record.get("base_note"):
            self.log.warning("Kernel %s started cold: %s", self.kernel_id, record["base_note"])
        self.log.info("Started sandboxed %s", describe(self.runtime.record(self.kernel_id)))
        return self.connection_info

    async def _confirm_base_start(self) -> None:
        """Let no client in before a kernel restored from a base holds its own key.

        The restored process still signs with the base's connection key until its
        magic reads the new one, then calls the control server with the new
        credentials. Without that call in time, the kernel starts cold instead.
        """
        assert self.control is not None
        try:
            await asyncio.wait_for(self.control.heard.wait(), BASE_CONFIRM_TIMEOUT)
            return
        except TimeoutError:
            pass
        note = (
            f"the kernel restored from base {self.base} did not take its new key within "
            f"{BASE_CONFIRM_TIMEOUT:.0f} s (is the sandbox_kernel.magics extension loaded?)"
        )
        self.log.warning("Kernel %s restarts cold: %s", self.kernel_id, note)
        self._track(await self.runtime.start_cold(self.kernel_id, note))

    def _kernel_env(self, env: dict[str, str]) -> dict[str, str]:
        spec_env = set(self.kernel_spec.env) if self.kernel_spec else set()
        exact = {n for n in self.env_allowlist if not n.endswith("*")}
        prefixes = tuple(n[:-1] for n in self.env_allowlist if n.endswith("*"))
        return {
            k: v
            for k, v in env.items()
            if k in spec_env or k in exact or (prefixes and k.startswith(prefixes))
        }

    async def _adopt(self, pid: int) -> None:
        """Follow the kernel's new process after a restore or reset by its magic."""
        self._track(pid)

    def _track(self, pid: int | None) -> None:
        self._close_pidfd()
        self.pid = pid
        if pid is not None:
            try:
                self._pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._pidfd = None  # already gone: poll() reports the exit

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    # ---- process-like methods ----------------------------------------------------

    def _exited(self) -> bool:
        if self._pidfd is None:
            return True
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

    async def poll(self) -> int | None:
        """None while the container's kernel runs, else its exit status.

        runc keeps no exit status for detached containers, so the status is
        derived: -9 for a kernel the OOM killer or ``kill`` ended, the signal's
        negative for other signals sent here, 0 after a requested shutdown, else 1.
        """
        if self.pid is None:
            return 0
        if not self._exited():
            await self.runtime.thaw_if_stale(self.kernel_id)
            self.runtime.trim_log(self.kernel_id)
            return None
        if await self._follow_restore():
            return None
        return self._status()

    async def _follow_restore(self) -> bool:
        """After a restore (by the CLI or a magic) the container's init is a new
        process: track it and report the kernel alive. False if the kernel is gone.
        """
        pid = None
        if not self._shutdown_requested:
            try:
                pid = await self.runtime.finish_restore(self.kernel_id)
            except SandboxError as err:
                self.log.warning("Kernel %s: a cut-short restore failed: %s", self.kernel_id, err)
        if pid is None:
            pid = await self.runtime.container_pid(self.kernel_id)
        if pid is None:
            return False
        if pid != self.pid:  # else the control server already followed it
            self._track(pid)
            self.log.info("Kernel %s was restored from a snapshot (pid %s)", self.kernel_id, pid)
        return True

    def _status(self) -> int:
        if self._exit_status is not None:
            return self._exit_status
        if self.runtime.oom_killed(self.kernel_id):
            limit = self.runtime.record(self.kernel_id)["limits"].get("memory")
            message = (
                f"The kernel ran out of memory: it used its whole memory limit "
                f"({format_size(limit)}) and the OOM killer ended it. Use less memory "
                "or raise the limit (`sandbox-kernel install --memory ...`)."
            )
            self.log.warning("Kernel %s: %s", self.kernel_id, message)
            self.runtime.append_log(self.kernel_id, message)
            status = -signal.SIGKILL
        elif self._signalled is not None:
            status = -self._signalled
        elif self._shutdown_requested:
            status = 0
        else:
            status = 1
            # Died by itself: the restarter's message says nothing of why; its log does.
            self.log.warning(
                "Kernel %s exited by itself; the end of its log:\n%s",
                self.kernel_id, self._log_tail(),
            )  # fmt: skip
        self._exit_status = status
        return status

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.runtime.log_path(self.kernel_id).read_text(errors="replace")
        except OSError as err:
            return f"(no log: {err.strerror})"
        return "\n".join(text.splitlines()[-lines:])

    async def wait(self) -> int | None:
        """Wait for the kernel to exit, without polling; return its status.

        Called by ``KernelManager.finish_shutdown`` and ``kill_kernel`` under their
        own timeouts. Afterwards ``has_process`` is False.
        """
        if self.pid is None:
            return 0
        while self._pidfd is not None:
            await wait_exit(self._pidfd)
            if not await self._follow_restore():
                break
        status = self._status()
        self._close_pidfd()
        self.pid = None
        return status

    async def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the kernel, the container's PID 1.

        Interrupt (SIGINT) raises KeyboardInterrupt in the running cell. The signal
        goes through a pidfd, so it can never reach a process that reused the pid.
        """
        if self._exited() and not await self._follow_restore():
            return
        if self._pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            return
        if signum in (signal.SIGKILL, signal.SIGTERM):
            self._signalled = signum

    async def kill(self, restart: bool = False) -> None:
        """SIGKILL the kernel. Called by ``KernelManager`` for an immediate shutdown."""
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """SIGTERM the kernel. As PID 1 without a handler the kernel may ignore it;
        ``KernelManager`` then kills it after its shutdown wait time.
        """
        await self.send_signal(signal.SIGTERM)

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Noted, so a kernel that then exits on its own reports status 0."""
        self._shutdown_requested = True

    async def cleanup(self, restart: bool = False) -> None:
        """Take the container down. Called by ``KernelManager.cleanup_resources``.

        On a restart the writable layer and the network stay, so the new kernel
        keeps its files and address. Otherwise nothing of the kernel is left.
        """
        self._close_pidfd()
        self.pid = None
        if restart:
            await self.runtime.stop(self.kernel_id)
            return
        if self.control is not None:
            await self.control.close()
            self.control = None
        await self.runtime.remove(self.kernel_id)

    # ---- persistence -------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """What a restarted server needs to re-adopt this kernel (plain JSON data)."""
        info: dict[str, Any] = await super().get_provisioner_info()
        info["connection_info"] = {
            k: v.decode() if isinstance(v, bytes) else v for k, v in info["connection_info"].items()
        }
        info.update({"pid": self.pid, "cwd": self._cwd})
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Re-adopt a running kernel container after the server restarted.

        Raises:
            KernelNotFound: the runtime no longer has the kernel (``gc`` removed it).
        """
        await super().load_provisioner_info(provisioner_info)
        self._cwd = provisioner_info.get("cwd") or self._cwd
        await asyncio.to_thread(self.runtime.adopt, self.kernel_id)
        pid = await self.runtime.container_pid(self.kernel_id)
        self._track(pid)
        self._launched = True
