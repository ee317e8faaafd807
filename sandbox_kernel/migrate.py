"""Moving a running kernel to another node: ``sandbox-kernel migrate`` and ``drain``.

Slurm cannot move a running job; a kernel moves as a snapshot. Run on the login
host, as the kernel's owner:

1. A job for the kernel is submitted to the target node (its spec says it
   arrives: ``node-run`` launches the kernel there and waits for its snapshots).
2. Meanwhile, a job step in the kernel's own job (``srun --overlap``) snapshots
   the running kernel on its node and exports it to the shared store
   (``base.sks``); the target imports it (``staged``). The kernel runs on.
3. The last step snapshots the kernel again and leaves it frozen, and exports
   only what changed since (``final.sks``). The target imports it against the
   first and restores it: the kernel goes on from that moment, on the target.
4. The target's node-run writes the kernel's ready file; the provisioner, which
   watches it, forwards the connection file's ports to the new node, and the
   notebook's sockets reconnect. The old job is cancelled, and its node removes
   the frozen kernel.

A failure before step 3 leaves the kernel where it was, running; one after it
thaws the kernel where it was. The kernel is unavailable from step 3 to 4 only.
See docs/design.md, "Clusters".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .display import format_size, table
from .errors import ConfigError, SandboxError
from .runtime.fsutil import write_json
from .runtime.noderun import read_spec
from .slurm import SlurmError, _run, job_state, kernel_jobs, submit

#: Seconds each step of a move may take before the move is called off.
STEP_TIMEOUT = 300.0


@dataclass
class Move:
    """One kernel's move, as it went: for the table the CLI prints."""

    kernel_id: str
    source: str = ""
    target: str = ""
    source_job: int = 0
    target_job: int = 0
    steps: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def rows(self) -> list[list[str]]:
        rows = [["STEP", "SECONDS", "BYTES"]]
        for step, seconds in self.steps.items():
            size = self.sizes.get(step)
            rows.append([step, f"{seconds:.3f}", format_size(size) if size else "-"])
        return rows


def find(kernel_id: str) -> tuple[Path, dict[str, Any]]:
    """The folder of kernel ``kernel_id``'s job files, and where it runs now
    (its ready file).

    Raises:
        ConfigError: no Slurm job runs this kernel, or it is moving already.
    """
    jobs = [j for j in kernel_jobs() if j["kernel_id"] == kernel_id]
    if not jobs:
        raise ConfigError(
            "kernel", kernel_id,
            "runs as no Slurm job of yours; `sandbox-kernel ps` lists the kernels' jobs",
        )  # fmt: skip
    folder = Path(jobs[0]["dir"])
    if _moving(folder / f"{kernel_id}.moving"):
        raise ConfigError("kernel", kernel_id, "is moving already; wait for that move to end")
    try:
        where = json.loads((folder / f"{kernel_id}.ready").read_text())
    except (OSError, ValueError):
        raise ConfigError(
            "kernel", kernel_id, "has not started yet; move it once it runs"
        ) from None
    return folder, where


