"""Time travel: automatic checkpoints, ``%container undo``, and a cell that runs out of
memory or crashes ending with an error instead of a dead kernel (see
``runtime/timetravel.py``). Real kernels through jupyter_client, real CRIU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from sandbox_kernel.runtime import Runtime, snapshots
from sandbox_kernel.runtime.timetravel import checkpoints_of

from .conftest import OWNER, Kernels, fresh, wait_until
from .probe import run_cell

pytestmark = pytest.mark.integration

SETUP = (
    "import itertools, os, threading\n"
    "g = itertools.count()\n"
    "next(g)\n"
    "f = open('data.txt', 'w+'); f.write('abc'); f.flush(); f.seek(1)\n"
    "stop = threading.Event(); ticks = [0]\n"
    "def tick():\n"
    "    while not stop.wait(0.01):\n"
    "        ticks[0] += 1\n"
    "t = threading.Thread(target=tick, daemon=True); t.start()\n"
    "x = 1"
)
PROBE = (
    "before = ticks[0]; stop.wait(0.2)\n"
    "print(x, next(g), f.read(), t.is_alive() and ticks[0] > before, os.path.exists('data.txt'))"
)


def checkpoints(km: Any) -> list[dict[str, Any]]:
    return checkpoints_of(Runtime().record(km.kernel_id))


async def cell_then_checkpoint(kc: Any, km: Any, code: str) -> Any:
    """Run a cell, then wait until the kernel, idle, has been checkpointed after it."""
    cell = await run_cell(kc, code)
    cell.check()
    await wait_until(
        lambda: any(c["cell"] == cell.count for c in checkpoints(km)), 60,
        f"a checkpoint after {code!r}",
    )  # fmt: skip
    return cell


async def test_undo_goes_back_over_memory_threads_and_files(
    kernels: Kernels, make_spec, workdir: Path
) -> None:
    spec = make_spec(memory="700M", autosave=True)
    km, kc = await kernels.start(spec)
    await cell_then_checkpoint(kc, km, SETUP)  # cell 1
    await cell_then_checkpoint(kc, km, "x = 2; next(g); open('data.txt', 'a').write('DEF')")
    await cell_then_checkpoint(kc, km, "x = 3")
    await cell_then_checkpoint(kc, km, "x = 4; os.remove('data.txt')")  # cell 4
    assert [c["cell"] for c in checkpoints(km)] == [1, 2, 3, 4]
    # Undo the last three cells (2, 3, 4): back to the state before cell 2.
    undone = await run_cell(kc, "%container undo 3")  # cell 5
    assert "back to the state before cell 2" in undone.check(), undone
    probe = await cell_then_checkpoint(kc, km, PROBE)
    # x, the generator, the open file's position, the thread and the file: as after cell 1.
    assert probe.check().strip() == "1 1 bc True True", probe
    # The same client goes on; cells go on being numbered and checkpointed.
    assert probe.count == 6, probe
    await cell_then_checkpoint(kc, km, "x = 8")  # cell 7
    undone = await run_cell(kc, "%container undo")  # cell 8: before cell 7
    assert "before cell 7" in undone.check(), undone
    assert (await run_cell(kc, "print(x)")).check().strip() == "1"
    # --to: the state before cell 3 of the first run (files too).
    undone = await run_cell(kc, "%container undo --to 3")
    assert "before cell 3" in undone.check(), undone
    probe = await run_cell(kc, "print(x, open('data.txt').read())")
    assert probe.check().strip() == "2 abcDEF", probe
    history = (await run_cell(kc, "%container history")).check()
    assert "[2] x = 2; next(g)" in history and "[7] x = 8" in history, history
    too_far = await run_cell(kc, "%container undo --to 0")
    assert too_far.status == "error" and "has no checkpoint" in too_far.evalue, too_far
    # Checkpoints are not named snapshots.
    listed = await run_cell(kc, "%container list")
    assert "ckpt-" not in listed.check(), listed


async def test_run_all_takes_no_checkpoint_between_queued_cells(
    kernels: Kernels, make_spec
) -> None:
    spec = make_spec(memory="700M", autosave=True)
    km, kc = await kernels.start(spec)
    await cell_then_checkpoint(kc, km, "import time")
    # Run All: every request is sent at once, and the kernel queues them.
    ids = [kc.execute(f"time.sleep(0.1); y = {i}") for i in range(5)]
    replies: dict[str, Any] = {}
    while len(replies) < len(ids):
        msg = await kc.get_shell_msg(timeout=60)
        replies[msg["parent_header"]["msg_id"]] = msg
    assert all(r["content"]["status"] == "ok" for r in replies.values())
    last = max(r["content"]["execution_count"] for r in replies.values())
    await wait_until(lambda: checkpoints(km)[-1]["cell"] == last, 60, "the checkpoint after all")
    # One after "import time", one after the last queued cell: none between.
    assert [c["cell"] for c in checkpoints(km)] == [1, last]


async def test_retention_drops_the_oldest_checkpoints_and_keeps_named_snapshots(
    kernels: Kernels, make_spec, names: list[str]
) -> None:
    spec = make_spec(memory="700M", autosave=True, autosave_keep=3)
    km, kc = await kernels.start(spec)
    await cell_then_checkpoint(kc, km, "a = 1")
    name = fresh(names)
    (await run_cell(kc, f"%container snapshot {name}")).check()
    first = checkpoints(km)[0]["name"]
    for i in range(4):
        await cell_then_checkpoint(kc, km, f"a = {i}")
    kept = checkpoints(km)
    assert len(kept) == 3 and first not in {c["name"] for c in kept}
    stored = snapshots.names(OWNER, every=True)
    assert first not in stored and all(c["name"] in stored for c in kept)
    assert name in stored  # a named snapshot is never pruned
    # A shutdown takes the kernel's checkpoints with it.
    await km.shutdown_kernel(now=True)
    assert not [n for n in snapshots.names(OWNER, every=True) if n in {c["name"] for c in kept}]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("%container limits --memory 300M\nb = bytearray(600_000_000)",
         "MemoryError: this cell needed more than the kernel's memory limit (300M)"),
        ("import ctypes; ctypes.string_at(0)",
         "SIGSEGV: the kernel's process was killed by SIGSEGV"),
    ],
)  # fmt: skip
async def test_a_cell_that_kills_the_kernel_ends_with_an_error(
    kernels: Kernels, make_spec, code: str, error: str
) -> None:
    spec = make_spec(memory="700M", autosave=True)
    km, kc = await kernels.start(spec)
    restarts: list[str] = []
    km.add_restart_callback(lambda: restarts.append("restart"), "restart")
    km.add_restart_callback(lambda: restarts.append("dead"), "dead")
    ports = km.get_connection_info()
    await cell_then_checkpoint(kc, km, "kept = 'before'")
    cell = await run_cell(kc, code, timeout=120)
    assert cell.status == "error", cell
    text = f"{cell.ename}: {cell.evalue}"
    assert text.startswith(error), cell
    assert "the kernel is back at its state before this cell" in text, cell
    # The variables from before the cell are there, in the same kernel.
    after = await run_cell(kc, "print(kept)")
    assert after.check().strip() == "before", after
    assert cell.count == 2 and after.count == 3, (cell, after)
    assert km.get_connection_info() == ports
    assert restarts == []


async def test_through_nbclient_a_cell_out_of_memory_is_an_error_and_the_run_goes_on(
    kernels: Kernels, make_spec, workdir: Path
) -> None:
    """nbclient runs cells back to back (no checkpoint between them), and polls the
    kernel while it waits: the kernel, checkpointed before the run, comes back."""
    spec = make_spec(memory="700M", autosave=True)
    km, kc = await kernels.start(spec)
    await cell_then_checkpoint(kc, km, "kept = 'before'")
    # nbclient's client comes from the same manager, so it has the same session and
    # ZeroMQ identity: the kernel's ROUTER can route to one of the two only.
    kc.stop_channels()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%container limits --memory 300M\nb = bytearray(600_000_000)"),
        nbformat.v4.new_code_cell("print(kept)"),
    ]
    client = NotebookClient(nb, km=km, timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(workdir)}})  # fmt: skip
    try:
        await client.async_execute()
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    [error] = [o for o in nb.cells[0].outputs if o["output_type"] == "error"]
    assert error["ename"] == "MemoryError", error
    assert "back at its state before this cell" in error["evalue"], error
    assert nb.cells[1].outputs[0]["text"] == "before\n", nb.cells[1].outputs


async def test_a_snapshot_right_after_a_checkpoint_names_it_without_a_new_dump(
    kernels: Kernels, make_spec, names: list[str]
) -> None:
    spec = make_spec(memory="700M", autosave=True)
    km, kc = await kernels.start(spec)
    await cell_then_checkpoint(kc, km, "a = 1")
    latest = checkpoints(km)[-1]["name"]
    name = fresh(names)
    taken = (await run_cell(kc, f"%container snapshot {name}")).check()
    assert "the checkpoint taken after the last cell" in taken, taken
    meta = snapshots.load(OWNER, name)
    assert meta["copied_from"] == latest and meta["mode"] == "live"
    # Undo sees through the name: before the next cell is the state it names (the
    # snapshot cell itself took no checkpoint).
    await cell_then_checkpoint(kc, km, "a = 10")
    undone = (await run_cell(kc, "%container undo")).check()
    assert "Undone: back to the state before cell" in undone, undone
    assert (await run_cell(kc, "print(a)")).check().strip() == "1"
    # A cell that also runs code dumps anew.
    other = fresh(names)
    taken = (await run_cell(kc, f"a = 2\n%container snapshot {other}")).check()
    assert "the checkpoint taken" not in taken, taken
    assert "copied_from" not in snapshots.load(OWNER, other)
    # The named copy restores, and outlives the checkpoint it came from.
    await cell_then_checkpoint(kc, km, "a = 3")
    restored = await run_cell(kc, f"%container restore {name}")
    assert "Restored to snapshot" in restored.check(), restored
    assert (await run_cell(kc, "print(a)")).check().strip() == "1"
    await km.shutdown_kernel(now=True)  # its checkpoints go
    assert latest not in snapshots.names(OWNER, every=True)
    assert snapshots.verify(OWNER, name)["name"] == name
