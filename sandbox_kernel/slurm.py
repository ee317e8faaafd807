"""Kernels as Slurm jobs: the Jupyter server's side.

A kernel start submits a job (``sbatch``) that asks for the kernel's CPUs and
memory. On the node Slurm picks, the job runs ``sandbox-kernel node-run SPEC``
(``runtime/noderun.py``), which asks that node's daemon, as the submitting user,
to start the kernel's container, forwards the node's ports to it, and writes where
they are. Here, the provisioner forwards the ports of the connection file (on
this machine) to the node's. The job lives as long as the kernel: ``scancel``
stops the kernel, and a kernel shutdown cancels the job. See docs/design.md,
"Clusters".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, SandboxError
from .runtime.fsutil import write_json
from .runtime.noderun import pipe

#: Seconds a start waits for its job to run the kernel.
START_TIMEOUT = 180.0
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
#: Job states in which the kernel may still come or run.
ALIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SUSPENDED"}


#: Each kernel's job carries its kernel id in its comment, after this mark.
COMMENT = "sandbox-kernel "


def kernel_jobs() -> list[dict[str, str]]:
    """The kernels' jobs Slurm knows (of every user for root, else the caller's):
    ``{"kernel_id", "job", "node", "state", "user"}`` each. Blocks."""
    if shutil.which("squeue") is None:
        return []
    done = subprocess.run(
        ["squeue", "-h", "-o", "%i|%N|%T|%u|%Z|%k"], capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    found = []
    for line in done.stdout.splitlines():
        job, node, state, user, folder, comment = (line.split("|", 5) + [""] * 6)[:6]
        if comment.startswith(COMMENT):
            found.append({"kernel_id": comment[len(COMMENT):], "job": job, "node": node or "-",
                          "state": state.lower(), "user": user, "dir": folder})  # fmt: skip
    return found


#: Seconds the forwarder waits to reach the kernel's node for a new connection.
CONNECT_TIMEOUT = 5.0
#: Seconds without a heartbeat from a running kernel's node-run after which its
#: node is taken for dead (Slurm itself notices after its SlurmdTimeout, and more).
DEAD_AFTER = 10.0


class SlurmError(SandboxError):
    """A job could not be submitted or did not start the kernel; the message says why."""


def jobs_dir() -> Path:
    """Where a server keeps its kernels' job files: a folder the nodes see too (the
    user's home at a site). ``$SANDBOX_KERNEL_SLURM_DIR`` moves it."""
    found = os.environ.get("SANDBOX_KERNEL_SLURM_DIR")
    folder = Path(found) if found else Path.home() / ".local/share/sandbox-kernel/slurm"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def sbatch_args(limits: dict[str, Any], partition: str, account: str, time_limit: str) -> list[str]:
    """The resources of a kernel's job: its CPUs (whole ones) and memory. Slurm must
    not start a kernel's job again by itself (a requeue would start it from
    scratch): a kernel comes back through its provisioner, from its snapshots."""
    args = ["--no-requeue"]
    cpus = limits.get("cpus")
    if cpus:
        args.append(f"--cpus-per-task={max(1, math.ceil(float(cpus)))}")
    memory = limits.get("memory")
    if memory:
        args.append(f"--mem={max(1, int(memory) >> 20)}M")
    for flag, value in (("--partition", partition), ("--account", account),
                        ("--time", time_limit)):  # fmt: skip
        if value:
            args.append(f"{flag}={value}")
    return args


async def submit(kernel_id: str, spec_file: Path, log_file: Path, sbatch: list[str]) -> int:
    """Submit the job that runs the kernel ``spec_file`` describes; its job id.

    Raises:
        SlurmError: there is no ``sbatch``, or it refused the job.
    """
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: this machine is no Slurm submit host")
    # exec: the job's process is node-run itself, which a scancel's SIGTERM
    # reaches and lets finish (a shell in between would die and take it along).
    command = f"exec {sys.executable} -m sandbox_kernel.runtime.noderun {spec_file}"
    code, out, err = await _run(
        "sbatch", "--parsable", f"--job-name=sk-{kernel_id[:8]}",
        f"--comment={COMMENT}{kernel_id}", f"--chdir={spec_file.parent}",
        f"--output={log_file}", *sbatch, f"--wrap={command}",
    )  # fmt: skip
    if code != 0:
        raise SlurmError(f"sbatch refused the kernel's job: {(err or out).strip()}")
    return int(out.strip().split(";")[0])


