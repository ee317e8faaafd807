"""``%container`` from the notebook: stock clients see the restore cell complete and
every later output, with no special handling on their side."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.runtime import Runtime, snapshots

from .conftest import OWNER, Kernels, execute_notebook, wait_until
from .probe import run_cell

pytestmark = pytest.mark.integration


@pytest.fixture
def name() -> Iterator[str]:
    made = f"m-{uuid.uuid4().hex[:10]}"
    yield made
    if made in snapshots.names(OWNER):
        snapshots.delete(OWNER, made)


async def test_restore_cell_completes_for_an_unchanged_client_20_times(
    kernels: Kernels, make_spec, name: str
) -> None:
    _, kc = await kernels.start(make_spec())
    (await run_cell(kc, "x = 'at the snapshot'")).check()
    out = (await run_cell(kc, f"%container snapshot {name}")).check()
    assert "live (files and memory)" in out, out
    for i in range(20):
        (await run_cell(kc, f"x = 'changed {i}'; open('f{i}.txt', 'w')")).check()
        cell = await run_cell(kc, f"%container restore {name}", timeout=60)
        assert cell.status == "ok", f"round {i}: {cell.ename} {cell.evalue}"
        assert f"Restored to snapshot {name} (live)" in cell.stdout, f"round {i}: {cell.stdout}"
        after = (
            await run_cell(
                kc,
                "import os; print(x, sorted(os.listdir('.')))\n"
                "print(get_ipython().execution_count, len(In))",
            )
        ).check()
        state, counts = after.strip().splitlines()
        assert state == "at the snapshot []", f"round {i}: {after}"
        # The input history rewinds with the memory, the same way every time; the
        # execution count goes on (three cells a round), so numbers never repeat.
        count, history = (int(n) for n in counts.split())
        if i == 0:
            first_count, first_history = count, history
        assert (count, history) == (first_count + 3 * i, first_history), f"round {i}: {counts}"


async def test_nbclient_runs_a_notebook_that_restores(
    ksm, make_spec, workdir: Path, name: str
) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell(f"%container snapshot {name} -m 'x is 1'"),
        nbformat.v4.new_code_cell("x = 2"),
        nbformat.v4.new_code_cell(f"%container restore {name}"),
        nbformat.v4.new_code_cell("print('x is', x)"),
        nbformat.v4.new_code_cell("%container list"),
    ]
    texts = await execute_notebook(nb, ksm, make_spec(), workdir)
    assert f"Restored to snapshot {name}" in texts[3]
    assert texts[4].strip() == "x is 1"
    assert "x is 1" in texts[5] and name in texts[5]


async def test_bad_input_raises_usage_errors(kernels: Kernels, make_spec) -> None:
    _, kc = await kernels.start(make_spec())
    cell = await run_cell(kc, "%container frobnicate")
    assert cell.ename == "UsageError" and "unknown command 'frobnicate'" in cell.evalue
    cell = await run_cell(kc, "%container restore no-such-snapshot")
    assert cell.ename == "UsageError" and "no snapshot named 'no-such-snapshot'" in cell.evalue
    cell = await run_cell(kc, "%container snapshot 'bad name!'")
    assert cell.ename == "UsageError" and "snapshot name 'bad name!' is not valid" in cell.evalue
    cell = await run_cell(kc, "%container limits --memory lots")
    assert cell.ename == "UsageError" and "memory limit 'lots' is not a size" in cell.evalue
    help_text = await run_cell(kc, "print(get_ipython().find_line_magic('container').__doc__)")
    assert "%container snapshot [NAME] [-m MESSAGE]" in help_text.check()


async def test_limits_and_status_from_the_notebook(kernels: Kernels, make_spec) -> None:
    # Within the kernelspec's 1G and 512 pids: a kernel may not go above them.
    _, kc = await kernels.start(make_spec(memory="1G", pids="512"))
    out = (await run_cell(kc, "%container limits --memory 600M --pids 300")).check()
    assert out.strip() == "memory 600M, cpus 1 core, pids 300"
    out = (
        await run_cell(kc, "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read())")
    ).check()
    assert out.strip() == str(600 << 20)
    status = (await run_cell(kc, "%container status")).check()
    assert "memory" in status and "600M" in status


async def test_outside_a_sandbox_the_magic_says_so(tmp_path: Path) -> None:
    kernels_dir = tmp_path / "kernels"
    write_kernel_spec(kernels_dir / "plain")
    ksm = KernelSpecManager(kernel_dirs=[str(kernels_dir)])
    km = AsyncKernelManager(kernel_name="plain", kernel_spec_manager=ksm)
    await km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = (await run_cell(kc, "%load_ext sandbox_kernel.magics\n%container list")).check()
        assert "works in sandboxed kernels only" in out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_another_kernel_cannot_use_the_control_channel(kernels: Kernels, make_spec) -> None:
    km_a, _ = await kernels.start(make_spec(network="egress"))
    _, kc_b = await kernels.start(make_spec(network="egress"))
    # B learns A's control address (the host end of A's veth) and tries it.
    host_a = km_a.ip.rsplit(".", 1)[0] + "." + str(int(km_a.ip.rsplit(".", 1)[1]) - 1)
    out = (
        await run_cell(
            kc_b,
            "import socket\n"
            "s = socket.socket(); s.settimeout(2)\n"
            "try:\n"
            f"    s.connect(({host_a!r}, 50100)); print('reached')\n"
            "except OSError as err:\n"
            "    print('blocked', err.strerror or 'timed out')\n",
        )
    ).check()
    assert out.startswith("blocked"), f"kernel B reached kernel A's control server: {out}"
    # A request signed with a made-up token is refused by B's own server.
    out = (
        await run_cell(
            kc_b,
            "import json\n"
            "from sandbox_kernel.magics.channel import Channel, ChannelError\n"
            "ch = Channel(); ch.creds = {**ch.creds, 'token': '00' * 32}\n"
            "try:\n"
            "    ch.request('list'); print('accepted')\n"
            "except ChannelError as err:\n"
            "    print(err)\n",
        )
    ).check()
    assert "refused: the request's signature is wrong" in out


async def test_reset_from_a_cell_completes_the_cell(kernels: Kernels, make_spec) -> None:
    _, kc = await kernels.start(make_spec())
    (await run_cell(kc, "x = 1; open('/tmp/mine', 'w')")).check()
    cell = await run_cell(kc, "%container reset", timeout=60)
    assert cell.status == "ok", f"{cell.ename}: {cell.evalue}"
    assert "The kernel was reset" in cell.stdout
    after = await run_cell(kc, "import os; print(os.path.exists('/tmp/mine')); x")
    assert after.stdout.strip() == "False" and after.ename == "NameError"


async def test_a_big_snapshot_shows_its_progress(kernels: Kernels, make_spec, names) -> None:
    _, kc = await kernels.start(make_spec(memory="1G"))
    make = "np.random.default_rng(5).integers(0, 256, size=400 << 20, dtype=np.uint8)"
    (await run_cell(kc, f"import numpy as np; big = {make}")).check()
    name = f"t-{uuid.uuid4().hex[:10]}"
    names.append(name)
    cell = await run_cell(kc, f"%container snapshot {name}", timeout=120)
    lines = cell.check().splitlines()
    assert lines[0] == f"Taking snapshot {name} ...", cell.stdout
    assert lines[-1].startswith(f"Snapshot {name}: live"), cell.stdout
    # Its progress bar's text, updated in place, ends with the steps it took.
    updates = [o for o in cell.outputs if o["header"]["msg_type"] == "update_display_data"]
    assert updates, cell.outputs
    final = updates[-1]["content"]["data"]["text/plain"]
    assert f"Snapshot {name}: done in" in final and "to disk in the background" in final, final


async def test_help_rich_tables_and_a_quiet_diff(kernels: Kernels, make_spec, name: str) -> None:
    _, kc = await kernels.start(make_spec())
    out = (await run_cell(kc, "%container help")).check()
    assert "snapshot [NAME] [-m MESSAGE]" in out and "diff [NAME] [--all]" in out
    assert "reset [--pristine]" in out and "class publish|reset|ps NAME" in out
    (await run_cell(kc, f"%container snapshot {name}")).check()
    cell = await run_cell(kc, "%container list")
    shown = [
        o["content"]["data"] for o in cell.outputs if o["header"]["msg_type"] == "display_data"
    ]
    assert len(shown) == 1 and "<table>" in shown[0]["text/html"]
    assert f"<td>{name}</td>" in shown[0]["text/html"] and name in shown[0]["text/plain"]
    (await run_cell(kc, "open('added.txt', 'w').write('x')")).check()
    out = (await run_cell(kc, "%container diff")).check()
    assert out.startswith(f"Changes since {name}: 1 added") and "+ " in out and "added.txt" in out
    assert "history.sqlite" not in out
    cell = await run_cell(kc, "%container restore no-such-one")
    assert cell.ename == "UsageError" and cell.stdout == ""  # one error, nothing before it


async def test_operators_read_snapshots_and_restores_in_the_log(
    kernels: Kernels, make_spec, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, f"%container snapshot {name}")).check()
    await run_cell(kc, f"%container restore {name}")
    await run_cell(kc, "%container reset")
    kid = km.kernel_id

    def logged(start: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]

    await wait_until(lambda: logged("reset kernel"), 60, "the reset's log line")
    (line,) = logged(f"snapshot {name} of kernel {kid}")
    assert f"(owner {OWNER})" in line and "memory" in line and " s" in line
    (line,) = logged(f"restored kernel {kid} (owner {OWNER}) to snapshot {name}")
    # The kernelspec's kernels start from their pristine base: a reset goes back to it.
    record = Runtime().record(kid)
    assert logged(f"reset kernel {kid} (owner {OWNER}) to its pristine base {record.base}")


async def test_execution_counts_never_repeat(kernels: Kernels, make_spec, name: str) -> None:
    """Memory and files go back on a restore or reset; the notebook's numbers go on."""
    _, kc = await kernels.start(make_spec())
    counts = []
    for code in ("x = 1", f"%container snapshot {name}", "x = 2", f"%container restore {name}",
                 "print(x)", "%container reset", "print('fresh')", "1 + 1"):  # fmt: skip
        reply = await kc.execute_interactive(code, timeout=120, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok", (code, reply["content"])
        counts.append(reply["content"]["execution_count"])
    assert counts == list(range(1, 9)), counts
    cell = await run_cell(kc, "print(x if 'x' in dir() else 'reset')")
    assert cell.check() == "reset\n"
