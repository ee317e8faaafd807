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
import hashlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Enum, Float, Int, List, Unicode, Union, default, validate

from .backends import DAEMON_MODES, Backend, choose
from .errors import DaemonError, KernelNotFound, KernelStateError
from .kernel_process import KernelProcess
from .runtime import Limits
from .runtime.bundle import CONNECTION_FILE
from .runtime.layers import check_image_name
from .runtime.lifecycle import default_uid
from .runtime.limits import parse_size
from .runtime.network import NETWORK_MODES
from .runtime.pool import POOL_MAX, check_pool
from .runtime.ports import KERNEL_PORTS
from .runtime.pristine import PER_LAUNCH_ENV
from .runtime.shared import default_store, forget_published
from .slurm import ALIVE_STATES, SlurmError, SlurmJob, sbatch_args

#: The IPython extension every sandboxed kernel loads: the ``%container`` magic.
MAGICS = "sandbox_kernel.magics"
#: Variables of the server's environment a kernel gets by default. Everything else
#: (tokens, cloud keys, other users' settings) stays out.
DEFAULT_ENV_ALLOWLIST = ["LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "JPY_SESSION_NAME",
                         "PYTHONUNBUFFERED", "PYTHONHASHSEED", "MPLBACKEND"]  # fmt: skip


def allowed_env(env: dict[str, str], allowlist: list[str], always: set[str]) -> dict[str, str]:
    """The variables of ``env`` a kernel gets: those named in ``allowlist`` (a
    trailing ``*`` matches a prefix) and those in ``always`` (the kernelspec's)."""
    exact = {n for n in allowlist if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in allowlist if n.endswith("*"))
    return {
        k: v
        for k, v in env.items()
        if k in always or k in exact or (prefixes and k.startswith(prefixes))
    }