async def job_state(job_id: int | str) -> str:
    """A job's state as squeue has it, "" once it is gone."""
    code, out, _ = await _run("squeue", "-h", "-j", str(job_id), "-o", "%T")
    return out.strip() if code == 0 else ""


async def _run(*argv: str, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, "", f"{argv[0]} did not answer in {timeout:.0f} s"
    return proc.returncode or 0, out.decode(), err.decode()


class Forwarder:
    """Listens on ``host``'s ports and forwards each connection to the kernel's node;
    :meth:`retarget` points new connections elsewhere and closes the old ones (the
    frontend's ZeroMQ sockets reconnect by themselves)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.target: tuple[str, dict[str, int]] | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.links: set[asyncio.StreamWriter] = set()

    async def listen(self, ports: dict[str, int]) -> None:
        for name, port in ports.items():
            server = await asyncio.start_server(
                functools.partial(self._link, name), self.host, port
            )
            self.servers.append(server)

    def retarget(self, address: str, ports: dict[str, int]) -> None:
        self.target = (address, dict(ports))
        for writer in list(self.links):
            writer.close()

    async def _link(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Followed from the moment it is accepted: a retarget or close while the
        # node's side is still being reached closes it too (none is left open).
        self.links.add(writer)
        far_writer: asyncio.StreamWriter | None = None
        try:
            if self.target is None:
                return
            address, ports = self.target
            try:
                far_reader, far = await asyncio.wait_for(
                    asyncio.open_connection(address, ports[name]), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                return
            far_writer = far
            if writer.is_closing():
                return  # retargeted or closed meanwhile
            self.links.add(far)
            await asyncio.gather(pipe(reader, far), pipe(far_reader, writer))
        finally:
            for end in (writer, far_writer):
                if end is not None:
                    end.close()
                    self.links.discard(end)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for writer in list(self.links):
            writer.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers.clear()


class SlurmJob:
    """One kernel's job, as the provisioner follows it: in place of a local
    :class:`~sandbox_kernel.kernel_process.KernelProcess`, the same methods.

    Attributes:
        job_id: Slurm's id of the job, None before the submission.
        node: the node the kernel runs on, once it runs.
    """

    def __init__(self, kernel_id: str, log: Any) -> None:
        self.kernel_id = kernel_id
        self.log = log
        self.job_id: int | None = None
        self.node: str | None = None
        self.shutdown_requested = False
        self.forwarder = Forwarder("127.0.0.1")
        #: The node this kernel was on when it stopped answering, if it did.
        self.lost_node: str | None = None
        self._status: int | None = None
        self._signalled: int | None = None
        self._watching: asyncio.Task[None] | None = None
        self._beat: tuple[int, float] = (0, time.monotonic())
        #: How many times the kernel restarted in this job (node-run's count).
        self.epoch = 0
        #: The ready file's inode and time when :meth:`_follow` last read it.
        self._ready_seen: tuple[int, int] = (0, 0)

    @property
    def pid(self) -> int | None:
        """The job id (what jupyter_client asks of a process: whether there is one)."""
        return self.job_id if self._status is None else None

    @property
    def running(self) -> bool:
        return self.job_id is not None and self._status is None

    def launching(self) -> None:
        self._status = self._signalled = None
        self.shutdown_requested = False

    def files(self) -> tuple[Path, Path, Path]:
        return self._file("json"), self._file("ready"), self._file("log")

    def _file(self, suffix: str) -> Path:
        """The kernel's file ``KERNEL_ID.suffix`` in the jobs folder."""
        return jobs_dir() / f"{self.kernel_id}.{suffix}"

    def _follow(self) -> bool:
        """Point the forwarder at where the ready file says the kernel runs, if that
        changed (the kernel moved to another node: ``migrate.py``); whether it did."""
        ready = self.files()[1]
        try:
            # Opened each time (NFS revalidates at open, where a stat may answer from
            # its cache), read only when it is another file than the one read last.
            with open(ready, "rb") as handle:
                st = os.fstat(handle.fileno())
                if (st.st_ino, st.st_mtime_ns) == self._ready_seen:
                    return False  # read already (a move writes a new file)
                where = json.loads(handle.read())
        except (OSError, ValueError):
            return False
        self._ready_seen = (st.st_ino, st.st_mtime_ns)
        job = int(where.get("job") or 0)
        if not job or job == self.job_id:
            return False
        self.log.info("Kernel %s moved from %s (job %s) to %s (job %s)", self.kernel_id,
                      self.node, self.job_id, where["node"], job)  # fmt: skip
        self.job_id, self.node = job, str(where["node"])
        self.forwarder.retarget(where["address"], {k: int(v) for k, v in where["ports"].items()})
        self._beat = (0, time.monotonic())
        return True

    async def _watch(self) -> None:
        """Follow a move as soon as its ready file is written (within 20 ms: the
        notebook's sockets wait for it; an open of one small file each time)."""
        while True:
            self._follow()
            await asyncio.sleep(0.02)  # a shared folder tells no one: looked at

    def _silent(self) -> bool:
        """Whether node-run's heartbeat (``KERNEL_ID.alive``) stopped for
        :data:`DEAD_AFTER` seconds: its node is gone. Clocks are not compared, only
        whether the file's time moved."""
        try:
            # Opened, not only stat'ed: NFS revalidates a file's attributes at open
            # (close-to-open), where a stat may answer from its cache for a minute.
            fd = os.open(self._file("alive"), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False  # not written yet
        try:
            mtime = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        seen, since = self._beat
        now = time.monotonic()
        if mtime != seen:
            self._beat = (mtime, now)
            return False
        return now - since > DEAD_AFTER

    async def start(
        self, spec: dict[str, Any], local_ports: dict[str, int], sbatch: list[str]
    ) -> str:
        """Submit the kernel's job and wait until its kernel runs; forward
        ``local_ports`` to it. The node it runs on."""
        spec_file, ready, log_file = self.files()
        ready.unlink(missing_ok=True)
        self._file("alive").unlink(missing_ok=True)
        write_json(spec_file, {**spec, "sbatch": sbatch})  # 0600: it holds the kernel's key
        self.job_id = await submit(self.kernel_id, spec_file, log_file, sbatch)

        def ended(state: str) -> str:
            tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
            return f"job {self.job_id} ended ({state or 'gone'}) before its kernel ran:\n{tail}"

        def late(state: str) -> str:
            return (f"job {self.job_id} did not run its kernel within {START_TIMEOUT:.0f} s "
                    f"(it is {state}); see squeue -j {self.job_id}")  # fmt: skip

        where = await self._ready_when(lambda _: True, ended, late, cancel_if_late=True)
        self.node = str(where["node"])
        self.epoch = int(where.get("epoch") or 0)
        await self.forwarder.listen(local_ports)
        self.forwarder.retarget(where["address"], {k: int(v) for k, v in where["ports"].items()})
        self._watching = asyncio.ensure_future(self._watch())
        return self.node

    async def adopt(self, job_id: int, local_ports: dict[str, int]) -> str:
        """Follow the running kernel of job ``job_id`` again (a restarted Jupyter
        server): forward ``local_ports`` to where its ready file says it runs
        (another job's node, if it moved meanwhile). The node.

        Raises:
            SlurmError: its job has ended, or never wrote where the kernel runs.
        """
        self.job_id = job_id
        try:
            where = json.loads(self.files()[1].read_text())
        except (OSError, ValueError):
            raise SlurmError(f"job {job_id} never said where its kernel runs") from None
        self.job_id = int(where.get("job") or job_id)
        if await self.state() not in ALIVE_STATES:
            raise SlurmError(f"job {self.job_id} of kernel {self.kernel_id} has ended")
        self.node = str(where["node"])
        await self.forwarder.listen(local_ports)
        self.forwarder.retarget(where["address"], {k: int(v) for k, v in where["ports"].items()})
        self._watching = asyncio.ensure_future(self._watch())
        return self.node

    async def _ready_when(
        self,
        accept: Callable[[dict[str, Any]], bool],
        ended: Callable[[str], str],
        late: Callable[[str], str],
        cancel_if_late: bool = False,
    ) -> dict[str, Any]:
        """Wait until the job's ready file says what ``accept`` wants (a start, a
        restart in the job); what it says. Its folder is looked at every 10 ms,
        squeue asked twice a second (a round trip to slurmctld).

        Raises:
            SlurmError: the job ended (``ended(state)``), or not in time (``late``).
        """
        ready = self.files()[1]
        deadline = time.monotonic() + START_TIMEOUT
        asked = 0.0
        while True:
            with contextlib.suppress(OSError, ValueError):
                where: dict[str, Any] = json.loads(ready.read_text())
                if accept(where):
                    return where
            await asyncio.sleep(0.01)  # the shared folder, looked at: Slurm pushes nothing
            if time.monotonic() - asked < 0.5:
                continue
            asked = time.monotonic()
            state = await self.state()
            if state not in ALIVE_STATES:
                raise SlurmError(ended(state))
            if time.monotonic() > deadline:
                if cancel_if_late:
                    await self.cancel()
                raise SlurmError(late(state))

    async def state(self) -> str:
        """The job's state as squeue has it, "" once it is gone."""
        if self.job_id is None:
            return ""
        return await job_state(self.job_id)

    # ---- a restart in the same job: the container and its files stay ----------------

    def restarting(self) -> None:
        """Tell node-run that the kernel's coming end is a restart's."""
        write_json(self._file("restarting"), {"job": self.job_id})

    def exited(self) -> bool:
        """Whether the kernel's process ended for a restart and its job waits for
        the new one (node-run's ``KERNEL_ID.exited``)."""
        try:
            said = json.loads(self._file("exited").read_text())
        except (OSError, ValueError):
            return False
        return str(said.get("job")) == str(self.job_id) and said.get("epoch") == self.epoch

    async def relaunch(self, spec: dict[str, Any]) -> str:
        """Start the kernel again in its job, with ``spec``'s command, environment
        and connection; wait until it runs. The node.

        Raises:
            SlurmError: the job ended, or did not start it in time.
        """
        self._file("exited").unlink(missing_ok=True)
        write_json(self._file("relaunch"), spec)  # 0600: it holds the kernel's key
        where = await self._ready_when(
            lambda where: int(where.get("epoch") or 0) > self.epoch,
            lambda _: f"job {self.job_id} ended before the kernel restarted",
            lambda _: f"job {self.job_id} did not restart the kernel in time",
        )
        self.epoch = int(where["epoch"])
        self._status = None
        return str(self.node)

    async def poll(self) -> int | None:
        if self._status is not None:
            return self._status
        if self.job_id is None:
            return 1
        if self.exited():  # its job waits for the restart's new process
            self._status = 0 if self.shutdown_requested else -(self._signalled or 1)
            return self._status
        self._follow()  # before asking: a kernel that moved is followed, not lost
        state = await self.state()
        if state in ALIVE_STATES:
            if not (state == "RUNNING" and self._silent()):
                return None
            self.lost_node = self.node
            self.log.warning("Kernel %s: its node %s stopped answering (no heartbeat for "
                             "%.0f s)", self.kernel_id, self.node, DEAD_AFTER)  # fmt: skip
            await _run("scancel", str(self.job_id))
        self._status = 0 if self.shutdown_requested else -(self._signalled or 1)
        await self._stop_following()
        return self._status

    async def _stop_following(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        await self.forwarder.close()

    async def wait(self) -> int:
        while True:
            status = await self.poll()
            if status is not None:
                return status
            await asyncio.sleep(0.2)  # Slurm reports a job's end to no one: asked

    async def send_signal(self, signum: int) -> None:
        """Interrupt the kernel (node-run passes SIGINT on); end it for any other."""
        if self.job_id is None:
            return
        if signum == signal.SIGINT:
            await _run("scancel", "--batch", f"--signal={signal.SIGINT.name}", str(self.job_id))
            return
        self._signalled = signum
        await self.cancel()

    async def cancel(self) -> None:
        """End the job (node-run removes the kernel) and wait until it is gone."""
        if self.job_id is None:
            return
        await _run("scancel", str(self.job_id))
        if self.lost_node is not None:
            return  # Slurm ends it once it hears from the node again, or gives it up
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await self.state() not in ALIVE_STATES:
                return
            await asyncio.sleep(0.2)  # Slurm reports a job's end to no one: asked

    async def forget(self) -> None:
        await self._stop_following()
        for path in self.files()[:2]:
            path.unlink(missing_ok=True)
        for suffix in ("alive", "move.json", "moving", "restarting", "exited", "relaunch"):
            self._file(suffix).unlink(missing_ok=True)


def check_backend(backend: str) -> str:
    if backend not in ("local", "slurm"):
        raise ConfigError("backend", backend, "is not known; use local or slurm")
    return backend
