"""A kernel's Slurm job, on its node: ``sandbox-kernel node-run SPEC``.

Run by the job as the submitting user. It asks the node's daemon (its usual
socket) to prepare and launch the kernel the spec file describes, forwards a port
of the node for each of the kernel's ports, writes where they are beside the spec
(``KERNEL_ID.ready``, for the provisioner), and holds the job until the kernel
ends, touching ``KERNEL_ID.alive`` every second. A SIGTERM (``scancel``, or the
job's end) removes the kernel; a SIGINT interrupts it.

Meanwhile it copies the kernel's snapshots and latest checkpoint to the shared
store (:class:`Publisher`, see ``shared.py``). A spec that says ``move`` is a
kernel arriving from another node (:func:`arrive`, see
``sandbox_kernel/migrate.py``); one that says ``recover``, a kernel whose node
died, brought back from the shared store (:func:`recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from sandbox_kernel.daemon_client import DaemonClient
from sandbox_kernel.errors import ConfigError, SandboxError

from .fsutil import write_json
from .ports import KERNEL_PORTS

# The shared store's module (and the snapshot store's under it) loads when a kernel
# publishes or comes back: a job's start does not wait for it.

#: The names of automatic checkpoints (``snapshots.CHECKPOINT_PREFIX``).
CHECKPOINT_PREFIX = "ckpt-"
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def read_spec(path: Path) -> dict[str, Any]:
    """The spec file: the caller's own, closed to others (it holds the kernel's key).

    Raises:
        ConfigError: not such a file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError("spec file", str(path), "must be yours and closed to others")
        spec: dict[str, Any] = json.load(handle)
    return spec


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy ``src`` to ``dst`` until it ends; then close ``dst``. One direction of a
    forwarded connection (here, and in the provisioner's forwarder)."""
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        dst.close()


async def forward(address: str, port: int) -> asyncio.Server:
    """A port of this node (any free one) forwarding to ``address:port``."""

    async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection(address, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, far_writer), pipe(far_reader, writer))

    return await asyncio.start_server(link, "0.0.0.0", 0)


#: Seconds a kernel moving here waits for each file of the move.
MOVE_WAIT = 300.0
#: How often node-run touches ``KERNEL_ID.alive`` for the provisioner, in seconds.
HEARTBEAT = 1.0


async def _wait_for(paths: list[Path], deadline: float, ended: asyncio.Event) -> Path:
    """The first of ``paths`` to exist (a file another node writes in a shared folder).

    Raises:
        SandboxError: none came in time, or the job is being cancelled.
    """
    while True:
        for path in paths:
            if path.exists():
                return path
        if ended.is_set():
            raise SandboxError("the job was cancelled")
        if time.monotonic() > deadline:
            raise SandboxError(f"{paths[0].name} did not come in {MOVE_WAIT:.0f} s")
        await asyncio.sleep(0.005)  # a shared folder tells no one: looked at


async def arrive(
    client: DaemonClient, kid: str, move: Path, ended: asyncio.Event
) -> dict[str, Any]:
    """Take over a kernel moving here (``sandbox_kernel/migrate.py``): import the
    snapshot sent while it ran on (``base.sks``) and say so (``staged``), then the
    last one, against it (``final.sks``), and restore it into the kernel launched
    here. The restore's answer."""
    deadline = time.monotonic() + MOVE_WAIT
    found = await _wait_for(
        [move / "base.sks", move / "final.sks", move / "abort"], deadline, ended
    )
    if found.name == "abort":
        raise SandboxError("the move was called off")
    plan = json.loads((move / "names.json").read_text())
    parent = None
    if found.name == "base.sks":
        await client.call("import_snapshot", path=str(found), name=plan["base"], kernel_id=kid)
        parent = plan["base"]
    write_json(move / "staged", {"node": socket.gethostname()})
    found = await _wait_for([move / "final.sks", move / "abort"], deadline, ended)
    if found.name == "abort":
        raise SandboxError("the move was called off")
    await client.call("import_snapshot", path=str(found), name=plan["final"], kernel_id=kid,
                      parent_name=parent)  # fmt: skip
    done: dict[str, Any] = await client.call(
        "restore", kernel_id=kid, name=plan["final"], arriving=True
    )
    if done["mode"] != "live":  # its memory did not come: the kernel stays where it was
        raise SandboxError(f"the kernel's memory could not be restored here: {done['reason']}")
    return done


