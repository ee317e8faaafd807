"""The runtime: puts kernel containers together, runs them with runc, takes them apart.

The provisioner (in the Jupyter server) and the CLI (for operators) call it. Its
public methods take and return plain data (ids, paths, dicts), because a later
version serves the same API from a privileged daemon over a local socket.

A kernel's folder ``kernels/<kernel_id>/`` holds:

- ``record.json``: what the kernel is (image, layers, limits, network, user, owner);
- ``rootfs/`` and ``mnt/cwd/``: where the two overlays are mounted;
- ``run/``: the connection file and the kernel's log, at /run/sandbox inside;
- ``etc/``: its own passwd, group, hosts, hostname and resolv.conf;
- ``config.json``: the OCI bundle runc runs.

Its writable layer (the ``root`` and ``cwd`` overlay uppers, with their work
folders) is the btrfs subvolume ``volume/kernels/<kernel_id>``: see ``volume.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pwd
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError, KernelNotFound, RequirementMissing, SandboxError

from . import (
    bases,
    cgroups,
    checkpoint,
    dedupe,
    hostpath,
    layers,
    network,
    paths,
    runc,
    snapshots,
    volume,
)
from .bundle import CONTAINER_ROOT, RUN_DIR, Bind, SpecParams, make_spec
from .fsutil import read_json, write_json
from .limits import Limits, format_size, parse_size
from .mounts import bind, mount_overlay, mounts_under, unmount
from .pyenv import home_template, merge_prefixes, package_dirs, python_prefixes

#: Working directories a kernel may not be started in: they would shadow the system.
FORBIDDEN_CWDS = (Path("/"), Path("/usr"), Path("/etc"), Path("/proc"), Path("/sys"),
                  Path("/dev"), Path("/run"), Path("/boot"))  # fmt: skip
#: The kernel's ZMQ ports inside its own network namespace; no other process uses them.
KERNEL_PORTS = {"shell_port": 50001, "iopub_port": 50002, "stdin_port": 50003,
                "control_port": 50004, "hb_port": 50005}  # fmt: skip


@dataclass(frozen=True)
class KernelConfig:
    """How to build one kernel container. Set by the kernelspec through the provisioner.

    Attributes:
        image: image name, e.g. ``host``.
        limits: memory, CPU, pids and disk limits.
        network: ``none`` or ``egress``.
        uid, gid: the unprivileged user the kernel runs as.
        cwd: the notebook's working directory, visible at the same path inside
            (except for a kernel started from a base: see ``bases.py``).
        executable: the kernel's Python; its environment is bound in read-only.
        base: the id of the base snapshot new kernels start from, or empty.
    """

    image: str
    limits: Limits
    network: str
    uid: int
    gid: int
    cwd: str
    executable: str
    base: str = ""


def default_uid(cwd: str, fallback: int = 65534) -> int:
    """The user a kernel runs as when the kernelspec names none.

    When the server is not root, that is the server's own user. When it is root,
    the owner of the working directory, unless that is root too: then ``fallback``.
    """
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        owner = os.stat(cwd).st_uid
    except OSError:
        owner = 0
    return owner if owner != 0 else fallback


def _process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_token() -> dict[str, int]:
    """Identifies this process even after its pid is reused: pid and start time."""
    pid = os.getpid()
    return {"pid": pid, "start": _process_start(pid) or 0}


def owner_alive(owner: dict[str, int]) -> bool:
    """Whether the process that ``owner`` names still runs."""
    return _process_start(owner.get("pid", 0)) == owner.get("start")


def container_id(kernel_id: str) -> str:
    """The runc container id (also the netns name) of kernel ``kernel_id``."""
    return f"{paths.PREFIX}{kernel_id}"


#: The kernel's run folder (its log) holds at most this many bytes: a btrfs quota,
#: on the volume rather than the host's root filesystem.
LOG_CAP = 64 << 20
#: Past this size the log is trimmed to its last :data:`LOG_KEEP` bytes.
LOG_TRIM_AT = 48 << 20
LOG_KEEP = 8 << 20


def run_dir(kernel_id: str) -> Path:
    """Kernel ``kernel_id``'s run folder: a subvolume of the volume, held to
    :data:`LOG_CAP` bytes, bound at ``kernels/<id>/run`` and from there at
    /run/sandbox inside. It outlives restarts, restores and resets."""
    return volume.volume_dir() / "run" / kernel_id


def _make_run_dir(record: dict[str, Any]) -> None:
    """Make the kernel's run folder with an empty log that the kernel's user owns."""
    folder = run_dir(record["kernel_id"])
    volume.delete_subvolume(folder)
    volume.create_subvolume(folder)
    os.chmod(folder, 0o755)  # entered from the kernel's user namespace, through its bind
    volume.limit_subvolume(folder, LOG_CAP)
    log = folder / "kernel.log"
    log.touch(0o600)
    os.chown(log, record["uid"], record["gid"])


def _trim_log(log: Path) -> bool:
    """Keep the last :data:`LOG_KEEP` bytes of ``log`` once it passes
    :data:`LOG_TRIM_AT`, in place: the kernel appends to the same inode, and what
    it writes meanwhile lands after the kept tail."""
    try:
        if log.stat().st_size <= LOG_TRIM_AT:
            return False
    except OSError:
        return False
    # At its quota btrfs refuses even a truncate (it needs metadata room): the cap
    # is lifted for the moment of the trim.
    with contextlib.suppress(SandboxError):
        volume.limit_subvolume(log.parent, 2 * LOG_CAP)
    try:
        with open(log, "r+b") as handle:
            handle.seek(-LOG_KEEP, os.SEEK_END)
            tail = handle.read(LOG_KEEP)
            handle.truncate(0)
        # Appended, as the kernel's own writes are: neither overwrites the other.
        with open(log, "ab") as handle:
            stamp = time.strftime("%H:%M:%S")
            note = f"[sandbox-kernel {stamp}] log trimmed to its last {format_size(LOG_KEEP)}\n"
            handle.write(note.encode() + tail[tail.find(b"\n") + 1 :])
    except OSError:
        return False
    finally:
        with contextlib.suppress(SandboxError):
            volume.limit_subvolume(log.parent, LOG_CAP)
    return True


def layer_dir(kernel_id: str) -> Path:
    """Kernel ``kernel_id``'s writable layer: a subvolume of the runtime's btrfs volume."""
    return volume.volume_dir() / "kernels" / kernel_id


def check_cwd(cwd: str) -> tuple[Path, hostpath.Identity]:
    """Validate a kernel's working directory at its first start; return it and the
    identity every later mount of it is checked against (see ``hostpath.py``).

    Raises:
        ConfigError: it is relative, missing, a symlink or a system folder.
    """
    path = Path(cwd)
    if not path.is_absolute():
        raise ConfigError("working directory", cwd, "is not an existing absolute folder")
    identity, real = hostpath.first_use(cwd, "working directory")
    if real in FORBIDDEN_CWDS or any(real.is_relative_to(p) for p in FORBIDDEN_CWDS[1:]):
        raise ConfigError("working directory", cwd, "is a system folder; start from your notebooks")
    if real.is_relative_to(paths.state_dir()):
        raise ConfigError("working directory", cwd, "is inside the runtime's state")
    return path, identity


class Runtime:
    """Runs kernel containers. One instance per process is enough; it keeps no state
    in memory, everything is in the kernel folders, so any process can pick up a
    kernel another one started (``adopt``).
    """

    # ---- lookups -----------------------------------------------------------------

    @staticmethod
    def kernel_dir(kernel_id: str) -> Path:
        """The folder of kernel ``kernel_id``."""
        if not kernel_id or "/" in kernel_id or kernel_id.startswith("."):
            raise ConfigError("kernel id", kernel_id, "is not valid; use the id Jupyter gave")
        return paths.kernels_dir() / kernel_id

    def record(self, kernel_id: str) -> dict[str, Any]:
        """The record of kernel ``kernel_id``.

        Raises:
            KernelNotFound: the runtime has no such kernel.
        """
        path = self.kernel_dir(kernel_id) / "record.json"
        try:
            data: dict[str, Any] = read_json(path)
        except FileNotFoundError:
            raise KernelNotFound(kernel_id) from None
        return data

    def records(self) -> list[dict[str, Any]]:
        """Records of every kernel the runtime has, oldest first."""
        found = []
        if paths.kernels_dir().is_dir():
            for entry in paths.kernels_dir().iterdir():
                try:
                    found.append(read_json(entry / "record.json"))
                except (OSError, ValueError):
                    continue
        return sorted(found, key=lambda r: r.get("created", 0))

    def log_path(self, kernel_id: str) -> Path:
        """The kernel's log on the host (its stdout and stderr)."""
        self.record(kernel_id)
        return run_dir(kernel_id) / "kernel.log"

    def run_dir(self, kernel_id: str) -> Path:
        """The kernel's run folder on the host (/run/sandbox inside): its connection
        file, control credentials and log. See :func:`run_dir`."""
        self.kernel_dir(kernel_id)
        return run_dir(kernel_id)

    def trim_log(self, kernel_id: str) -> bool:
        """Keep the kernel's log under its cap: past :data:`LOG_TRIM_AT` bytes only the
        last :data:`LOG_KEEP` are kept. True if it was trimmed. Cheap otherwise (one
        stat); called by the provisioner's ``poll`` and before the runtime writes
        there."""
        return _trim_log(run_dir(kernel_id) / "kernel.log")

    # ---- life cycle ----------------------------------------------------------------

    async def prepare(self, kernel_id: str, config: KernelConfig) -> dict[str, Any]:
        """Make kernel ``kernel_id``'s folder, layers and addresses; return its record.

        Called by the provisioner's ``pre_launch``. A kernel that already has a
        folder (a restart) keeps its writable layer and addresses; its limits are
        the ones it had last (changed live or not). Runs off the event loop.

        Raises:
            ConfigError, ImageNotFound: the configuration cannot be used; nothing is made.
        """
        return await asyncio.to_thread(self._prepare_files, kernel_id, config)

    def _prepare_files(self, kernel_id: str, config: KernelConfig) -> dict[str, Any]:
        kdir = self.kernel_dir(kernel_id)
        if (kdir / "record.json").exists():
            return self.adopt(kernel_id)
        layers.check_image_name(config.image)
        network.check_mode(config.network)
        for what, value in (("kernel_uid", config.uid), ("kernel_gid", config.gid)):
            if value == CONTAINER_ROOT:
                raise ConfigError(
                    what, str(value),
                    "is the host id that root inside every kernel maps to; choose another",
                )  # fmt: skip
        cwd, cwd_identity = check_cwd(config.cwd)
        prefixes = merge_prefixes([*python_prefixes(config.executable), *package_dirs()])
        prefix_identities = [
            hostpath.first_use(str(p), "Python prefix")[0].to_dict() for p in prefixes
        ]
        image_layers = layers.image_layers(config.image)
        base, why_cold, inside = _fitting_base(config, [str(p) for p in prefixes])
        points = layers.mountpoint_layer([*prefixes, Path(inside)])
        if base is not None and base["layers"] != [points, *image_layers]:
            base, why_cold, inside = None, "its image's files differ from this kernel's", str(cwd)
            points = layers.mountpoint_layer([*prefixes, cwd])
        paths.state_dir().mkdir(parents=True, exist_ok=True)
        _private_folder(paths.kernels_dir())
        if kdir.exists():
            raise ConfigError(
                "kernel id", kernel_id, "has a folder but no record; run `sandbox-kernel gc`"
            )
        _private_folder(kdir)
        index = None
        try:
            index = network.reserve_index(kernel_id)
            addr = network.Addresses.of(index)
            user = _user_name(config.uid)
            record: dict[str, Any] = {
                "kernel_id": kernel_id,
                "container_id": container_id(kernel_id),
                "hostname": f"kernel-{kernel_id[:8]}",
                "image": config.image,
                "layers": [points, *image_layers],
                "snapshot": None,  # the snapshot the files came from: the next one's parent
                "python_prefixes": [str(p) for p in prefixes],
                "executable": config.executable,
                "cwd": str(cwd),
                "cwd_identity": cwd_identity.to_dict(),
                "prefix_identities": prefix_identities,
                "cwd_inside": inside,  # where the kernel sees it; see bases.py
                "base": base["id"] if base else None,
                "base_note": why_cold,
                "limits": config.limits.to_dict(),
                # What the kernel may raise its limits back up to: the kernelspec's.
                # Only an operator goes above (see update_limits).
                "ceiling": config.limits.to_dict(),
                "network": config.network,
                "index": index,
                "kernel_ip": addr.kernel_ip,
                "uid": config.uid,
                "gid": config.gid,
                "user": user,
                "home": f"/home/{user}",
                "created": time.time(),
                "owner": owner_token(),
            }
            write_json(kdir / "record.json", record)
            volume.ensure_volume()
            _make_run_dir(record)
            self._make_layer(kdir, record)
        except BaseException:
            self._remove_folder(kdir)
            if index is not None:
                network.release_index(index)
            raise
        return record

    async def start(
        self, kernel_id: str, argv: list[str], env: dict[str, str], connection: dict[str, Any]
    ) -> int:
        """Start kernel ``kernel_id`` (prepared before) running ``argv``; return its host pid.

        ``connection`` is the connection info the client uses; the kernel gets a
        copy that binds every interface of its own network namespace.

        Raises:
            CommandError: runc, ip or nft failed; mounts made so far are undone.
        """
        kdir = self.kernel_dir(kernel_id)
        record = self.record(kernel_id)
        uid, gid = record["uid"], record["gid"]
        inside = {k: v.decode() if isinstance(v, bytes) else v for k, v in connection.items()}
        inside["ip"] = "0.0.0.0"
        self.trim_log(kernel_id)  # room for the files below
        conn_path = run_dir(kernel_id) / "connection.json"
        conn_path.unlink(missing_ok=True)
        write_json(conn_path, inside, mode=0o400)
        os.chown(conn_path, uid, gid)
        _write_etc(kdir / "etc", record)
        env = {
            **env,
            "HOME": record["home"],
            "USER": record["user"],
            "LOGNAME": record["user"],
            "HOSTNAME": record["hostname"],
            "PATH": _kernel_path(record, argv[0]),
        }
        spec = make_spec(
            SpecParams(
                argv=argv,
                env=env,
                cwd=_inside(record),
                uid=uid,
                gid=gid,
                hostname=record["hostname"],
                cgroups_path=f"/{paths.cgroup_parent()}/{record['container_id']}",
                limits=Limits.from_dict(record["limits"]),
                fsize=Limits.from_dict(record["limits"]).disk,
                init=paths.tini_binary(),
                binds=self._binds(kdir, record),
                memory_swap=cgroups.swap_limit_supported(),
                criu_config=kdir / "criu.conf",
                root_id=CONTAINER_ROOT,
                cgroup_binds=_cgroup_binds(record),
            )
        )
        _criu_config(kdir)
        write_json(kdir / "config.json", spec)
        self._mount(kdir, record)
        try:
            noted = (record.get("started_from"), record.get("base_note"))
            if record.get("base") and not record.get("started_from"):
                pid = await self._start_from_base(kernel_id, record)
            else:
                if record.get("base") or record.get("base_note"):
                    record["started_from"] = "cold"  # a restart, or a base that did not fit
                pid = await self._run(kernel_id, record)
            if (record.get("started_from"), record.get("base_note")) != noted:
                write_json(kdir / "record.json", record)
            return pid
        except BaseException:
            # Undo what was done; the error that stopped the start is the one raised.
            with contextlib.suppress(SandboxError):
                await runc.delete(record["container_id"])
            self._unmount(kdir)
            raise

    async def _start_from_base(self, kernel_id: str, record: dict[str, Any]) -> int:
        """Start the kernel by restoring its base's memory; cold where that fails.

        Sets ``record["started_from"]`` to ``base`` or ``cold`` (with the reason in
        ``base_note`` and the kernel's log); a restart always starts cold.
        """
        kdir = self.kernel_dir(kernel_id)
        try:
            criu = checkpoint.criu_binary()
            await asyncio.to_thread(bases.verify, record["base"])
            work = _fresh_work(kdir)
            images = bases.base_dir(record["base"]) / "criu"
            # The restored process has its stdio open on the log (see bundle.py).
            pid = await self._restore_images(kernel_id, record, criu, images, work)
            record["started_from"] = "base"
            return pid
        except SandboxError as err:
            record["started_from"] = "cold"
            record["base_note"] = f"the base could not be restored: {err}"
            self.append_log(kernel_id, f"started cold: {record['base_note']}")
            with contextlib.suppress(SandboxError):
                await runc.delete(record["container_id"])
        return await self._run(kernel_id, record)

    async def start_cold(self, kernel_id: str, note: str) -> int:
        """Replace kernel ``kernel_id``'s process by a cold start on the same files
        (a base restore that went wrong); return the new host pid."""
        async with self._exclusive(kernel_id):
            record = self.record(kernel_id)
            kdir = self.kernel_dir(kernel_id)
            await runc.delete(record["container_id"])
            record["started_from"], record["base_note"] = "cold", note
            write_json(kdir / "record.json", record)
            self.append_log(kernel_id, f"started cold: {note}")
            return await self._run(kernel_id, record)

    async def stop(self, kernel_id: str) -> None:
        """Kill and delete the container and unmount its filesystems.

        The writable layer and the network stay, for a restart. Called by the
        provisioner's ``cleanup(restart=True)`` and by :meth:`remove`.
        """
        record = self.record(kernel_id)
        try:
            await runc.delete(record["container_id"])
        finally:
            self._unmount(self.kernel_dir(kernel_id))

    async def remove(self, kernel_id: str) -> None:
        """Remove every trace of kernel ``kernel_id``: container, mounts, netns, veth,
        cgroup, addresses and its writable layer. A kernel that is gone is fine.
        """
        try:
            record = self.record(kernel_id)
        except KernelNotFound:
            return
        # Every step runs even if one before it failed; the first error is raised last.
        errors: list[BaseException] = []
        try:
            await self.stop(kernel_id)
        except SandboxError as err:
            errors.append(err)
        try:
            await network.destroy(
                network.Addresses.of(record["index"]), egress=record["network"] == "egress"
            )
        except SandboxError as err:
            errors.append(err)
        network.release_index(record["index"])
        # The writable layer can hold gigabytes: delete it off the event loop.
        await asyncio.to_thread(self._remove_folder, self.kernel_dir(kernel_id))
        if errors:
            raise errors[0]

    async def container_pid(self, kernel_id: str) -> int | None:
        """The host pid of the kernel's init if its container runs, else None.

        Waits for a snapshot or restore of the kernel in progress to finish first.
        """
        record = self.record(kernel_id)
        async with self._exclusive(kernel_id):
            pass
        state = await runc.state(record["container_id"])
        if not state or state.get("status") not in ("running", "created", "paused"):
            return None
        pid = state.get("pid")
        return int(pid) if pid else None

    def adopt(self, kernel_id: str) -> dict[str, Any]:
        """Make this process the owner of a kernel another process started.

        Called by ``load_provisioner_info`` when a restarted server re-adopts its
        kernels; ``gc`` leaves kernels with a live owner alone.
        """
        record = self.record(kernel_id)
        record["owner"] = owner_token()
        _upgrade_record(record)
        write_json(self.kernel_dir(kernel_id) / "record.json", record)
        return record

    # ---- snapshots -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, kernel_id: str) -> AsyncIterator[None]:
        """Serialize snapshots and restores of one kernel, across processes."""
        fd = os.open(self.kernel_dir(kernel_id) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def thaw_if_stale(self, kernel_id: str) -> bool:
        """Thaw a kernel left frozen by a snapshot whose runtime died; True if it was.

        A frozen container whose lock nobody holds was frozen by a process that is
        gone (the lock goes with its holder). Cheap when the kernel is not frozen:
        one small cgroup file is read. Called by the provisioner's ``poll``.
        """
        cid = container_id(kernel_id)
        if not cgroups.frozen(f"{paths.cgroup_parent()}/{cid}"):
            return False
        fd = os.open(self.kernel_dir(kernel_id) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a snapshot is in progress
            await runc.resume(cid)
            self.append_log(kernel_id, "thawed: the snapshot that froze the kernel was cut short")
            return True
        finally:
            os.close(fd)

    async def snapshot(
        self,
        kernel_id: str,
        name: str,
        message: str = "",
        live: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Snapshot kernel ``kernel_id``'s files and live memory as ``name``; return its meta.

        The container is frozen while its writable layer is copied and CRIU dumps
        its processes (leaving them running), so files and memory come from the same
        moment; then it is thawed. Where CRIU is missing or fails, or ``live`` is
        False, the snapshot keeps the files only (mode ``files``, with the reason).
        ``progress`` is called with a line of text as each step starts.

        Raises:
            ConfigError: the name is invalid or taken.
            KernelNotFound: no such kernel.
            CommandError: the container could not be frozen or thawed.
        """
        record = self.record(kernel_id)
        kdir = self.kernel_dir(kernel_id)
        cid = record["container_id"]
        started = time.monotonic()
        async with self._exclusive(kernel_id):
            record = self.record(kernel_id)
            snapshots.check_name(name)
            await asyncio.to_thread(snapshots.check_quota, str(record["uid"]), name)
            draft = snapshots.Draft(str(record["uid"]), name)
            try:
                mode, reason = "files", "" if live else "asked for files only"
                dump: tuple[str, dict[str, str], str] | None = None
                if live:
                    try:
                        dump = checkpoint.dump_command(record["uid"], record["gid"])
                    except RequirementMissing as err:
                        reason = str(err)
                work = _fresh_work(kdir)
                # Nothing is said while the kernel is frozen: CRIU would dump the
                # unread line with the kernel's control connection.
                say = progress or (lambda text: None)
                await runc.pause(cid)
                frozen = time.monotonic()
                try:
                    volume.snapshot_subvolume(layer_dir(kernel_id), draft.files, readonly=True)
                    if dump is not None:
                        criu, env, config = dump
                        _criu_config(kdir, config)
                        try:
                            await runc.checkpoint(cid, criu, draft.criu_dir, work, env)
                            mode = "live"
                            # A restore reads the images from inside the kernel's
                            # user namespace, where only ids it maps have rights,
                            # and CRIU reads the first one (timens) before it has
                            # even written the namespace's maps: the folder runc
                            # made (root's, 0600) becomes the kernel user's, and
                            # searchable by all. The images are 0644, and the
                            # snapshot's own folder stays root's alone (0700).
                            os.chown(draft.criu_dir, record["uid"], record["gid"])
                            draft.criu_dir.chmod(0o711)
                        except SandboxError as err:
                            if _out_of_space(str(err), work / "dump.log"):
                                raise snapshots.StoreFull(name) from err
                            reason = f"CRIU could not dump this kernel: {err}"
                            shutil.rmtree(draft.criu_dir, ignore_errors=True)
                finally:
                    _criu_config(kdir)
                    await runc.resume(cid)
                paused = time.monotonic() - frozen
                parent = record.get("snapshot")
                shared = 0
                like = None  # images whose unchanged pages the new ones share (dedupe.py)
                shared_with: dict[str, Any] = {}  # and whose they are (snapshots.charged_bytes)
                with contextlib.suppress(ConfigError, OSError):
                    if parent:
                        like = snapshots.snapshot_dir(draft.owner, parent) / "criu"
                        created = snapshots.load(draft.owner, parent)["created"]
                        shared_with = {"kind": "snapshot", "name": parent, "created": created}
                    elif record.get("started_from") == "base" and record.get("base"):
                        like = bases.base_dir(record["base"]) / "criu"
                        shared_with = {"kind": "base", "id": record["base"]}
                memory = _tree_bytes(draft.criu_dir) if draft.criu_dir.is_dir() else 0
                say(f"saved files and {format_size(memory)} of memory ({paused:.2f} s frozen)")
                if mode == "live" and like is not None:
                    say(f"sharing unchanged pages with {parent or 'the base'}")
                    shared = await asyncio.to_thread(dedupe.share_with_parent, draft.criu_dir, like)
                meta = {
                    "created": time.time(),
                    "message": message,
                    "parent": parent,
                    "shared_bytes": shared,
                    "shared_with": shared_with if shared else {},
                    "mode": mode,
                    "reason": reason,
                    "image": record["image"],
                    "layers": record["layers"],
                    "kernel_id": kernel_id,
                    # What a kernel started from this snapshot as a base must match.
                    "uid": record["uid"],
                    "gid": record["gid"],
                    "executable": record["executable"],
                    "python_prefixes": record["python_prefixes"],
                    "cwd_inside": _inside(record),
                    # The host folder: kernels elsewhere do not see this snapshot.
                    "cwd": record["cwd"],
                    "file_bytes": await asyncio.to_thread(_tree_bytes, draft.files),
                    # Blocks of the files: what a restore brings against `disk`.
                    "layer_bytes": await asyncio.to_thread(_allocated_bytes, draft.files),
                    "memory_bytes": memory,
                    "paused_seconds": round(paused, 4),
                    "seconds": 0.0,
                }
                meta["seconds"] = round(time.monotonic() - started, 4)
                await asyncio.to_thread(snapshots.check_quota, draft.owner, name, meta)
                say(f"checksumming and syncing {format_size(memory)}")
                meta = await asyncio.to_thread(draft.commit, meta)
            except OSError as err:
                draft.discard()
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise snapshots.StoreFull(name) from err
                raise
            except BaseException:
                draft.discard()
                raise
            record["snapshot"] = name
            write_json(kdir / "record.json", record)
            return meta

    async def restore(self, kernel_id: str, name: str) -> dict[str, Any]:
        """Bring kernel ``kernel_id`` back to snapshot ``name``, in place.

        The kernel keeps its id, address and connection info. A ``live`` snapshot
        is restored with CRIU: the processes continue from the snapshot's moment and
        clients reconnect by themselves. A ``files`` snapshot (or a live one CRIU
        cannot restore) brings the files back and starts the kernel afresh. Returns
        ``{"pid", "mode", "reason", "name"}``; the provisioner picks up the new pid.

        Raises:
            SnapshotNotFound, SnapshotCorrupt, ConfigError: refused before anything
                was touched; the kernel runs on as it was.
            CommandError: the container could not be stopped or started.
        """
        async with self._exclusive(kernel_id):
            return await self._restore(kernel_id, name)

    async def finish_restore(self, kernel_id: str) -> int | None:
        """Complete a restore whose runtime died in the middle; return the new pid.

        A restore notes its snapshot in the kernel's record as soon as it has
        stopped the kernel, and clears the note when the kernel runs again. A note
        left behind means the old process is gone and the new one may not be whole:
        the restore is done again from the start. None if no restore was cut short.
        """
        async with self._exclusive(kernel_id):
            name = self.record(kernel_id).get("restoring")
            if not name:
                return None
            self.append_log(kernel_id, f"finishing the restore of {name}, cut short")
            try:
                done = await self._restore(kernel_id, name)
            except BaseException:
                record = self.record(kernel_id)
                record.pop("restoring", None)  # tried once: the kernel restarts instead
                write_json(self.kernel_dir(kernel_id) / "record.json", record)
                raise
            pid: int = done["pid"]
            return pid

    async def _restore(self, kernel_id: str, name: str) -> dict[str, Any]:
        """:meth:`restore`, with the kernel's lock held."""
        record = self.record(kernel_id)
        kdir = self.kernel_dir(kernel_id)
        owner = str(record["uid"])
        # Only a snapshot this kernel may see (same owner, image and folder).
        snapshots.load_visible(record, name)
        meta = await asyncio.to_thread(snapshots.verify, owner, name)
        inherited = await asyncio.to_thread(
            _inherited_bytes, meta, snapshots.snapshot_dir(owner, name)
        )
        _check_disk(record, inherited, f"snapshot {name!r}")
        _check_folders(record)  # before the kernel is stopped (checked again at the mount)
        mode, reason = meta["mode"], meta.get("reason", "")
        criu = None
        if mode == "live":
            try:
                criu = checkpoint.criu_binary()
            except RequirementMissing as err:
                mode, reason = "files", str(err)
        await runc.delete(record["container_id"])
        # The old process is gone: note the restore, so one cut short from here on
        # is finished by whoever notices (see finish_restore).
        record["restoring"] = name
        write_json(kdir / "record.json", record)
        self._unmount(kdir)
        volume.delete_subvolume(layer_dir(kernel_id))
        files = snapshots.snapshot_dir(owner, name) / "files"
        volume.snapshot_subvolume(files, layer_dir(kernel_id), readonly=False)
        _limit_layer(record, inherited)
        record["snapshot"] = name
        write_json(kdir / "record.json", record)
        self._mount(kdir, record)
        try:
            if criu is not None:
                work = _fresh_work(kdir)
                images = snapshots.snapshot_dir(owner, name) / "criu"
                lazy = None
                if meta.get("memory_bytes", 0) >= lazy_restore_size():
                    lazy = snapshots.snapshot_dir(owner, name) / snapshots.SERVING
                try:
                    pid = await self._restore_images(
                        kernel_id, record, criu, images, work, lazy_lock=lazy
                    )
                    self._restored(kernel_id)
                    return {"pid": pid, "mode": "live", "reason": "", "name": name}
                except SandboxError as err:
                    await runc.delete(record["container_id"])
                    mode, reason = "files", f"CRIU could not restore the memory: {err}"
                    self.append_log(kernel_id, f"restore of {name}: {reason}")
            pid = await self._run(kernel_id, record)
            self._restored(kernel_id)
            return {"pid": pid, "mode": mode, "reason": reason, "name": name}
        except BaseException:
            self._unmount(kdir)
            raise

    async def _run(self, kernel_id: str, record: dict[str, Any]) -> int:
        """Start the kernel's container from its bundle; return its init's host pid.

        runc makes the namespaces; the runtime sets up the namespace's side of
        the network, then the kernel's process starts while the host's side is
        done (see ``network.attach``).

        Raises:
            CommandError: runc, ip or nft failed; the container is deleted again.
        """
        kdir = self.kernel_dir(kernel_id)
        addr = network.Addresses.of(record["index"])
        await network.remove_stale_veth(addr)
        pid = await runc.create(record["container_id"], kdir, kdir / "container.pid")
        try:
            egress = record["network"] == "egress"
            await network.attach(pid, addr, egress)
            steps = [runc.start(record["container_id"]), network.attach_host(addr, egress)]
            for result in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            with contextlib.suppress(SandboxError):
                await runc.delete(record["container_id"])
            raise
        return pid

    async def _restore_images(
        self,
        kernel_id: str,
        record: dict[str, Any],
        criu: str,
        images: Path,
        work: Path,
        lazy_lock: Path | None = None,
    ) -> int:
        """``runc restore`` the kernel from the CRIU ``images``; return its init's pid.

        CRIU brings back the kernel's namespaces; an action script joins its
        network namespace to the host before the processes run again (see
        ``network.restore_script``). The images may be another kernel's (a base).

        Raises:
            CommandError: the restore failed.
        """
        kdir = self.kernel_dir(kernel_id)
        addr = network.Addresses.of(record["index"])
        egress = record["network"] == "egress"
        await network.remove_stale_veth(addr)
        script = kdir / "criu-network.sh"
        text = network.restore_script(addr, egress)
        if not script.exists() or script.read_text() != text:
            # Written again whenever it changes (it names this process); nothing
            # is lost if a crash cuts the write short, so there is no fsync.
            script.write_text(text)
            script.chmod(0o700)
        _criu_config(kdir, f"action-script {script}\n")
        window = checkpoint.userfaultfd_window() if lazy_lock else contextlib.nullcontext()
        try:
            async with window:
                pid = await runc.restore(
                    record["container_id"], criu, kdir, images, work,
                    kdir / "container.pid", lazy_lock,
                )  # fmt: skip
        finally:
            _criu_config(kdir)
        if egress:
            await network.allow_egress(addr.veth)
        return pid

    def _restored(self, kernel_id: str) -> None:
        """Clear the note of a restore in progress: the kernel runs again."""
        record = self.record(kernel_id)
        record.pop("restoring", None)
        write_json(self.kernel_dir(kernel_id) / "record.json", record)

    async def reset(self, kernel_id: str) -> dict[str, Any]:
        """Give kernel ``kernel_id`` a fresh start on the image's pristine files.

        The teaching case: everything the kernel wrote is gone and a new kernel
        process starts, with the same id, address and connection info. Snapshots
        stay. Returns ``{"pid"}``; the provisioner picks up the new pid.

        Raises:
            CommandError: the container could not be stopped or started.
        """
        async with self._exclusive(kernel_id):
            record = self.record(kernel_id)
            kdir = self.kernel_dir(kernel_id)
            _check_folders(record)  # before the kernel is stopped (checked again at the mount)
            await runc.delete(record["container_id"])
            self._unmount(kdir)
            await asyncio.to_thread(self._make_layer, kdir, record, True)
            record["snapshot"] = None
            write_json(kdir / "record.json", record)
            self._mount(kdir, record)
            try:
                pid = await self._run(kernel_id, record)
            except BaseException:
                self._unmount(kdir)
                raise
            return {"pid": pid}

    def snapshot_listing(self, kernel_id: str) -> dict[str, Any]:
        """The snapshots kernel ``kernel_id`` may see (see ``snapshots.visible_to``),
        oldest first, and its owner's use of the store against the limit:
        ``{"snapshots": [meta, ...], "store": snapshots.usage(...)}``."""
        record = self.record(kernel_id)
        return {
            "snapshots": snapshots.visible_listing(record),
            "store": snapshots.usage(str(record["uid"])),
        }

    def delete_snapshot(self, kernel_id: str, name: str) -> None:
        """Delete snapshot ``name`` on behalf of kernel ``kernel_id``: only one that
        kernel may see. It may wait for a lazy restore's page server.

        Raises:
            SnapshotNotFound: no such snapshot, or one the kernel may not see.
        """
        record = self.record(kernel_id)
        snapshots.load_visible(record, name)
        snapshots.delete(str(record["uid"]), name)

    def diff(self, kernel_id: str, name: str | None = None) -> dict[str, Any]:
        """Files added, changed and deleted since snapshot ``name`` (default: the
        snapshot the kernel's files came from, else the kernel's start), like
        ``docker diff``. Paths are as the kernel sees them.

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        record = self.record(kernel_id)
        since = name or record.get("snapshot")
        current = layer_dir(kernel_id)
        base = snapshots.snapshot_dir(str(record["uid"]), since) / "files" if since else None
        if since:
            snapshots.load_visible(record, since)
        changes: dict[str, Any] = {"since": since, "added": [], "changed": [], "deleted": []}
        for part, mount in (("root", "/"), ("cwd", _inside(record))):
            now = _entries(current / part)
            then = _entries(base / part) if base else {}
            for rel, entry in sorted(now.items()):
                path = str(Path(mount) / rel)
                if entry == "whiteout":
                    if base is None or then.get(rel, "whiteout") != "whiteout":
                        changes["deleted"].append(path)
                elif rel not in then or then[rel] == "whiteout":
                    existed = base is None and self._in_lower(record, part, rel)
                    changes["changed" if existed else "added"].append(path)
                elif then[rel] != entry:
                    changes["changed"].append(path)
            for rel, entry in sorted(then.items()):
                if rel not in now and entry != "whiteout":
                    changes["deleted"].append(str(Path(mount) / rel))
        return changes

    @staticmethod
    def _in_lower(record: dict[str, Any], part: str, rel: str) -> bool:
        if part == "cwd":
            with _checked_cwd(record) as cwd:
                return hostpath.lookup(cwd, rel)
        return any((layers.layer_path(d) / rel).exists() for d in record["layers"])

    # ---- limits and usage ----------------------------------------------------------

    async def update_limits(self, kernel_id: str, limits: Limits, operator: bool = False) -> Limits:
        """Change the limits of a running kernel; only the limits ``limits`` sets.

        Returns the kernel's limits after the change, which also apply after a
        restart. The disk size can only be set at start.

        The kernel itself (through its control server, ``operator`` False) may lower
        a limit, or raise it back up to its ceiling: the kernelspec's values, kept in
        the kernel's record where the kernel cannot reach. An operator (the CLI as
        root) may go above; the ceiling then rises with the new value.

        Raises:
            ConfigError: a disk size was given, memory below what the kernel uses, or
                (not ``operator``) a limit above the ceiling.
            CommandError: runc refused the change.
        """
        if limits.disk is not None:
            raise ConfigError(
                "disk size",
                format_size(limits.disk),
                "can only be set when the kernel starts; reinstall the kernelspec",
            )
        record = self.record(kernel_id)
        ceiling = Limits.from_dict(record.get("ceiling") or record["limits"])
        if not operator:
            _check_ceiling(limits, ceiling)
        use = self.usage(kernel_id)
        if limits.memory and use and use.memory and limits.memory < use.memory:
            raise ConfigError(
                "memory limit", format_size(limits.memory),
                f"is below what the kernel uses now ({format_size(use.memory)}); "
                "free memory first or choose a larger limit",
            )  # fmt: skip
        await runc.update(record["container_id"], limits, cgroups.swap_limit_supported())
        new = Limits.from_dict(record["limits"]).merged(limits)
        record["limits"] = new.to_dict()
        record["ceiling"] = _raised(ceiling, limits).to_dict()
        write_json(self.kernel_dir(kernel_id) / "record.json", record)
        return new

    def usage(self, kernel_id: str | dict[str, Any]) -> cgroups.Usage | None:
        """What the kernel uses now, against its limits; None if its container is gone.

        Takes a kernel id or a record from :meth:`records` (which saves a read).
        """
        record = self.record(kernel_id) if isinstance(kernel_id, str) else kernel_id
        return cgroups.usage(f"{paths.cgroup_parent()}/{record['container_id']}")

    def oom_killed(self, kernel_id: str) -> bool:
        """Whether the OOM killer has killed a process of this kernel's container."""
        use = self.usage(kernel_id)
        return bool(use and use.oom_kills)

    def append_log(self, kernel_id: str, line: str) -> None:
        """Append a line from the runtime to the kernel's log, marked as such."""
        self.trim_log(kernel_id)
        with open(self.log_path(kernel_id), "a") as log:
            log.write(f"[sandbox-kernel {time.strftime('%H:%M:%S')}] {line}\n")

    # ---- garbage collection --------------------------------------------------------

    async def gc(self, dry_run: bool = False) -> list[str]:
        """Remove what crashed servers and kernels left behind; return what was removed.

        A kernel whose owning process is gone is removed whole. Then containers,
        namespaces, veths, address reservations, mounts and cgroups that no kernel
        record claims, and layers that no image or kernel references.
        """
        removed: list[str] = []
        live: set[str] = set()
        for record in self.records():
            kid = record["kernel_id"]
            if owner_alive(record.get("owner", {})):
                live.add(kid)
                continue
            removed.append(f"kernel {kid} (its server, pid {record['owner']['pid']}, is gone)")
            if dry_run:
                live.add(kid)  # what removing it would take is not listed again below
            else:
                await self.remove(kid)
        containers = {f"{paths.PREFIX}{k}" for k in live}
        for info in await runc.list_containers():
            cid = info.get("id", "")
            if cid.startswith(paths.PREFIX) and cid not in containers:
                removed.append(f"container {cid}")
                if not dry_run:
                    await runc.delete(cid)
        # runc's own state of a container whose checkpoint or restore was cut short
        # (a CRIU mount left inside it) makes runc list fail to load it.
        runc_root = Path("/run/runc")
        listed = {info.get("id", "") for info in await runc.list_containers()}
        if runc_root.is_dir():
            for entry in runc_root.iterdir():
                if entry.name.startswith(paths.PREFIX) and entry.name not in listed:
                    removed.append(f"broken runc state {entry}")
                    if not dry_run:
                        for point in mounts_under(entry):
                            unmount(point)
                        shutil.rmtree(entry, ignore_errors=True)
        if not dry_run and checkpoint.close_stale_window():
            removed.append("vm.unprivileged_userfaultfd, left at 1 by a lazy restore cut short")
        for ns in network.leftover_namespaces():
            if ns not in containers:
                removed.append(f"network namespace {ns}")
                if not dry_run:
                    await network.delete_netns(ns)
        held = network.reservations()
        for index, kid in held.items():
            if kid not in live:
                removed.append(f"address reservation {index}")
                if not dry_run:
                    network.release_index(index)
        for veth in network.leftover_veths():
            number = veth.removeprefix(network.VETH_PREFIX)
            if not number.isdigit() or held.get(int(number)) not in live:
                removed.append(f"veth {veth}")
                if not dry_run:
                    await network.delete_veth(veth)
        for point in mounts_under(paths.kernels_dir()):
            kid = point.relative_to(paths.kernels_dir()).parts[0]
            if kid not in live:
                removed.append(f"mount {point}")
                if not dry_run:
                    unmount(point)
        for group in cgroups.leftover_cgroups(paths.cgroup_parent()):
            if group.name not in containers:
                removed.append(f"cgroup {group}")
                if not dry_run:
                    try:
                        cgroups.remove_cgroup(group)
                    except OSError as err:
                        removed[-1] += f" (not removed: {err.strerror})"
        if paths.kernels_dir().is_dir():
            for entry in paths.kernels_dir().iterdir():
                if entry.name not in live and not (entry / "record.json").exists():
                    removed.append(f"kernel folder {entry}")
                    if not dry_run:
                        self._remove_folder(entry)
        for sub, what in (("kernels", "writable layer"), ("run", "run folder")):
            root = volume.volume_dir() / sub
            if not root.is_dir():
                continue
            for entry in root.iterdir():
                if entry.name not in live and not (paths.kernels_dir() / entry.name).exists():
                    removed.append(f"{what} {entry}")
                    if not dry_run:
                        volume.delete_subvolume(entry)
        removed += self._gc_layers(dry_run)
        return removed

    def _gc_layers(self, dry_run: bool) -> list[str]:
        if not paths.layers_dir().is_dir():
            return []
        used: set[str] = set()
        for image in paths.images_dir().glob("*.json"):
            used.update(read_json(image).get("layers", []))
        for record in self.records():
            used.update(record.get("layers", []))
        removed = []
        for leftover in snapshots.leftovers():
            removed.append(f"unfinished snapshot {leftover}")
            if not dry_run:
                snapshots.purge(leftover)
        for entry in paths.layers_dir().iterdir():
            stale_build = entry.name.startswith(".building-") and (
                time.time() - entry.stat().st_mtime > 600
            )
            if (entry.name.startswith("sha256-") and entry.name not in used) or stale_build:
                removed.append(f"layer {entry.name}")
                if not dry_run:
                    shutil.rmtree(entry, ignore_errors=True)
        return removed

    # ---- helpers -----------------------------------------------------------------

    @staticmethod
    def _make_layer(kdir: Path, record: dict[str, Any], fresh: bool = False) -> None:
        """Make the kernel's writable layer: the base's files (unless ``fresh``), else
        an empty layer with a new home."""
        uid, gid = record["uid"], record["gid"]
        for sub in ("rootfs", "mnt/cwd", "run", "etc"):
            (kdir / sub).mkdir(parents=True, exist_ok=True)
        if record.get("base") and not fresh:
            layer = layer_dir(record["kernel_id"])
            volume.delete_subvolume(layer)
            folder = bases.base_dir(record["base"])
            volume.snapshot_subvolume(folder / "files", layer, False)
            _limit_layer(record, _inherited_bytes(bases.load(record["base"]), folder))
            return
        Runtime._empty_layer(record)
        home = layer_dir(record["kernel_id"]) / "root" / record["home"].lstrip("/")
        home.parent.mkdir(parents=True)
        os.chmod(home.parent, 0o755)
        template = home_template(record["executable"], paths.state_dir() / "homes")
        if template is None:
            home.mkdir()
        else:
            shutil.copytree(template, home, symlinks=True)
        for path in [home, *home.rglob("*")]:
            os.lchown(path, uid, gid)

    @staticmethod
    def _empty_layer(record: dict[str, Any]) -> None:
        """Make the kernel's writable layer: a new, empty subvolume."""
        layer = layer_dir(record["kernel_id"])
        volume.delete_subvolume(layer)
        volume.create_subvolume(layer)
        _limit_layer(record)
        for sub in ("root", "root.work", "cwd", "cwd.work"):
            (layer / sub).mkdir()
        # The merged working directory takes its owner from the upper layer's root,
        # so the kernel's user can write there even when the host folder is root's.
        os.chown(layer / "cwd", record["uid"], record["gid"])

    @staticmethod
    def _binds(kdir: Path, record: dict[str, Any]) -> list[Bind]:
        binds = [Bind(Path("/usr"), "/usr")]
        binds += [Bind(_prefix_point(kdir, i), p) for i, p in enumerate(record["python_prefixes"])]
        binds.append(Bind(kdir / "mnt/cwd", _inside(record), readonly=False))
        binds.append(Bind(kdir / "run", RUN_DIR, readonly=False))
        binds += [Bind(kdir / "etc" / n, f"/etc/{n}") for n in layers.PER_KERNEL_ETC]
        return binds

    @staticmethod
    def _mount(kdir: Path, record: dict[str, Any]) -> None:
        """Mount the kernel's root and working-folder overlays, and its Python prefixes,
        under ``kdir``.

        The prefixes are bound here first, because a restore opens the sources of the
        container's binds from inside its user namespace: a prefix in a home folder
        that only its owner may enter (``/root/.pyenv/...``) can be reached from there
        only through a mount point in the kernel's own folder.
        """
        lower = [layers.layer_path(d) for d in record["layers"]]
        layer = layer_dir(record["kernel_id"])
        try:
            mount_overlay(kdir / "rootfs", lower, layer / "root", layer / "root.work")
            bind(run_dir(record["kernel_id"]), kdir / "run")
            # The user's folders are mounted through descriptors checked against the
            # kernel's first start, never by path (see hostpath.py).
            with _checked_cwd(record) as cwd:
                mount_overlay(kdir / "mnt/cwd", [cwd], layer / "cwd", layer / "cwd.work")
            for i in range(len(record["python_prefixes"])):
                point = _prefix_point(kdir, i)
                point.mkdir(exist_ok=True)
                with _checked_prefix(record, i) as source:
                    bind(source, point)
        except BaseException:
            Runtime._unmount(kdir)
            raise

    @staticmethod
    def _unmount(kdir: Path) -> None:
        for point in mounts_under(kdir):
            unmount(point)

    @staticmethod
    def _remove_folder(kdir: Path) -> None:
        for point in mounts_under(kdir):
            unmount(point)
        volume.delete_subvolume(layer_dir(kdir.name))
        volume.delete_subvolume(run_dir(kdir.name))
        shutil.rmtree(kdir, ignore_errors=True)


def _entries(root: Path) -> dict[str, Any]:
    """Every entry below ``root``: a whiteout marker, or (type, size, mtime) to compare."""
    found: dict[str, Any] = {}
    if not root.is_dir():
        return found
    for path in root.rglob("*"):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            found[rel] = "whiteout"
        elif stat.S_ISDIR(st.st_mode):
            continue  # a folder is listed through what changed inside it
        else:
            found[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return found


def _tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _user_name(uid: int) -> str:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return "kernel"
    return name if name.isidentifier() else "kernel"


def _kernel_path(record: dict[str, Any], executable: str) -> str:
    bins = [str(Path(executable).parent)]
    bins += [f"{p}/bin" for p in record["python_prefixes"] if f"{p}/bin" not in bins]
    return ":".join([*bins, "/usr/local/bin", "/usr/bin", "/bin"])


def _write_etc(etc: Path, record: dict[str, Any]) -> None:
    user, uid, gid, home = record["user"], record["uid"], record["gid"], record["home"]
    passwd = "root:x:0:0:root:/root:/bin/sh\n"
    group = "root:x:0:\n"
    if uid != 65534:
        passwd += f"{user}:x:{uid}:{gid}::{home}:/bin/sh\n"
        group += f"{user}:x:{gid}:\n"
    nobody_home = home if uid == 65534 else "/nonexistent"
    passwd += f"nobody:x:65534:65534:nobody:{nobody_home}:/usr/sbin/nologin\n"
    group += "nogroup:x:65534:\n"
    files = {
        "passwd": passwd,
        "group": group,
        "hostname": f"{record['hostname']}\n",
        "hosts": f"127.0.0.1\tlocalhost\n{record['kernel_ip']}\t{record['hostname']}\n",
        "resolv.conf": _host_resolv() if record["network"] == "egress" else "",
    }
    for name, text in files.items():
        (etc / name).write_text(text)


def _host_resolv() -> str:
    try:
        return Path("/etc/resolv.conf").read_text()
    except OSError:
        return ""


#: The v1 controllers whose files tell a kernel its limits and use (Python tools
#: read the CPU quota and the memory limit there); the others are not bound.
SHOWN_CONTROLLERS = {"memory", "cpu", "cpuacct", "cpuset", "pids"}


def _cgroup_binds(record: dict[str, Any]) -> list[Bind] | None:
    """The kernel's own cgroup in the v1 hierarchies of :data:`SHOWN_CONTROLLERS`,
    each bound at the hierarchy's path inside (where a cgroup namespace would show
    it); None on a pure v2 machine, whose cgroupfs a user namespace may mount.
    Every bind is one more mount for runc at each start and for CRIU at each dump
    and restore, hence only these."""
    points = cgroups.hierarchies()
    if not points:
        return None
    rel = f"{paths.cgroup_parent()}/{record['container_id']}"
    shown = [p for p in points if set(p.name.split(",")) & SHOWN_CONTROLLERS]
    return [Bind(point / rel, str(point)) for point in shown]


def _private_folder(folder: Path) -> None:
    """Make ``folder`` if needed, closed to every host user but root.

    Below it are other tenants' records, bundles, logs and connection files. It is
    root's, with group :data:`CONTAINER_ROOT` allowed to pass through (0710): runc
    and CRIU reach a kernel's bind sources from inside its user namespace, whose
    root is that host id, and no host user has it (``prepare`` refuses it as a
    kernel's uid or gid).
    """
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chown(folder, 0, CONTAINER_ROOT)
    os.chmod(folder, 0o710)


def _upgrade_record(record: dict[str, Any]) -> None:
    """Fill in what records of an older version lack: the identities of the user's
    folders (taken now, the first use this version sees) and the limits' ceiling."""
    if "cwd_identity" not in record:
        record["cwd_identity"] = hostpath.first_use(record["cwd"], "working directory")[0].to_dict()
    if "prefix_identities" not in record:
        record["prefix_identities"] = [
            hostpath.first_use(p, "Python prefix")[0].to_dict() for p in record["python_prefixes"]
        ]
    record.setdefault("ceiling", record["limits"])


#: What each limit is called in messages, and how its value is shown.
_LIMIT_NAMES = {"memory": "memory limit", "cpus": "cpu limit", "pids": "pids limit"}


def _show(key: str, value: float | None) -> str:
    if value is None:
        return "unlimited"
    return format_size(int(value)) if key == "memory" else f"{value:g}"


def _check_ceiling(change: Limits, ceiling: Limits) -> None:
    """Refuse a change a kernel asked for that goes above its ceiling.

    Raises:
        ConfigError: naming the limit, the value, the ceiling and who can go above.
    """
    for key, what in _LIMIT_NAMES.items():
        wanted, top = getattr(change, key), getattr(ceiling, key)
        if wanted is not None and top is not None and wanted > top:
            raise ConfigError(
                what, _show(key, wanted),
                f"is above this kernel's ceiling of {_show(key, top)} (its kernelspec's); "
                "a kernel may lower its limits or raise them back up to that. An operator "
                "can go above it with `sandbox-kernel limits KERNEL_ID`",
            )  # fmt: skip


def _raised(ceiling: Limits, change: Limits) -> Limits:
    """The ceiling after an operator's change: raised to any value above it."""
    higher = {}
    for key in _LIMIT_NAMES:
        wanted, top = getattr(change, key), getattr(ceiling, key)
        if wanted is not None and top is not None and wanted > top:
            higher[key] = wanted
    return ceiling.merged(Limits(**higher))


def _check_folders(record: dict[str, Any]) -> None:
    """Check the user's folders of a running kernel before an operation stops it, so
    that one which could not mount them again leaves the kernel running.

    Raises:
        ConfigError: a folder was moved or replaced (see hostpath.py).
    """
    with _checked_cwd(record):
        pass
    for i in range(len(record["python_prefixes"])):
        with _checked_prefix(record, i):
            pass


def _checked_cwd(record: dict[str, Any]) -> contextlib.AbstractContextManager[Path]:
    """The kernel's working folder, checked against its first start (see hostpath.py)."""
    identity = hostpath.Identity.from_dict(record["cwd_identity"])
    return hostpath.checked(record["cwd"], identity, "working directory")


def _checked_prefix(record: dict[str, Any], index: int) -> contextlib.AbstractContextManager[Path]:
    """The kernel's Python prefix number ``index``, checked against its first start."""
    identity = hostpath.Identity.from_dict(record["prefix_identities"][index])
    return hostpath.checked(record["python_prefixes"][index], identity, "Python prefix")


def _prefix_point(kdir: Path, index: int) -> Path:
    """Where the kernel's Python prefix number ``index`` is bound (see ``_mount``)."""
    return kdir / "mnt" / f"prefix-{index}"


def _criu_config(kdir: Path, extra: str = "") -> None:
    """Write the kernel's CRIU config (its bundle names it): the options of every
    dump and restore, and ``extra``."""
    (kdir / "criu.conf").write_text(checkpoint.BASE_CONFIG + extra)


def _fresh_work(kdir: Path) -> Path:
    """An empty CRIU work folder (logs, stats, lazy-pages socket) for a kernel."""
    work = kdir / "criu-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def lazy_restore_size() -> int:
    """Memory images at least this big are restored lazily (see ``runc.restore``):
    ``$SANDBOX_KERNEL_LAZY_RESTORE`` (a size, or ``off``), default 256M."""
    value = os.environ.get("SANDBOX_KERNEL_LAZY_RESTORE", "256M")
    if value.strip().lower() == "off":
        return 1 << 62
    return parse_size(value, "lazy restore size")


def _limit_layer(record: dict[str, Any], inherited: int = 0) -> None:
    """Hold the kernel's writable layer to its ``disk`` size (btrfs quota).

    A layer made from a snapshot or a base starts with ``inherited`` bytes of files
    that simple quotas charge to the layer that first wrote them, not to this one:
    they are taken off the limit, so restores cannot grow a kernel's files past
    ``disk`` one snapshot at a time.
    """
    disk = Limits.from_dict(record["limits"]).disk
    if disk:
        volume.limit_subvolume(layer_dir(record["kernel_id"]), max(disk - inherited, 1 << 20))


def _check_disk(record: dict[str, Any], inherited: int, what: str) -> None:
    """Refuse to bring ``inherited`` bytes of files into a kernel whose ``disk`` they
    fill.

    Raises:
        ConfigError: naming both sizes; nothing was touched.
    """
    disk = Limits.from_dict(record["limits"]).disk
    if disk and inherited >= disk:
        raise ConfigError(
            what, format_size(inherited),
            f"holds that much in files, more than this kernel's disk size "
            f"({format_size(disk)}); nothing was restored. Use a kernelspec with a larger "
            "--disk",
        )  # fmt: skip


def _allocated_bytes(root: Path) -> int:
    """Bytes of blocks the files and folders below ``root`` take (sparse holes excluded)."""
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.lstat().st_blocks * 512
    return total


def _inherited_bytes(meta: dict[str, Any], folder: Path) -> int:
    """The blocks of the files of the snapshot or base in ``folder`` (from its meta,
    or counted for one taken before the meta kept them)."""
    if "layer_bytes" in meta:
        return int(meta["layer_bytes"])
    return _allocated_bytes(folder / "files")


def _out_of_space(error: str, log: Path) -> bool:
    """Whether a failed CRIU dump ran out of room on the volume."""
    marks = ("No space left on device", "Disk quota exceeded")
    with contextlib.suppress(OSError):
        error += log.read_text(errors="replace")[-20000:]
    return any(mark in error for mark in marks)


def _inside(record: dict[str, Any]) -> str:
    """Where the kernel sees its working folder."""
    return str(record.get("cwd_inside") or record["cwd"])


def _fitting_base(
    config: KernelConfig, prefixes: list[str]
) -> tuple[dict[str, Any] | None, str, str]:
    """The base a new kernel can start from: (its meta or None, why not, the
    in-container path of the working folder)."""
    if not config.base:
        return None, "", config.cwd
    try:
        meta = bases.load(config.base)
    except ConfigError as err:
        return None, str(err), config.cwd
    wanted = {
        "image": config.image, "uid": config.uid, "gid": config.gid,
        "executable": config.executable, "python_prefixes": prefixes,
    }  # fmt: skip
    for key, value in wanted.items():
        if key not in meta:
            return None, "its snapshot is older than base snapshots; take it again", config.cwd
        if meta[key] != value:
            return None, f"its {key.replace('_', ' ')} is {meta[key]!r}, not {value!r}", config.cwd
    return meta, "", str(meta["cwd_inside"])


def describe(record: dict[str, Any]) -> str:
    """One line about a kernel for logs: id, image, limits, network."""
    return (
        f"kernel {record['kernel_id']} (image {record['image']}, "
        f"{Limits.from_dict(record['limits']).describe()}, network {record['network']})"
    )
