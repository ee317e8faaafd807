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
    if (folder / f"{kernel_id}.moving").exists():
        raise ConfigError("kernel", kernel_id, "is moving already; wait for that move to end")
    try:
        where = json.loads((folder / f"{kernel_id}.ready").read_text())
    except (OSError, ValueError):
        raise ConfigError(
            "kernel", kernel_id, "has not started yet; move it once it runs"
        ) from None
    return folder, where


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


async def _wait_for(move_dir: Path, name: str, job: int) -> None:
    """Wait until the target writes ``name`` in the move's folder.

    Raises:
        SlurmError: the target failed (its error), or its job ended.
    """
    deadline = time.monotonic() + STEP_TIMEOUT
    checked = 0.0
    while not (move_dir / name).exists():
        failed = move_dir / "failed"
        if failed.exists():
            raise SlurmError(f"the target node failed: {json.loads(failed.read_text())['error']}")
        if time.monotonic() - checked > 1.0:
            checked = time.monotonic()
            state = await job_state(job)
            if state not in ("PENDING", "CONFIGURING", "RUNNING"):
                raise SlurmError(f"the target's job {job} ended ({state or 'gone'})")
        if time.monotonic() > deadline:
            raise SlurmError(f"the target did not write {name} within {STEP_TIMEOUT:.0f} s")
        await asyncio.sleep(0.01)  # a shared folder tells no one: looked at


async def _wait_ready(ready: Path, job: int, move_dir: Path) -> dict[str, Any]:
    """Wait until the kernel's ready file names the target's job."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        with contextlib.suppress(OSError, ValueError):
            where: dict[str, Any] = json.loads(ready.read_text())
            if int(where.get("job") or 0) == job:
                return where
        failed = move_dir / "failed"
        if failed.exists():
            raise SlurmError(f"the target node failed: {json.loads(failed.read_text())['error']}")
        if time.monotonic() > deadline:
            raise SlurmError(f"the kernel did not run on the target within {STEP_TIMEOUT:.0f} s")
        await asyncio.sleep(0.005)  # as the provisioner: looked at


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
    write_json(moving, {"from": move.source_job})
    sbatch = [a for a in spec.get("sbatch", []) if not a.startswith(("--exclude", "--nodelist"))]
    sbatch.append(f"--nodelist={to}" if to else f"--exclude={away_from or move.source}")
    if to is None and away_from and away_from != move.source:
        sbatch[-1] += f",{move.source}"
    frozen = False
    started = time.monotonic()
    try:
        move.target_job = await submit(kernel_id, target_spec, folder / f"{kernel_id}.log", sbatch)
        base = move_dir / "base.sks"
        sent = await _step(move.source_job, "move-out", kernel_id, "--name", names["base"],
                           "--file", str(base))  # fmt: skip
        move.steps["snapshot and send, kernel running"] = time.monotonic() - started
        move.sizes["snapshot and send, kernel running"] = int(sent["bytes"])
        await _wait_for(move_dir, "staged", move.target_job)
        move.steps["target ready"] = time.monotonic() - started
        cut = time.monotonic()
        frozen = True
        final = await _step(move.source_job, "move-out", kernel_id, "--name", names["final"],
                            "--file", str(move_dir / "final.sks"), "--since", names["base"],
                            "--final")  # fmt: skip
        move.steps["last snapshot and send, frozen"] = time.monotonic() - cut
        move.sizes["last snapshot and send, frozen"] = int(final["bytes"])
        arrived = time.monotonic()
        now = await _wait_ready(folder / f"{kernel_id}.ready", move.target_job, move_dir)
        move.target = str(now["node"])
        move.steps["import and restore on the target"] = time.monotonic() - arrived
        move.steps["kernel unavailable"] = time.monotonic() - cut
    except BaseException:
        write_json(move_dir / "abort", {})
        if move.target_job:
            await _run("scancel", str(move.target_job))
        if frozen:
            with contextlib.suppress(SandboxError):
                await _step(move.source_job, "thaw", kernel_id)
        moving.unlink(missing_ok=True)
        target_spec.unlink(missing_ok=True)
        shutil.rmtree(move_dir, ignore_errors=True)
        raise
    # The old job's node-run removes the frozen kernel there (and its moved- snapshots).
    await _run("scancel", str(move.source_job))
    moving.unlink(missing_ok=True)
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


async def node_step(
    verb: str, kernel_id: str, name: str = "", file: str = "", since: str | None = None,
    final: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One step of a move, on the kernel's node, as its owner (``_step``): ``thaw``
    the kernel, or ``move-out``: snapshot it as ``name`` and write it to ``file``
    (whole once written: the target never reads half a file)."""
    from .daemon_client import DaemonClient

    client = DaemonClient()
    if verb == "thaw":
        await client.call("thaw", kernel_id=kernel_id)
        return {}
    path = Path(file)
    partial = path.with_name(path.name + ".partial")
    done: dict[str, Any] = await client.call(
        "move_out", kernel_id=kernel_id, name=name, path=str(partial), since=since, final=final
    )
    partial.rename(path)
    return done


def print_move(move: Move) -> None:
    print(f"Kernel {move.kernel_id} moved from {move.source} (job {move.source_job}) to "
          f"{move.target} (job {move.target_job})")  # fmt: skip
    print(table(move.rows()))
