"""The ``sandbox-kernel`` command: install kernelspecs, check the machine, inspect and
clean up kernel containers.

Bad input prints one line that names the value and the fix, exits with status 2,
and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .daemon_client import START_HINT, DaemonClient, daemon_running
from .display import format_size, table
from .errors import ConfigError, ImageNotFound, KernelNotFound, QuotaError, SandboxError
from .runtime import Limits, volume
from .runtime.limits import parse_size
from .runtime.network import NETWORK_MODES
from .runtime.portable import misfit_host
from .runtime.ports import DEFAULT_SOCKET
from .runtime.quotas import DEFAULT_CONFIG

#: Where ``daemon --detach`` writes the daemon's log unless told otherwise.
DEFAULT_LOG = "/var/log/sandbox-kernel/daemon.log"
#: Seconds ``daemon --detach`` waits for the daemon to answer.
DETACH_TIMEOUT = 60.0


class UsageError(SandboxError):
    """Bad command-line input; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandbox-kernel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("install", help="write a kernelspec that runs kernels in containers")
    p.add_argument("--name", required=True, help="kernelspec name, e.g. python3-sandbox")
    p.add_argument("--display-name", help="name shown in the notebook's kernel picker")
    p.add_argument("--image", default="host", help="image of the root filesystem (default host)")
    p.add_argument("--memory", default="2G", help="memory limit, e.g. 2G (default 2G)")
    p.add_argument("--cpus", default="1", help="CPU quota in cores, e.g. 1.5 (default 1)")
    p.add_argument("--pids", default="512", help="most processes and threads (default 512)")
    p.add_argument("--disk", default="10G", help="size of the writable layer (default 10G)")
    p.add_argument("--network", default="none", help="none (default) or egress")
    p.add_argument("--shm", help="size of /dev/shm, e.g. 1G (default: the memory limit)")
    p.add_argument("--base", metavar="SNAPSHOT",
                   help="a live snapshot every new kernel starts from (its imports and data "
                   "are there at once)")  # fmt: skip
    p.add_argument("--base-owner", metavar="OWNER",
                   help="whose snapshot --base names, if several users have one")  # fmt: skip
    p.add_argument("--no-pristine", action="store_true",
                   help="start every kernel cold; by default kernels restore a "
                   "pristine base, an idle kernel of this configuration made at the "
                   "first start")  # fmt: skip
    p.add_argument("--pool", type=int, default=0, metavar="N",
                   help="keep N kernels restored and paused, ready to be claimed: a "
                   "start then takes one at once (default 0; each costs an idle "
                   "kernel's memory)")  # fmt: skip
    p.add_argument("--no-autosave", action="store_true",
                   help="do not checkpoint kernels when they go idle after a cell (by "
                   "default they are: `%%container undo` goes back, and a cell out of "
                   "memory ends with an error)")  # fmt: skip
    p.add_argument("--backend", default="local", choices=("local", "slurm"),
                   help="local (default): kernels run on this machine; slurm: each kernel "
                   "is a Slurm job on a node running the sandbox-kernel daemon")  # fmt: skip
    p.add_argument("--partition", default="", help="with --backend slurm: the jobs' partition")
    p.add_argument("--account", default="", help="with --backend slurm: the jobs' account")
    p.add_argument("--time", default="", dest="time_limit",
                   help="with --backend slurm: each job's time limit, e.g. 8:00:00")  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for this user only")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix")

    sub.add_parser("doctor", help="check every requirement and print how to fix what is missing")
    sub.add_parser("install-criu", help="install CRIU >= 4.2 into a private prefix")
    sub.add_parser("ps", help="list kernel containers with their use against their limits")

    p = sub.add_parser("logs", help="show a kernel's log (its stdout and stderr)")
    p.add_argument("kernel_id")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N lines")

    p = sub.add_parser("limits", help="show or change a running kernel's limits")
    p.add_argument("kernel_id")
    p.add_argument("--memory", help="new memory limit, e.g. 4G")
    p.add_argument("--cpus", help="new CPU quota in cores, e.g. 2")
    p.add_argument("--pids", help="new limit on processes and threads")

    p = sub.add_parser(
        "snapshot",
        help="snapshot a kernel's files and live memory (also: snapshot export NAME FILE, "
        "snapshot import FILE)",
    )
    p.add_argument("kernel_id")
    p.add_argument("name", help="snapshot name, e.g. before-training")
    p.add_argument("-m", "--message", default="", help="a note kept with the snapshot")
    p.add_argument("--files-only", action="store_true", help="keep the files, not the memory")

    p = sub.add_parser(
        "snapshot-export", help="write one of your snapshots to a file (snapshot export NAME FILE)"
    )
    p.add_argument("name")
    p.add_argument("file", help="a new file; nobody but you may read it")
    p.add_argument("--since", metavar="PARENT",
                   help="only what changed since PARENT (the importer must have it)")  # fmt: skip
    p.add_argument("--owner", metavar="UID", help="whose snapshot (an admin's choice)")

    p = sub.add_parser(
        "snapshot-import", help="read a snapshot from an exported file (snapshot import FILE)"
    )
    p.add_argument("file")
    p.add_argument("--name", help="keep it under this name (default: its own)")
    p.add_argument("--cwd", metavar="FOLDER",
                   help="kernels in this host folder see it (default: the folder it was "
                   "taken in)")  # fmt: skip
    p.add_argument("--owner", metavar="UID", help="whose store (an admin's choice)")

    p = sub.add_parser("restore", help="bring a kernel back to a snapshot, in place")
    p.add_argument("kernel_id")
    p.add_argument("name")

    p = sub.add_parser(
        "reset", help="restart a kernel on its base (a class kernel) or the image's pristine files"
    )
    p.add_argument("kernel_id")
    p.add_argument(
        "--pristine", action="store_true", help="the image's pristine files, even with a base"
    )

    p = sub.add_parser("class", help="a class: a base snapshot and a kernelspec for students")
    verbs = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = verbs.add_parser("publish", help="make or replace class NAME from a live snapshot")
    q.add_argument("name", help="the class's name, e.g. intro-2026")
    q.add_argument("--from", dest="snapshot", required=True, metavar="SNAPSHOT")
    q.add_argument("--owner", metavar="UID", help="whose snapshot (an admin's choice)")
    q.add_argument("--display-name", help="shown in the launcher (default: NAME (class))")
    for flag, default in (("memory", "2G"), ("cpus", "1"), ("pids", "512"), ("disk", "10G")):
        q.add_argument(
            f"--{flag}", default=default, help=f"each kernel's {flag} (default {default})"
        )
    q.add_argument("--network", default="none", help="none or egress (default none)")
    q = verbs.add_parser("reset", help="reset every running kernel of class NAME to its base")
    q.add_argument("name")
    q = verbs.add_parser("ps", help="your classes, or the kernels of class NAME")
    q.add_argument("name", nargs="?")

    p = sub.add_parser("snapshots", help="list snapshots (of one kernel's owner), or delete one")
    p.add_argument("kernel_id", nargs="?")
    p.add_argument("--delete", metavar="NAME", help="delete this snapshot")
    p.add_argument(
        "--owner", metavar="UID",
        help="whose snapshot --delete means, where several users have one of that name "
        "(default: the kernel's owner, else the one user who has it)",
    )  # fmt: skip

    p = sub.add_parser(
        "node-run", help="(run by a kernel's Slurm job) start the kernel on this node, hold the job"
    )
    p.add_argument("spec", help="the job's spec file, written by the provisioner")

    p = sub.add_parser(
        "node-step", help="(run by `migrate` in a kernel's job) one step of a move, on its node"
    )
    p.add_argument("verb", choices=["move-out", "thaw"])
    p.add_argument("kernel_id")
    p.add_argument("--dir", default="", help="the move's folder in the shared store")

    p = sub.add_parser(
        "migrate", help="move a running Slurm kernel to another node; the notebook stays"
    )
    p.add_argument("kernel_id")
    p.add_argument("--to", metavar="NODE", help="the node (default: any other Slurm picks)")
    p.add_argument("--away-from", metavar="NODE", help=argparse.SUPPRESS)

    p = sub.add_parser(
        "drain", help="drain a node in Slurm and move every kernel on it elsewhere (root)"
    )
    p.add_argument("node")
    p.add_argument("--reason", default="sandbox-kernel drain", help="the reason Slurm keeps")

    p = sub.add_parser("bases", help="list base snapshots (install --base), or delete one")
    p.add_argument("--delete", metavar="ID", help="delete this base; its kernelspecs start cold")

    p = sub.add_parser("gc", help="remove what crashed servers and kernels left behind")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")

    p = sub.add_parser("daemon", help="run the root service of a shared server (see README)")
    p.add_argument("--config", help=f"its config file (default {DEFAULT_CONFIG})")
    p.add_argument("--socket", help=f"where to listen (default {DEFAULT_SOCKET})")
    p.add_argument("--pid-file", help="the pid file, also its lock (default beside the socket)")
    p.add_argument("--detach", action="store_true", help="run in the background")
    p.add_argument("--unit", action="store_true",
                   help="print a systemd unit that runs it (save it as "
                   "/etc/systemd/system/sandbox-kernel.service)")  # fmt: skip
    p.add_argument(
        "--log", default=DEFAULT_LOG, help=f"with --detach: its log (default {DEFAULT_LOG})"
    )

    sub.add_parser("events", help="follow your kernels' events from the daemon (JSON lines)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sandbox-kernel``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "snapshot" and argv[1] in ("export", "import"):
        argv = [f"snapshot-{argv[1]}", *argv[2:]]  # `snapshot export NAME FILE`
    try:
        args = _parser().parse_args(argv)
        return int(_HANDLERS[args.command](args))
    except (UsageError, ConfigError, KernelNotFound, ImageNotFound, QuotaError, LookupError) as err:
        print(f"sandbox-kernel: {err}", file=sys.stderr)
        return 2
    except SandboxError as err:
        print(f"sandbox-kernel: {err}", file=sys.stderr)
        return 1
    except PermissionError as err:
        if os.geteuid() == 0:
            raise
        # The runtime's state is root's alone (other users' kernels are in it).
        print(
            f"sandbox-kernel: {args.command} needs root or the sandbox-kernel daemon "
            f"({err.strerror}: {err.filename}); start the daemon ({START_HINT}) or run "
            f"it as root, e.g. sudo sandbox-kernel {args.command} ...",
            file=sys.stderr,
        )
        return 2


def _install(args: argparse.Namespace) -> int:
    from .kernelspec import install, provisioner_config, same_display_name

    if args.network not in NETWORK_MODES:
        raise ConfigError("network mode", args.network, "is not known; use none or egress")
    limits = Limits.parse(memory=args.memory, cpus=args.cpus, pids=args.pids, disk=args.disk)
    volume.check_disk_size(limits.disk)
    config = provisioner_config(args.image, limits, args.network)
    if args.shm:
        parse_size(args.shm, "--shm")
        config["shm"] = args.shm
    base = None
    if args.base_owner and not args.base:
        raise ConfigError("--base-owner", args.base_owner, "needs --base SNAPSHOT too")
    if args.base:
        from .runtime import bases, snapshots

        owner = bases.find_owner(args.base, args.base_owner)
        image = snapshots.load(owner, args.base)["image"]
        if image != args.image:
            fix = f"was taken in image {image}; add --image {image}"
            raise ConfigError("--base", args.base, fix)
        base = bases.make_base(owner, args.base)
        config["base"] = base["id"]
    if args.no_pristine:
        config["pristine_base"] = False
    if not args.no_autosave:
        config["autosave"] = True
    if args.pool:
        from .runtime.pool import check_pool

        check_pool(args.pool)
        if args.no_pristine or args.base:
            raise ConfigError(
                "--pool", args.pool,
                "keeps kernels restored from the pristine base; drop --no-pristine and --base",
            )  # fmt: skip
        config["pool"] = args.pool
    slurm = {"partition": args.partition, "account": args.account, "time_limit": args.time_limit}
    if args.backend == "slurm":
        if args.pool or args.base:
            raise ConfigError(
                "--backend", "slurm",
                "runs each kernel as a job on a node: --pool and --base are not for it yet",
            )  # fmt: skip
        config.update({"backend": "slurm", **{k: v for k, v in slurm.items() if v}})
    elif any(slurm.values()):
        raise ConfigError(
            "--partition/--account/--time", next(v for v in slurm.values() if v),
            "are for --backend slurm; add it or drop them",
        )  # fmt: skip
    prefix = sys.prefix if args.sys_prefix else None
    path = install(args.name, args.display_name, config, user=args.user, prefix=prefix)
    print(f"Installed kernelspec {args.name} in {path}")
    display_name = args.display_name or f"Python {sys.version_info[0]} (sandbox)"
    twins = same_display_name(args.name, display_name)
    if twins:
        print(
            f"sandbox-kernel: warning: kernelspecs {', '.join(twins)} have the same display "
            f"name {display_name!r}; the launcher shows them as identical cards. Give this "
            "one its own with --display-name, or remove the others "
            "(`jupyter kernelspec remove NAME`)",
            file=sys.stderr,
        )
    print(f"  image {args.image}, {limits.describe()}, network {args.network}")
    if base is not None:
        print(
            f"  new kernels start from base {base['id']} (snapshot {args.base} of "
            f"{base['snapshot_owner']}, working folder {base['cwd_inside']})"
        )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import run_checks

    rows = [["CHECK", "STATUS", "DETAIL"]]
    failed = 0
    for check in run_checks():
        rows.append([check.name, "ok" if check.ok else "MISSING", check.detail])
        if not check.ok:
            failed += 1
            rows.append(["", "", f"fix: {check.fix}"])
    print(table(rows))
    return 1 if failed else 0


def _install_criu(args: argparse.Namespace) -> int:
    from .runtime.criu import install_criu

    path = install_criu(progress=lambda line: print(line, flush=True))
    print(f"CRIU ready: {path}")
    return 0


class Ops:
    """The runtime's operations for this command: in this process for root, else
    through the daemon, as this user (see ``runtime/service.py``). Without a daemon
    a user may still act in-process on a state folder of their own
    (``$SANDBOX_KERNEL_STATE_DIR``)."""

    def __init__(self) -> None:
        self.client: DaemonClient | None = None
        if os.geteuid() != 0 and daemon_running():
            self.client = DaemonClient()

    def __call__(self, op: str, progress: Callable[[str], None] | None = None, **args: Any) -> Any:
        if self.client is not None:
            return self.client.call_sync(op, progress, **args)
        from .runtime.callers import Caller
        from .runtime.service import KernelService

        async def call() -> Any:
            return await KernelService().call(Caller.of_process(), op, args, progress)

        return asyncio.run(call())


def _ps(args: argparse.Namespace) -> int:
    from .slurm import kernel_jobs

    jobs = kernel_jobs()
    if jobs:
        rows = [["KERNEL ID", "USER", "STATUS", "NODE", "JOB"]]
        rows += [[j["kernel_id"], j["user"], j["state"], j["node"], j["job"]] for j in jobs]
        print("Kernels running as Slurm jobs:\n" + table(rows) + "\n")
    ops = Ops()
    start = time.monotonic()
    first = {k["kernel_id"]: k["usage"] for k in ops("kernels")}
    if not first:
        print("no kernel containers" + (" on this machine" if jobs else ""))
        return 0
    time.sleep(max(0.0, 0.25 - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    rows = [["KERNEL ID", "USER", "STATUS", "IMAGE", "MEMORY", "CPU", "PIDS", "NETWORK", "AGE"]]
    for kernel in ops("kernels"):
        kid, limits = kernel["kernel_id"], kernel["limits"]
        use, before = kernel["usage"], first.get(kid)
        user = _user(kernel["owner_uid"])
        if use is None or before is None:
            rows.append([kid, user, "stopped", kernel["image"], "-", "-", "-", kernel["network"],
                         _age(kernel["created"])])  # fmt: skip
            continue
        cpu = "-"
        if use["cpu_seconds"] is not None and before["cpu_seconds"] is not None:
            cpu = f"{(use['cpu_seconds'] - before['cpu_seconds']) / elapsed * 100:.0f}%"
        cpu += f" / {limits.get('cpus') or '-'}"
        rows.append([
            kid, user, "pooled" if kernel.get("pooled") else "running", kernel["image"],
            f"{format_size(use['memory'])} / {format_size(use['memory_limit'])}",
            cpu, f"{use['pids']} / {use['pids_limit'] or '-'}", kernel["network"],
            _age(kernel["created"]),
        ])  # fmt: skip
    print(table(rows))
    return 0


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _age(created: float) -> str:
    seconds = int(time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _logs(args: argparse.Namespace) -> int:
    print(Ops()("logs", kernel_id=args.kernel_id, tail=args.tail))
    return 0


def _limits(args: argparse.Namespace) -> int:
    change = Limits.parse(memory=args.memory, cpus=args.cpus, pids=args.pids)
    # Root (or the daemon's admin group) may go above the kernelspec's ceiling; the
    # kernel's owner may not, and stays within their quotas.
    limits = Limits.from_dict(Ops()("limits", kernel_id=args.kernel_id, limits=change.to_dict()))
    print(f"kernel {args.kernel_id}: {limits.describe()}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    removed = Ops()("gc", dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for line in removed:
        print(f"{verb} {line}")
    if not removed:
        print("nothing to remove")
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    def progress(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    meta = Ops()(
        "snapshot", progress, kernel_id=args.kernel_id, name=args.name,
        message=args.message, live=not args.files_only,
    )  # fmt: skip
    memory, files = format_size(meta["memory_bytes"]), format_size(meta["file_bytes"])
    print(
        f"Snapshot {meta['name']} of kernel {args.kernel_id}: mode {meta['mode']}, "
        f"{meta['seconds']:.2f} s (frozen {meta['paused_seconds']:.2f} s), "
        f"memory {memory}, files {files}"
    )
    if meta["reason"]:
        print(f"  files only: {meta['reason']}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    started = time.monotonic()
    done = Ops()("restore", kernel_id=args.kernel_id, name=args.name)
    print(f"Kernel {args.kernel_id} restored to {args.name} ({done['mode']}) "
          f"in {time.monotonic() - started:.2f} s")  # fmt: skip
    if done["reason"]:
        print(f"  the kernel was restarted on the snapshot's files: {done['reason']}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    done = Ops()("reset", kernel_id=args.kernel_id, pristine=args.pristine)
    places = {"base": "its base", "files": "its base's files (cold)"}
    where = places.get(done.get("to"), "the image's pristine files")
    print(f"Kernel {args.kernel_id} restarted on {where}")
    if done.get("note"):
        print(f"  {done['note']}")
    return 0


def _class(args: argparse.Namespace) -> int:
    ops = Ops()
    if args.action == "publish":
        limits = {"memory": args.memory, "cpus": args.cpus, "pids": args.pids, "disk": args.disk}
        meta = ops(
            "class_publish", name=args.name, snapshot=args.snapshot, owner=args.owner,
            display_name=args.display_name, limits=limits, network=args.network,
        )  # fmt: skip
        again = " (replacing its base; running kernels keep theirs until reset)"
        print(f"Published class {meta['name']}{again if meta['replaced'] else ''}")
        print(f"  base {meta['base']} from snapshot {meta['snapshot']}")
        spec, shown = meta["kernelspec"], meta["display_name"]
        print(f"  kernelspec {spec} ({shown!r}) in {meta['kernelspec_dir']}")
        return 0
    if args.action == "reset":
        rows = ops("class_reset", name=args.name)
        if not rows:
            print(f"class {args.name} has no kernels")
            return 0
        head = ["KERNEL ID", "USER", "RESET TO", "NOTE"]
        body = [[r["kernel_id"], r["user"], r["to"] or "failed", r["error"]] for r in rows]
        print(table([head, *body]))
        return 1 if any(not r["to"] for r in rows) else 0
    listed = ops("class_ps", name=args.name)
    if not args.name:
        rows = [["CLASS", "KERNELSPEC", "BASE", "SNAPSHOT", "KERNELS", "PUBLISHED"]]
        for m in listed["classes"]:
            rows.append([m["name"], m["kernelspec"], m["base"], m["snapshot"], str(m["kernels"]),
                         _age(m["published"]) + " ago"])  # fmt: skip
        print(table(rows) if len(rows) > 1 else "no classes")
        return 0
    rows = [["KERNEL ID", "USER", "STARTED", "BASE", "MEMORY", "AGE"]]
    for k in listed["kernels"]:
        base = (k["base"] or "-") + ("" if k["current"] or not k["base"] else " (earlier)")
        rows.append([k["kernel_id"], k["user"], k["start"], base, format_size(k["memory_bytes"]),
                     _age(k["created"])])  # fmt: skip
    meta = listed["class"]
    print(f"class {args.name}: base {meta['base']}, kernelspec {meta['kernelspec']}")
    print(table(rows) if len(rows) > 1 else "no kernels")
    return 0


def _bases(args: argparse.Namespace) -> int:
    ops = Ops()
    if args.delete:
        ops("delete_base", base_id=args.delete)
        print(f"Deleted base {args.delete}; kernelspecs naming it start kernels cold")
        return 0
    rows = [["ID", "SNAPSHOT", "OWNER", "CREATED", "MEMORY", "WORKING FOLDER"]]
    for meta in ops("bases"):
        rows.append([
            meta["id"], meta["snapshot"], meta["snapshot_owner"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta["created"])),
            format_size(meta["memory_bytes"]), meta["cwd_inside"],
        ])  # fmt: skip
    print(table(rows) if len(rows) > 1 else "No base snapshots")
    return 0


def _progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def _snapshot_export(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    done = Ops()(
        "export_snapshot", _progress, name=args.name, path=path, since=args.since,
        owner=args.owner,
    )  # fmt: skip
    against = f" against {done['since']}" if done.get("since") else ""
    print(f"Exported snapshot {done['name']}{against} to {path}: {format_size(done['bytes'])}"
          + (f" ({format_size(done['parent_bytes'])} of memory left to the parent)"
             if done.get("parent_bytes") else ""))  # fmt: skip
    return 0


def _snapshot_import(args: argparse.Namespace) -> int:
    meta = Ops()(
        "import_snapshot", _progress, path=os.path.abspath(args.file), name=args.name,
        cwd=os.path.abspath(args.cwd) if args.cwd else None, owner=args.owner,
    )  # fmt: skip
    print(
        f"Imported snapshot {meta['name']} for user {meta['owner']}: mode {meta['mode']}, "
        f"memory {format_size(meta['memory_bytes'])}, files {format_size(meta['file_bytes'])}"
        f"; kernels in {meta['cwd']} see it"
    )
    why = misfit_host(meta.get("host"))
    if why:
        print(f"  it cannot be restored on this machine: {why}", file=sys.stderr)
    return 0


def _node_run(args: argparse.Namespace) -> int:
    from .runtime.noderun import main as node_run

    return node_run(args.spec)


def _node_step(args: argparse.Namespace) -> int:
    from .migrate import node_step

    done = asyncio.run(node_step(args.verb, args.kernel_id, args.dir))
    print(json.dumps(done))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate, print_move

    print_move(asyncio.run(migrate(args.kernel_id, args.to, args.away_from)))
    return 0


def _drain(args: argparse.Namespace) -> int:
    from .migrate import drain

    if os.geteuid() != 0:
        raise UsageError("drain moves every user's kernels: run it as root")
    results = drain(args.node, args.reason)
    rows = [["KERNEL", "USER", "OUTCOME"], *[list(r) for r in results]]
    print(f"Node {args.node} is drained in Slurm; its kernels:")
    print(table(rows) if results else "  (none ran there)")
    return 0 if all(r[2] == "moved" for r in results) else 1


def _snapshots(args: argparse.Namespace) -> int:
    ops = Ops()
    if args.delete:
        if args.owner is not None and not args.owner.isdigit():
            raise UsageError(f"--owner {args.owner!r} is not a uid; use a number, e.g. 1000")
        owner = ops("delete_snapshot", name=args.delete, kernel_id=args.kernel_id, owner=args.owner)
        print(f"Deleted snapshot {args.delete} of user {owner}")
        return 0
    rows = [["OWNER", "NAME", "CREATED", "MODE", "MEMORY", "FILES", "PARENT", "MESSAGE"]]
    for owner, meta in ops("snapshots", kernel_id=args.kernel_id):
        rows.append([
            owner, meta["name"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta["created"])),
            meta["mode"], format_size(meta["memory_bytes"]), format_size(meta["file_bytes"]),
            meta["parent"] or "-", meta["message"],
        ])  # fmt: skip
    print(table(rows) if len(rows) > 1 else "no snapshots")
    return 0


def _daemon(args: argparse.Namespace) -> int:
    from .runtime import daemon
    from .runtime.quotas import DaemonConfig

    if args.unit:
        print(daemon.UNIT.format(python=sys.executable), end="")
        return 0
    config = DaemonConfig.load(Path(args.config) if args.config else None)
    if args.socket:
        config.socket = args.socket
    pid_file = Path(args.pid_file) if args.pid_file else daemon.default_pid_file(config.socket)
    if args.detach:
        return _detach(args, config.socket, pid_file)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return daemon.run(config, pid_file)


def _detach(args: argparse.Namespace, socket_file: str, pid_file: Path) -> int:
    """Start the daemon in the background, its output in ``--log``; return once it
    answers, or fail with the end of its log."""
    argv = [sys.executable, "-m", "sandbox_kernel.cli", "daemon", "--pid-file", str(pid_file)]
    if args.config:
        argv += ["--config", args.config]
    if args.socket:
        argv += ["--socket", args.socket]
    client = DaemonClient(socket_file)
    try:
        other = client.call_sync("whoami")["served_by"]
    except SandboxError:
        other = None  # none answers: start one
    if other is not None:
        raise ConfigError(
            "daemon socket", socket_file,
            f"is served by a daemon that runs already (pid {other}); stop it first",
        )  # fmt: skip
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-5:]
            raise SandboxError("the daemon did not start:\n  " + "\n  ".join(tail))
        try:
            served_by = client.call_sync("whoami")["served_by"]
        except SandboxError:
            served_by = None
        if served_by != child.pid:
            time.sleep(0.05)  # polling a child we started; it reports no readiness
            continue
        print(f"sandbox-kernel daemon runs, pid {child.pid}, socket {socket_file}, log {log}")
        return 0
    child.kill()
    raise SandboxError(f"the daemon did not answer within {DETACH_TIMEOUT:.0f} s; see {log}")


def _events(args: argparse.Namespace) -> int:
    async def follow() -> None:
        async for event in DaemonClient().events():
            print(json.dumps(event), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(follow())
    return 0


_HANDLERS: dict[str, Any] = {
    "snapshot": _snapshot,
    "restore": _restore,
    "snapshots": _snapshots,
    "snapshot-export": _snapshot_export,
    "snapshot-import": _snapshot_import,
    "node-run": _node_run,
    "node-step": _node_step,
    "migrate": _migrate,
    "drain": _drain,
    "reset": _reset,
    "class": _class,
    "bases": _bases,
    "install": _install,
    "doctor": _doctor,
    "install-criu": _install_criu,
    "ps": _ps,
    "logs": _logs,
    "limits": _limits,
    "gc": _gc,
    "daemon": _daemon,
    "events": _events,
}


if __name__ == "__main__":
    sys.exit(main())