async def recover(client: DaemonClient, kid: str, store: Path) -> dict[str, Any] | None:
    """Bring back a kernel whose node died, from the latest snapshot or checkpoint it
    published to the shared store; its index entry, or None where there is none."""
    from . import shared

    published = [e for e in shared.entries(store) if e.get("kernel_id") == kid]
    if not published:
        return None
    latest = published[-1]
    local = await client.call("fetch", kernel_id=kid, name=latest["name"])
    when = time.strftime("%H:%M:%S", time.localtime(float(latest.get("created") or 0)))
    what = "checkpoint" if latest.get("checkpoint") else f"snapshot {latest['name']}"
    notice = (
        f"this kernel's node ({latest.get('node') or 'unknown'}) stopped; the kernel is back on "
        f"{socket.gethostname()} from its {what} of {when}. Whatever ran after that is lost."
    )
    await client.call("restore", kernel_id=kid, name=local, notice=notice, arriving=True)
    return latest


#: Seconds a kernel that ended for a restart waits for its provisioner's relaunch.
RELAUNCH_WAIT = 120.0


async def relaunch(
    client: DaemonClient, kid: str, folder: Path, config: dict[str, Any],
    where: dict[str, Any], ended: asyncio.Event,
) -> bool:  # fmt: skip
    """A kernel that ended because its provisioner restarts it (it wrote
    ``KERNEL_ID.restarting`` when it asked): say so (``KERNEL_ID.exited``), wait
    for the new command (``KERNEL_ID.relaunch``) and start it in the same
    container, with its files, as a local kernel's restart does. Whether it did;
    False for an end nobody asked to restart from."""
    restarting = folder / f"{kid}.restarting"
    if not restarting.exists():
        # jupyter_client tells the provisioner just after it asks the kernel to go.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), 1.0)
        if ended.is_set() or not restarting.exists():
            return False
    request = folder / f"{kid}.relaunch"
    write_json(folder / f"{kid}.exited", {"job": where["job"], "epoch": where["epoch"]})
    deadline = time.monotonic() + RELAUNCH_WAIT
    while not request.exists():
        if ended.is_set() or time.monotonic() > deadline:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), 0.01)  # a shared folder: looked at
    new = read_spec(request)
    for path in (request, restarting):
        path.unlink(missing_ok=True)
    await client.call("stop", kernel_id=kid)
    record = await client.call("prepare", kernel_id=kid, config=config)
    connection = {**new["connection"], "ip": str(record["kernel_ip"]), **KERNEL_PORTS}
    await client.call("launch", kernel_id=kid, argv=new["argv"], env=new["env"],
                      connection=connection)  # fmt: skip
    where["epoch"] += 1
    write_json(folder / f"{kid}.ready", where)
    print(f"kernel {kid} restarted in its job", file=sys.stderr, flush=True)
    return True


class Publisher:
    """Copies what this node keeps of the kernel to the shared store (``shared.py``):
    each snapshot it takes, and its latest checkpoint at most every
    :data:`shared.CHECKPOINT_EVERY` seconds, each against the nearest ancestor
    published before it."""

    def __init__(self, client: DaemonClient, kid: str, store: Path) -> None:
        from . import shared

        self.shared = shared
        self.client, self.kid, self.store = client, kid, store
        # What this kernel published, here or on a node it moved from. A name
        # another kernel published is published again: the latest one wins.
        self.done: set[str] = {
            e["name"] for e in shared.entries(store) if e.get("kernel_id") == kid
        }
        self.last_checkpoint = 0.0

    async def run(self, ended: asyncio.Event) -> None:
        """Publish what is new every second until ``ended``."""
        while not ended.is_set():
            try:
                await self.tick()
            except (SandboxError, OSError) as err:
                print(f"kernel {self.kid}: publishing failed: {err}", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), HEARTBEAT)

    async def tick(self) -> None:
        rows = await self.client.call("kernel_snapshots", kernel_id=self.kid)
        parents = {r["name"]: r.get("parent") for r in rows}
        checkpoints = [r for r in rows if r["checkpoint"]]
        due = time.monotonic() - self.last_checkpoint >= self.shared.CHECKPOINT_EVERY
        for row in rows:
            name = row["name"]
            if name in self.done:
                continue
            if row["checkpoint"] and (row is not checkpoints[-1] or not due):
                continue
            # A snapshot of the user's outlives the kernel's published checkpoints
            # (deleted at its shutdown): it is never published against one.
            since = row.get("parent")
            while since and (
                since not in self.done
                or (not row["checkpoint"] and since.startswith(CHECKPOINT_PREFIX))
            ):
                since = parents.get(since)
            await self.publish(name, since, bool(row["checkpoint"]), float(row["created"]))

    async def publish(self, name: str, since: str | None, checkpoint: bool, created: float) -> None:
        partial = self.store / f".{name}.partial"
        partial.unlink(missing_ok=True)
        await self.client.call(
            "export_snapshot", name=name, path=str(partial), since=since, kernel_id=self.kid
        )
        partial.rename(self.store / (name + self.shared.STREAM))
        write_json(self.store / (name + self.shared.INDEX), {
            "name": name, "kernel_id": self.kid, "since": since, "created": created,
            "checkpoint": checkpoint, "node": socket.gethostname(),
        })  # fmt: skip
        self.done.add(name)
        if checkpoint:
            self.last_checkpoint = time.monotonic()