def _moving(marker: Path) -> bool:
    """Whether another move of the kernel is under way: its marker is there, and
    the ``migrate`` that wrote it runs (on this host) or is younger than a move
    can last (elsewhere)."""
    try:
        mark = json.loads(marker.read_text())
        age = time.time() - marker.stat().st_mtime
    except (OSError, ValueError):
        return False
    if mark.get("host") == socket.gethostname():
        try:
            os.kill(int(mark["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):
            return False  # it died mid-move; the move's own undo did not run
        except PermissionError:
            return True
        return True
    return age < 2 * STEP_TIMEOUT


async def _step(job: int, *argv: str) -> dict[str, Any]:
    """Run ``sandbox-kernel node-step ARGV`` on the kernel's node, inside its job
    (``srun --overlap``); its JSON answer."""
    code, out, err = await _run(
        "srun", f"--jobid={job}", "--overlap", "--nodes=1", "--ntasks=1", "--quiet",
        sys.executable, "-m", "sandbox_kernel.cli", "node-step", *argv,
        timeout=STEP_TIMEOUT,
    )  # fmt: skip
    if code != 0:
        raise SlurmError(f"the step on the kernel's node failed: {(err or out).strip()[-1500:]}")
    answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return answer


#: Node states (sinfo's short ones, without a trailing mark) a kernel can move to.
_TAKES_JOBS = {"idle", "mix", "alloc", "comp"}


async def _check_node(node: str) -> None:
    """That ``node`` is a node of the cluster that takes new jobs.

    Raises:
        ConfigError: it is not, with the nodes that are.
    """
    code, out, err = await _run("sinfo", "-h", "-N", "-o", "%N %t")
    if code != 0:
        raise SlurmError(f"sinfo failed: {(err or out).strip()}")
    states = dict(line.split(None, 1) for line in out.splitlines() if " " in line)
    usable = sorted(
        n for n, state in states.items() if state.strip().rstrip("*~#$@^-") in _TAKES_JOBS
    )
    if node not in states:
        raise ConfigError(
            "--to", node, f"is not a node of this cluster; use one of {', '.join(usable)}"
        )
    if node not in usable:
        raise ConfigError(
            "--to", node, f"takes no new jobs (it is {states[node].strip()}); use one of "
            f"{', '.join(usable)}",
        )  # fmt: skip


async def _wait_ready(
    ready: Path, job: int, move_dir: Path, step: asyncio.Future[dict[str, Any]]
) -> dict[str, Any]:
    """Wait until the kernel's ready file names the target's job.

    Raises:
        SlurmError: the target failed (its error), its job ended, or the step on the
            source failed.
    """
    deadline = time.monotonic() + 2 * STEP_TIMEOUT
    checked = time.monotonic()
    while True:
        with contextlib.suppress(OSError, ValueError):
            where: dict[str, Any] = json.loads(ready.read_text())
            if int(where.get("job") or 0) == job:
                return where
        failed = move_dir / "failed"
        if failed.exists():
            raise SlurmError(f"the target node failed: {json.loads(failed.read_text())['error']}")
        if step.done():
            step.result()  # its error, if it failed
        if time.monotonic() - checked > 1.0:
            checked = time.monotonic()
            state = await job_state(job)
            if state not in ("PENDING", "CONFIGURING", "RUNNING"):
                raise SlurmError(f"the target's job {job} ended ({state or 'gone'})")
        if time.monotonic() > deadline:
            raise SlurmError(f"the kernel did not run on the target within {deadline:.0f} s")
        await asyncio.sleep(0.005)  # a shared folder tells no one: looked at


async def migrate(kernel_id: str, to: str | None = None, away_from: str | None = None) -> Move:
    """Move kernel ``kernel_id`` (a Slurm kernel of the caller's) to node ``to``, or
    to any node Slurm picks but ``away_from`` and the one it is on.

    Raises:
        ConfigError: no such kernel, or it is on ``to`` already.
        SlurmError: a step failed; the kernel runs on where it was.
    """
    folder, where = find(kernel_id)
    move = Move(kernel_id, source=str(where["node"]), source_job=int(where["job"]))
    if to is not None and to == move.source:
        raise ConfigError("--to", to, f"is where kernel {kernel_id} runs already")
    if to is not None:
        await _check_node(to)
    spec = read_spec(folder / f"{kernel_id}.json")
    if not spec.get("store"):
        raise ConfigError("kernel", kernel_id, "was started without a shared store; restart it")
    stamp = f"{int(time.time() * 1000) % 10**10:010d}"
    move_dir = Path(spec["store"]) / f".move-{kernel_id}-{stamp}"
    move_dir.mkdir(mode=0o700, parents=True)
    names = {"base": f"moved-{kernel_id[:8]}-{stamp}-base",
             "final": f"moved-{kernel_id[:8]}-{stamp}-final"}  # fmt: skip
    write_json(move_dir / "names.json", names)
    target_spec = folder / f"{kernel_id}.move.json"
    write_json(target_spec, {**spec, "move": {"dir": str(move_dir)}})
    moving = folder / f"{kernel_id}.moving"
    write_json(moving, {"from": move.source_job, "pid": os.getpid(), "host": socket.gethostname()})
    sbatch = [a for a in spec.get("sbatch", []) if not a.startswith(("--exclude", "--nodelist"))]
    sbatch.append(f"--nodelist={to}" if to else f"--exclude={away_from or move.source}")
    if to is None and away_from and away_from != move.source:
        sbatch[-1] += f",{move.source}"
    started = time.monotonic()
    step: asyncio.Future[dict[str, Any]] | None = None
    try:
        move.target_job = await submit(kernel_id, target_spec, folder / f"{kernel_id}.log", sbatch)
        # One step on the source does both snapshots: no process starts while frozen.
        step = asyncio.ensure_future(_step(move.source_job, "move-out", kernel_id,
                                           "--dir", str(move_dir)))  # fmt: skip
        now = await _wait_ready(folder / f"{kernel_id}.ready", move.target_job, move_dir, step)
        seen = time.time()
        done = await step
        move.target = str(now["node"])
        base, final = done["base"], done["final"]
        move.steps["snapshot and send, kernel running"] = float(base["seconds"])
        move.sizes["snapshot and send, kernel running"] = int(base["bytes"])
        move.steps["target ready (it imported the first)"] = float(done["staged_seconds"])
        move.steps["last snapshot and send, frozen"] = float(final["seconds"])
        move.sizes["last snapshot and send, frozen"] = int(final["bytes"])
        for part in ("paused_seconds", "snapshot_seconds", "export_seconds"):
            move.steps[f"  of which {part.split('_')[0]}"] = float(final.get(part) or 0.0)
        move.steps["import and restore on the target"] = seen - float(done["sent_at"])
        move.steps["kernel unavailable (frozen until it runs there)"] = seen - done["frozen_at"]
    except BaseException:
        write_json(move_dir / "abort", {})
        if step is not None:
            with contextlib.suppress(BaseException):
                await step
        if move.target_job:
            await _run("scancel", str(move.target_job))
        if (move_dir / "frozen").exists():
            with contextlib.suppress(SandboxError):
                await _step(move.source_job, "thaw", kernel_id)
        moving.unlink(missing_ok=True)
        target_spec.unlink(missing_ok=True)
        shutil.rmtree(move_dir, ignore_errors=True)
        raise
    # The old job's node-run removes the frozen kernel there (and its moved- snapshots).
    await _run("scancel", str(move.source_job))
    moving.unlink(missing_ok=True)
    target_spec.unlink(missing_ok=True)  # read at the job's start; the kernel's own stays
    shutil.rmtree(move_dir, ignore_errors=True)
    move.steps["whole move"] = time.monotonic() - started
    return move


def drain(node: str, reason: str) -> list[tuple[str, str, str]]:
    """Keep Slurm's new jobs off ``node`` and move every kernel on it elsewhere, each
    as its owner (root's command); ``[(kernel_id, user, outcome)]``.

    Raises:
        SlurmError: Slurm refused the drain.
    """
    done = subprocess.run(
        ["scontrol", "update", f"nodename={node}", "state=drain", f"reason={reason}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SlurmError(f"scontrol refused to drain {node}: {done.stderr.strip()}")
    results = []
    for job in kernel_jobs():
        if job["node"] != node or job["state"] != "running":
            continue
        kid, user = job["kernel_id"], job["user"]
        argv = [sys.executable, "-m", "sandbox_kernel.cli", "migrate", kid, "--away-from", node]
        try:
            moved = _as_user(user, argv)
        except (KeyError, OSError, subprocess.SubprocessError) as err:
            results.append((kid, user, f"failed: {err}"))
            continue
        last = (moved.stdout.strip() or moved.stderr.strip()).splitlines()
        outcome = "moved" if moved.returncode == 0 else "failed: " + (last[-1] if last else "")
        results.append((kid, user, outcome))
    return results


def _as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (with their groups and home), or as this process
    where it is that user."""
    entry = pwd.getpwnam(user)
    if entry.pw_uid == os.geteuid():
        return subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    env = {**os.environ, "HOME": entry.pw_dir, "USER": user, "LOGNAME": user}
    env.pop("SANDBOX_KERNEL_SLURM_DIR", None)
    env.pop("SANDBOX_KERNEL_STORE", None)
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=1800, check=False, env=env,
        user=entry.pw_uid, group=entry.pw_gid, extra_groups=os.getgrouplist(user, entry.pw_gid),
        cwd=entry.pw_dir if os.path.isdir(entry.pw_dir) else "/",
    )  # fmt: skip


# ---- on the kernel's node: ``sandbox-kernel node-step`` ---------------------------------


async def node_step(verb: str, kernel_id: str, move_dir: str = "") -> dict[str, Any]:
    """On the kernel's node, as its owner (``_step``): ``thaw`` the kernel, or
    ``move-out``: send the running kernel (``base.sks``), wait until the target
    has it (``staged``), then freeze it and send what changed since
    (``final.sks``). Each file is whole once it is there (renamed when written)."""
    from .daemon_client import DaemonClient

    client = DaemonClient()
    if verb == "thaw":
        await client.call("thaw", kernel_id=kernel_id)
        return {}
    folder = Path(move_dir)
    names = json.loads((folder / "names.json").read_text())

    async def send(name: str, file: str, since: str | None, final: bool) -> dict[str, Any]:
        begin = time.monotonic()
        partial = folder / f"{file}.partial"
        done: dict[str, Any] = await client.call(
            "move_out", kernel_id=kernel_id, name=name, path=str(partial), since=since,
            final=final,
        )  # fmt: skip
        partial.rename(folder / file)
        return {**done, "seconds": round(time.monotonic() - begin, 4)}

    base = await send(names["base"], "base.sks", None, False)
    waited = time.monotonic()
    deadline = waited + STEP_TIMEOUT
    while not (folder / "staged").exists():
        if (folder / "abort").exists() or (folder / "failed").exists():
            raise SlurmError("the move was called off before the kernel was frozen")
        if time.monotonic() > deadline:
            raise SlurmError(f"the target did not take the kernel in {STEP_TIMEOUT:.0f} s")
        await asyncio.sleep(0.01)  # a shared folder tells no one: looked at
    staged = time.monotonic() - waited
    frozen_at = time.time()
    write_json(folder / "frozen", {"at": frozen_at})
    final = await send(names["final"], "final.sks", names["base"], True)
    return {"base": base, "final": final, "staged_seconds": staged, "frozen_at": frozen_at,
            "sent_at": time.time()}  # fmt: skip


def print_move(move: Move) -> None:
    print(f"Kernel {move.kernel_id} moved from {move.source} (job {move.source_job}) to "
          f"{move.target} (job {move.target_job})")  # fmt: skip
    print(table(move.rows()))