class SandboxProvisioner(KernelProvisionerBase):
    """Runs each kernel in its own runc container with its own network namespace.

    The kernel binds its ZMQ ports on every interface of its namespace; the
    connection info the client gets points at the container's own address, which
    only the host can reach. A backend (``backends.py``) does the work: the
    sandbox-kernel daemon, or this process when it is root; it also serves the
    kernel's ``%container`` magic. A :class:`KernelProcess` follows the kernel's
    process and derives its exit status.
    """

    daemon = Enum(
        list(DAEMON_MODES), default_value="auto",
        help="`auto`: run kernels through the sandbox-kernel daemon when its socket "
        "exists, else in this server, which must then be root. `required`: always "
        "through the daemon. `off`: always in this (root) server.",
    ).tag(config=True)  # fmt: skip

    backend = Enum(
        ["local", "slurm"], default_value="local",
        help="`local`: kernels run on this machine. `slurm`: each kernel is a Slurm job "
        "(partition, account and time below) run by the sandbox-kernel daemon of its node; "
        "its ports are forwarded from this machine, so the connection file never changes.",
    ).tag(config=True)  # fmt: skip
    partition = Unicode("", help="Slurm partition of the kernels' jobs (empty: the default).").tag(
        config=True
    )
    account = Unicode("", help="Slurm account the kernels' jobs are charged to.").tag(config=True)
    time_limit = Unicode(
        "", help="Slurm time limit of a kernel's job, e.g. 8:00:00 (empty: the partition's)."
    ).tag(config=True)
    base = Unicode(
        "", help="Id of a base snapshot (`sandbox-kernel install --base SNAPSHOT` sets it): "
        "new kernels start by restoring its files and memory. Empty: a cold start."
    ).tag(config=True)  # fmt: skip
    class_name = Unicode(
        "", help="The class (`sandbox-kernel class publish NAME`) whose kernels these are: "
        "every start, restarts included, and every reset lands on the class's current base."
    ).tag(config=True)  # fmt: skip
    pristine_base = Bool(
        True, help="Without a base or class: start each kernel by restoring a pristine "
        "base, an idle kernel of the same configuration snapshotted before any cell, made "
        "at the first start (and again when the image, the Python environment or this "
        "package changes). False: every start is a cold start of Python."
    ).tag(config=True)  # fmt: skip
    pool = Int(
        0, help="How many kernels of this kernelspec to keep restored from its pristine "
        "base and paused, ready to be claimed: a start then only hands over its key. "
        f"Each costs an idle kernel's memory and counts against its user's quotas; "
        f"at most {POOL_MAX}. Needs the pristine base (no base or class).",
    ).tag(config=True)  # fmt: skip
    autosave = Bool(
        False, help="Checkpoint each kernel whenever it goes idle after a cell, so that "
        "`%container undo` can go back and a cell that runs out of memory ends with an "
        "error instead of a dead kernel. `sandbox-kernel install` turns it on for new "
        "kernelspecs; `%container autosave on|off` changes it for one kernel."
    ).tag(config=True)  # fmt: skip
    autosave_keep = Int(
        20, help="How many checkpoints a kernel keeps (the oldest go first; they also "
        "count against its user's snapshot quota)."
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
    shm = Union(
        [Unicode(), Int()], default_value="",
        help="Size of the kernel's /dev/shm, in bytes or with K, M, G (like Docker's "
        "--shm-size). Empty: the memory limit. Its pages count against the memory limit.",
    ).tag(config=True)  # fmt: skip
    network = Enum(
        list(NETWORK_MODES), default_value="none",
        help="`none`: no route out and no host service reachable. `egress`: outbound "
        "access through NAT, still with no host services.",
    ).tag(config=True)  # fmt: skip
    kernel_uid = Int(
        help="User id the kernel runs as. Default: the server's user; when the server "
        "runs as root, the owner of the working directory, or `unprivileged_uid`. "
        "Through the daemon, a non-root server's kernels always run as its user."
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
        self._backend: Backend | None = None
        self.process: Any = None  # a KernelProcess, or a SlurmJob for the slurm backend
        self._spec: dict[str, Any] = {}
        self._unsubscribe: Callable[[], None] = _nothing
        self._cwd: str = str(Path.cwd())
        self._launched = False
        #: A Slurm kernel's node that died: the next launch comes back elsewhere.
        self._lost_node: str | None = None
        #: A Slurm kernel's ports on this machine, kept for its life.
        self._local_ports: dict[str, int] = {}
        #: A Slurm kernel's next launch restarts it in its job (its files stay).
        self._relaunch = False

    @property
    def runner(self) -> Backend:
        """Where this kernel runs, chosen at its first use by the ``daemon`` trait.

        Raises:
            ConfigError: no daemon runs and this server is not root.
        """
        if self._backend is None:
            self._backend = choose(self.daemon, self.log)
        return self._backend

    @property
    def kernel(self) -> Any:
        """The kernel's process as followed here (made at the first use): a
        :class:`KernelProcess`, or for the slurm backend its :class:`SlurmJob`."""
        if self.process is None:
            if self.backend_is_slurm:
                self.process = SlurmJob(self.kernel_id, self.log)
                return self.process
            self.process = KernelProcess(self.runner, self.kernel_id, self.log)
            self._unsubscribe = self.runner.on_new_process(self.kernel_id, self.process.adopt)
        return self.process

    @property
    def backend_is_slurm(self) -> bool:
        return self.backend == "slurm"

    # ---- traits ------------------------------------------------------------------

    @validate("memory", "cpus", "pids", "disk")
    def _check_limit(self, proposal: dict[str, Any]) -> Any:
        # Limits.parse raises ConfigError naming the value and its fix.
        Limits.parse(**{proposal["trait"].name: proposal["value"]})
        return proposal["value"]

    @validate("shm")
    def _check_shm(self, proposal: dict[str, Any]) -> Any:
        if proposal["value"] not in ("", None):
            parse_size(proposal["value"], "shm size")
        return proposal["value"]

    @validate("pool")
    def _check_pool(self, proposal: dict[str, Any]) -> int:
        return check_pool(proposal["value"])

    @validate("image")
    def _check_image(self, proposal: dict[str, Any]) -> str:
        return check_image_name(str(proposal["value"]))

    @default("kernel_uid")
    def _default_uid(self) -> int:
        if os.geteuid() != 0:
            return os.geteuid()
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
        """Whether there is a kernel process to follow (jupyter_client's question)."""
        return self.process is not None and self.process.pid is not None

    @property
    def pid(self) -> int | None:
        """The host pid of the kernel's init (the container's PID 1), or None."""
        return None if self.process is None else self.process.pid

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Prepare the container and point the connection info at its address.

        Called by ``KernelManager.pre_start_kernel``, also on every restart. The
        superclass method is called last, with the final command, to apply the
        kernelspec's env substitutions.
        """
        km = self.parent
        self._cwd = str(kwargs.get("cwd") or str(Path.cwd()))
        config = {
            "image": self.image,
            "limits": self.limits.to_dict(),
            "network": self.network,
            "uid": self.kernel_uid,
            "gid": self.kernel_gid,
            "cwd": self._cwd,
            "executable": self.kernel_spec.argv[0],
            "base": self.base,
            "class_name": self.class_name,
            "pristine": self.pristine_base,
            "shm": self.shm,
            # As the superclass's pre_launch: no env given means this process's.
            "autosave": self.autosave,
            "retain": self.autosave_keep,
            "pool": {"size": self.pool, "spec": self._spec_digest(kwargs.get("env", os.environ))},
        }
        if self.backend_is_slurm:
            return await self._pre_launch_job(config, kwargs)
        record = await self.runner.call("prepare", kernel_id=self.kernel_id, config=config)
        try:
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
            self.kernel.launching()
            return await super().pre_launch(cmd=cmd, **kwargs)
        except BaseException:
            if not self._launched:
                await self._undo_first_launch()  # a prepared kernel that never launches
            raise

    async def _pre_launch_job(
        self, config: dict[str, Any], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """``pre_launch`` of a kernel that will be a Slurm job: its connection file
        names ports on this machine (kept across restarts), which its job's
        forwarders will reach; the container is prepared on the node by the job."""
        km = self.parent
        if km is None:
            raise KernelStateError(self.kernel_id, "the provisioner has no KernelManager")
        extra_arguments = kwargs.pop("extra_arguments", [])
        if self._local_ports:
            # The same ports through every restart, also one jupyter_client asks new
            # ports for (its restarter, before the kernel was seen alive; a kernel
            # brought back from a dead node): the notebook's sockets reconnect there.
            km.transport, km.ip = "tcp", "127.0.0.1"
            for name, port in self._local_ports.items():
                setattr(km, name, port)
        elif km.ip != "127.0.0.1" or not km.shell_port:
            km.transport, km.ip = "tcp", "127.0.0.1"
            for name in KERNEL_PORTS:
                setattr(km, name, 0)  # jupyter_client picks free ones
        env = kwargs.get("env", {})
        km.write_connection_file(jupyter_session=env.get("JPY_SESSION_NAME", ""))
        self.connection_info = km.get_connection_info()
        self._local_ports = {name: int(getattr(km, name)) for name in KERNEL_PORTS}
        self._spec = {"kernel_id": self.kernel_id, "config": config}
        self.kernel.launching()
        cmd = km.format_kernel_cmd(extra_arguments=extra_arguments)
        launched: dict[str, Any] = await super().pre_launch(cmd=cmd, **kwargs)
        return launched

    def _spec_digest(self, env: dict[str, str]) -> str:
        """What, besides the container's configuration, a pool kernel must share with
        this start (see runtime/pool.py): the kernelspec's command and the
        environment the kernel would get, but for what differs per notebook."""
        spec_env = set(self.kernel_spec.env) if self.kernel_spec else set()
        allowed = allowed_env(env, self.env_allowlist, spec_env)
        data = {
            "argv": list(self.kernel_spec.argv) if self.kernel_spec else [],
            "env": {k: v for k, v in allowed.items() if k not in PER_LAUNCH_ENV},
        }
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the container. Called by ``KernelManager.launch_kernel``.

        The host's connection file in ``cmd`` is replaced by the container's copy,
        and only allowed variables of ``env`` reach the kernel.
        """
        km = self.parent
        # jupyter_client puts the file's realpath in the command, and a
        # MultiKernelManager whose connection_dir is relative keeps a relative one.
        host_file = os.path.realpath(km.connection_file) if km is not None else ""
        argv = [CONNECTION_FILE if os.path.realpath(arg) == host_file else arg for arg in cmd]
        argv.append(f"--ext={MAGICS}")
        spec_env = set(self.kernel_spec.env) if self.kernel_spec else set()
        env = allowed_env(kwargs.get("env", {}), self.env_allowlist, spec_env)
        first = not self._launched
        if self.backend_is_slurm:
            return await self._launch_job(argv, env)
        try:
            started = await self.runner.call(
                "launch", kernel_id=self.kernel_id, argv=argv, env=env,
                connection=_plain(dict(self.connection_info)),
            )  # fmt: skip
            self._track(started["pid"])
        except BaseException:
            if first:
                await self._undo_first_launch()
            raise
        self._launched = True
        # Only once it started: the KernelManager makes (and later closes) its
        # context for the control socket right after this returns.
        _reconnect_quickly(km)
        if started["warning"]:
            self.log.warning("Kernel %s started cold: %s", self.kernel_id, started["warning"])
        self.log.info("Started sandboxed %s (%s)", started["describe"], self.runner.name)
        return self.connection_info

    async def _launch_job(self, argv: list[str], env: dict[str, str]) -> KernelConnectionInfo:
        """Submit the kernel's job and forward its ports (see ``slurm.py``)."""
        spec = {**self._spec, "argv": argv, "env": env, "store": str(default_store()),
                "connection": _plain(dict(self.connection_info))}  # fmt: skip
        ports = {name: int(self.connection_info[name]) for name in KERNEL_PORTS}  # type: ignore[literal-required]
        resources = sbatch_args(self.limits.to_dict(), self.partition, self.account,
                                self.time_limit)  # fmt: skip
        if self._relaunch:
            self._relaunch = False
            try:
                node = await self.kernel.relaunch(
                    {"argv": argv, "env": env, "connection": spec["connection"]}
                )
            except SlurmError as err:  # a new job, then: its files are lost
                self.log.warning("Kernel %s: %s; starting it as a new job", self.kernel_id, err)
                await self.kernel.cancel()
                await self.kernel.forget()
                self.process = None
                self.kernel.launching()
            else:
                _reconnect_quickly(self.parent)
                self.log.info("Restarted sandboxed kernel %s in its Slurm job %s on %s",
                              self.kernel_id, self.kernel.job_id, node)  # fmt: skip
                return self.connection_info
        lost, self._lost_node = self._lost_node, None
        if lost:
            # Its node died: elsewhere, from what it published to the shared store.
            spec["recover"] = True
            resources.append(f"--exclude={lost}")
        try:
            node = await self.kernel.start(spec, ports, resources)
        except BaseException:
            await self.kernel.cancel()
            await self.kernel.forget()
            raise
        self._launched = True
        _reconnect_quickly(self.parent)
        self.log.info("Started sandboxed kernel %s as Slurm job %s on %s",
                      self.kernel_id, self.kernel.job_id, node)  # fmt: skip
        return self.connection_info

    async def _undo_first_launch(self) -> None:
        """Remove everything of a kernel whose first launch failed, at any step:
        jupyter_client calls no cleanup for a kernel that never started. Seen with
        many kernels in one server, where a step past the start failed and the
        container ran on until ``gc``."""
        self.kernel.forget()
        await self.runner.call("remove", kernel_id=self.kernel_id)

    def _track(self, pid: int | None) -> None:
        """Follow ``pid`` as the kernel's process (see :meth:`KernelProcess.track`).
        Also called by bench/snapshot.py after a restore it made itself."""
        self.kernel.track(pid)

    # ---- process-like methods ----------------------------------------------------

    async def poll(self) -> int | None:
        """None while the container's kernel runs, else its exit status.

        runc keeps no exit status for detached containers, so the status is
        derived: -9 for a kernel the OOM killer or ``kill`` ended, the signal's
        negative for other signals sent here, 0 after a requested shutdown, else 1.
        A kernel restored in place (by the CLI or its magic) is followed, not
        reported gone. While it runs, a freeze left by a crashed snapshot is thawed
        and its log kept under its cap.
        """
        if self.backend_is_slurm:
            job_status: int | None = await self.kernel.poll()
            if job_status is not None and self.kernel.lost_node:
                self._lost_node = self.kernel.lost_node
            return job_status
        if self.kernel.running:
            try:
                await self.runner.call("tend", kernel_id=self.kernel_id)
            except DaemonError as err:  # tending can wait: the kernel runs
                self.log.debug("Kernel %s: %s", self.kernel_id, err)
            return None
        status: int | None = await self.kernel.poll()
        return status

    async def wait(self) -> int | None:
        """Wait for the kernel to exit, without polling; return its status.

        Called by ``KernelManager.finish_shutdown`` and ``kill_kernel`` under their
        own timeouts. Afterwards ``has_process`` is False.
        """
        status: int | None = await self.kernel.wait()
        return status

    async def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the kernel, the container's PID 1.

        Interrupt (SIGINT) raises KeyboardInterrupt in the running cell. The signal
        goes through a pidfd, so it can never reach a process that reused the pid.
        """
        await self.kernel.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        """SIGKILL the kernel. Called by ``KernelManager`` for an immediate shutdown."""
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """SIGTERM the kernel. As PID 1 without a handler the kernel may ignore it;
        ``KernelManager`` then kills it after its shutdown wait time.
        """
        await self.send_signal(signal.SIGTERM)

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Noted, so a kernel that then exits on its own reports status 0. A Slurm
        kernel's job is told that a restart follows: it keeps the container."""
        self.kernel.shutdown_requested = True
        if restart and self.backend_is_slurm:
            await asyncio.to_thread(self.kernel.restarting)

    async def cleanup(self, restart: bool = False) -> None:
        """Take the container down. Called by ``KernelManager.cleanup_resources``.

        On a restart the writable layer and the network stay, so the new kernel
        keeps its files and address. Otherwise nothing of the kernel is left.
        """
        if self.backend_is_slurm:
            if restart and self.kernel.exited() and await self.kernel.state() in ALIVE_STATES:
                # Its job waits to start the new process in the same container.
                self._relaunch = True
                return
            # The job's end removes the kernel on its node; a restart submits anew.
            await self.kernel.cancel()
            await self.kernel.forget()
            self.process = None
            if not restart:
                await asyncio.to_thread(forget_published, default_store(), self.kernel_id)
            return
        self.kernel.forget()
        if restart:
            await self.runner.call("stop", kernel_id=self.kernel_id)
            return
        self._unsubscribe()
        await self.runner.call("remove", kernel_id=self.kernel_id)

    # ---- persistence -------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """What a restarted server needs to re-adopt this kernel (plain JSON data)."""
        info: dict[str, Any] = await super().get_provisioner_info()
        info["connection_info"] = {
            k: v.decode() if isinstance(v, bytes) else v for k, v in info["connection_info"].items()
        }
        if self.backend_is_slurm:
            info.update({"job": self.kernel.job_id, "node": self.kernel.node, "cwd": self._cwd})
            return info
        info.update({"pid": self.pid, "cwd": self._cwd, "daemon": self.runner.name == "daemon"})
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Re-adopt a running kernel container after the server restarted.

        Raises:
            KernelNotFound: the runtime no longer has the kernel (``gc`` removed it).
        """
        await super().load_provisioner_info(provisioner_info)
        # The superclass took the kernel id from the info: follow that kernel.
        self._unsubscribe()
        self.process = None
        self._cwd = provisioner_info.get("cwd") or self._cwd
        if self.backend_is_slurm:
            # Its job ran on without the server: forward the same ports to it again.
            info = provisioner_info["connection_info"]
            self._local_ports = {name: int(info[name]) for name in KERNEL_PORTS}
            try:
                node = await self.kernel.adopt(int(provisioner_info["job"]), self._local_ports)
            except SlurmError as err:
                raise KernelNotFound(self.kernel_id) from err
            self._launched = True
            self.log.info("Adopted sandboxed kernel %s, Slurm job %s on %s",
                          self.kernel_id, self.kernel.job_id, node)  # fmt: skip
            return
        pid = await self.runner.call("adopt", kernel_id=self.kernel_id)
        self._track(pid)
        self._launched = True


def _nothing() -> None:
    pass


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    """Connection info as JSON data: the key as text."""
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in info.items()}


#: How soon the frontend's sockets of a kernel (those its KernelManager's ZeroMQ
#: context makes) try again after a connection drops, and the most they back off to.
RECONNECT_IVL_MS = 10
RECONNECT_IVL_MAX_MS = 50


def _reconnect_quickly(km: Any) -> None:
    """Have the sockets ``km``'s context makes from now on (the Jupyter server's
    channels to this kernel, the clients' of ``km.client()``) reconnect after 10 ms,
    backing off to 50 ms, instead of libzmq's 100 to 200 ms.

    A restore or reset replaces the kernel's process: its connections drop, and a
    retry that comes before the new process listens is refused and waits a whole
    interval again. Measured here, a 300 MB restore's cell waited 0.13 s after the
    restored process listened. A kernel that is gone costs no more retries than
    before once the back-off reaches its ceiling.
    """
    context = getattr(km, "context", None)
    if context is None:
        return
    try:
        context.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        context.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    except (AttributeError, zmq.ZMQError):
        pass  # a context of another kind: libzmq's defaults stay