async def run(spec_path: Path) -> int:
    spec = read_spec(spec_path)
    kid = str(spec["kernel_id"])
    folder = spec_path.parent
    client = DaemonClient()
    config = dict(spec["config"])
    store = Path(spec["store"]) if spec.get("store") else None
    if store is not None:
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        config["shared_store"] = str(store)
    move = Path(spec["move"]["dir"]) if spec.get("move") else None
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    # From the first moment: a scancel while the kernel is being made (a move called
    # off) must still remove it, not kill this process before it can.
    loop.add_signal_handler(signal.SIGTERM, ended.set)
    record = await client.call("prepare", kernel_id=kid, config=config)
    address = str(record["kernel_ip"])
    connection = {**spec["connection"], "ip": address, **KERNEL_PORTS}
    servers: dict[str, asyncio.Server] = {}
    try:
        await client.call(
            "launch", kernel_id=kid, argv=spec["argv"], env=spec["env"], connection=connection
        )
        for name in PORT_NAMES:  # ready before a moving kernel's last snapshot comes
            servers[name] = await forward(address, KERNEL_PORTS[name])
        if move is not None:
            await arrive(client, kid, move, ended)
        elif spec.get("recover") and store is not None:
            try:
                await recover(client, kid, store)
            except SandboxError as err:  # the kernel launched above runs on: a cold start
                print(f"kernel {kid}: no recovery ({err}); started cold", file=sys.stderr)
    except BaseException as err:
        for server in servers.values():
            server.close()
        if move is not None:
            with contextlib.suppress(OSError):
                write_json(move / "failed", {"error": str(err), "node": socket.gethostname()})
        with contextlib.suppress(SandboxError):
            await client.call("remove", kernel_id=kid)
        raise
    ports = {name: server.sockets[0].getsockname()[1] for name, server in servers.items()}
    node = socket.gethostname()
    alive = folder / f"{kid}.alive"
    alive.touch(mode=0o600)
    job = os.environ.get("SLURM_JOB_ID")
    where = {"node": node, "address": socket.gethostbyname(node), "ports": ports, "job": job,
             "epoch": 0}  # fmt: skip
    write_json(folder / f"{kid}.ready", where)

    async def interrupt() -> None:
        with contextlib.suppress(SandboxError, OSError):
            pid = await client.call("pid", kernel_id=kid)
            if pid:
                os.kill(int(pid), signal.SIGINT)

    pending: set[asyncio.Future[None]] = set()

    def interrupt_kernel() -> None:
        task = asyncio.ensure_future(interrupt())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGINT, interrupt_kernel)
    publishing = None
    if store is not None:  # its own task: a large export must not hold the heartbeat
        publishing = asyncio.ensure_future(Publisher(client, kid, store).run(ended))
    try:
        while not ended.is_set():
            try:
                pid = await client.call("pid", kernel_id=kid)
            except SandboxError:
                break  # removed
            if pid is None:
                print(f"kernel {kid} ended", file=sys.stderr, flush=True)
                if await relaunch(client, kid, folder, config, where, ended):
                    continue  # a restart: the same container, its files kept
                break  # the kernel ended (a shutdown, or it died)
            with contextlib.suppress(OSError):
                os.utime(alive)
            with_timeout = asyncio.ensure_future(ended.wait())
            await asyncio.wait([with_timeout], timeout=HEARTBEAT)
            with_timeout.cancel()
    finally:
        if publishing is not None:
            publishing.cancel()
        print(f"removing kernel {kid}", file=sys.stderr, flush=True)
        for server in servers.values():
            server.close()
        with contextlib.suppress(SandboxError):
            await client.call("remove", kernel_id=kid)
    return 0


def main(spec: str) -> int:
    return asyncio.run(run(Path(spec)))


if __name__ == "__main__":  # the job's command: lighter than the whole CLI
    sys.exit(main(sys.argv[1]))
