"""The ``%container`` panel and the progress bars in a real sandboxed kernel, driven
the way a browser would: the panel's widgets arrive as comm_open messages and one
display, and a button click is the comm_msg a widget manager sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest

from sandbox_kernel.runtime import Runtime

from .conftest import Kernels, execute_notebook, fresh, wait_until
from .probe import run_cell

pytestmark = pytest.mark.integration

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass
class Messages:
    """Every iopub message of one request, and the reply."""

    iopub: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] | None = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.iopub if m["header"]["msg_type"] == kind]

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of("stream"))

    def models(self) -> dict[str, dict[str, Any]]:
        """Widget models opened (id -> state), with later updates applied."""
        models = {
            m["content"]["comm_id"]: dict(m["content"]["data"]["state"])
            for m in self.of("comm_open")
            if m["content"].get("target_name") == "jupyter.widget"
        }
        for m in self.of("comm_msg"):
            data = m["content"]["data"]
            if data.get("method") == "update" and m["content"]["comm_id"] in models:
                models[m["content"]["comm_id"]].update(data["state"])
        return models


async def execute(kc: Any, code: str, timeout: float = 120) -> Messages:
    """Run ``code`` as a cell; every iopub message it caused, and its reply."""
    got = Messages()
    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=got.iopub.append)
    got.reply = reply
    return got


async def send_comm(kc: Any, comm_id: str, data: dict[str, Any], timeout: float = 120) -> Messages:
    """Send the comm_msg a widget manager sends (a click, a field's new value) and
    collect the iopub messages it caused, until the kernel is idle for it."""
    msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
    kc.shell_channel.send(msg)
    got = Messages()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        assert left > 0, f"no idle for the comm message; got {[m['msg_type'] for m in got.iopub]}"
        try:
            message = await kc.get_iopub_msg(timeout=min(left, 5))
        except Exception:  # queue.Empty: keep waiting until the deadline
            continue
        if message["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            continue
        got.iopub.append(message)
        state = message["content"].get("execution_state")
        if message["header"]["msg_type"] == "status" and state == "idle":
            return got


def click() -> dict[str, Any]:
    return {"method": "custom", "content": {"event": "click"}}


def refs(state: dict[str, Any]) -> list[str]:
    return [c.removeprefix("IPY_MODEL_") for c in state.get("children", [])]


@dataclass
class Panel:
    """The panel's widget models, as the page got them."""

    box: str
    models: dict[str, dict[str, Any]]

    def find(self, test: Callable[[dict[str, Any]], bool]) -> list[str]:
        return [mid for mid, s in self.models.items() if test(s)]

    def button(self, description: str) -> str:
        (found,) = self.find(
            lambda s: s.get("_model_name") == "ButtonModel" and s["description"] == description
        )
        return found

    def row_button(self, snapshot: str, description: str) -> str:
        """The button ``description`` in the row of ``snapshot`` (name first)."""
        for state in self.models.values():
            children = refs(state)
            if state.get("_model_name") != "HBoxModel" or not children:
                continue
            first = self.models.get(children[0], {})
            if first.get("_model_name") == "HTMLModel" and snapshot in first["value"]:
                for child in children:
                    s = self.models[child]
                    if s.get("_model_name") == "ButtonModel" and s["description"] == description:
                        return child
        raise AssertionError(f"no {description} button in a row of {snapshot}")


async def open_panel(kc: Any) -> tuple[Panel, Messages]:
    cell = await execute(kc, "%container")
    assert cell.reply and cell.reply["content"]["status"] == "ok", cell.reply
    (shown,) = cell.of("display_data")
    box = shown["content"]["data"][WIDGET_VIEW]["model_id"]
    return Panel(box, cell.models()), cell


async def test_the_panel_is_a_widget_with_a_useful_text(
    kernels: Kernels, make_spec, names: list[str]
) -> None:
    _, kc = await kernels.start(make_spec(memory="1G", pids="256"))
    name = fresh(names)
    (await run_cell(kc, f"%container snapshot {name}")).check()
    panel, cell = await open_panel(kc)
    assert panel.models[panel.box]["_model_name"] == "VBoxModel"
    (shown,) = cell.of("display_data")
    text = shown["content"]["data"]["text/plain"]
    assert "memory" in text and "1G" in text and name in text and "%container help" in text
    assert "<table>" in shown["content"]["data"]["text/html"]
    # The gauges, the ticker and a row with its three buttons.
    bars = panel.find(lambda s: s.get("_model_name") == "FloatProgressModel")
    assert {panel.models[b]["description"] for b in bars} >= {"memory", "cpu", "pids"}
    (play,) = panel.find(lambda s: s.get("_model_name") == "PlayModel")
    assert panel.models[play]["interval"] == 2000
    for label in ("Restore", "Delete", "Diff"):
        panel.row_button(name, label)
    # The browser's ticker refreshes the gauges through the control channel.
    tick = await send_comm(
        kc, play, {"method": "update", "state": {"value": 1}, "buffer_paths": []}
    )
    # The CPU gauge needs two answers: the tick's is its second.
    said = [str(m["content"]["data"].get("state", {}).get("value")) for m in tick.of("comm_msg")]
    assert any(text.endswith("cores of 1 core") for text in said), tick.iopub
    help_text = (await run_cell(kc, "%container help")).check()
    assert "snapshot [NAME] [-m MESSAGE]" in help_text and "restore NAME" in help_text


async def test_limits_from_the_panel_within_and_above_the_ceiling(
    kernels: Kernels, make_spec
) -> None:
    _, kc = await kernels.start(make_spec(memory="1G", pids="512"))
    panel, _ = await open_panel(kc)
    (pids,) = panel.find(
        lambda s: s.get("_model_name") == "TextModel" and s["description"] == "pids"
    )
    (message,) = panel.find(lambda s: s.get("_model_name") == "HTMLModel" and s["value"] == "")
    for value, expect in (("300", "pids 300"), ("4096", "ceiling")):
        await send_comm(
            kc, pids, {"method": "update", "state": {"value": value}, "buffer_paths": []}
        )
        done = await send_comm(kc, panel.button("Set limits"), click())
        said = [
            m["content"]["data"]["state"]["value"]
            for m in done.of("comm_msg")
            if m["content"]["comm_id"] == message and "value" in m["content"]["data"]["state"]
        ]
        assert said and expect in said[-1], said
    out = (await run_cell(kc, "print(open('/sys/fs/cgroup/pids/pids.max').read())")).check()
    assert out.strip() == "300"


async def test_restore_button_restores_files_and_memory(
    kernels: Kernels, make_spec, names: list[str]
) -> None:
    _, kc = await kernels.start(make_spec())
    name = fresh(names)
    (await run_cell(kc, "x = 'at the snapshot'")).check()
    (await run_cell(kc, f"%container snapshot {name}")).check()
    (await run_cell(kc, "x = 'changed'; open('after.txt', 'w').close()")).check()
    before = await execute(kc, "1")
    assert before.reply is not None
    count = before.reply["content"]["execution_count"]
    panel, _ = await open_panel(kc)  # made after the snapshot: the restored process lacks it
    (message,) = panel.find(lambda s: s.get("_model_name") == "HTMLModel" and s["value"] == "")
    done = await send_comm(kc, panel.row_button(name, "Restore"), click())
    assert f"Restored to snapshot {name} (live)" in done.stdout, done.iopub
    # The panel says it lost its process, rather than ignoring the next clicks.
    stale = [
        m["content"]["data"]["state"]["value"]
        for m in done.of("comm_msg")
        if m["content"]["comm_id"] == message
    ]
    assert stale and "run <code>%container</code>" in stale[-1], stale
    after = await execute(kc, "import os; print(x, os.path.exists('after.txt'))")
    assert after.stdout.strip() == "at the snapshot False", after.iopub
    # Numbering goes on: the panel's cell took a number, the click none.
    assert after.reply is not None
    assert after.reply["content"]["execution_count"] == count + 2


async def test_a_snapshot_from_the_panel_restored_by_a_cell(
    kernels: Kernels, make_spec, names: list[str]
) -> None:
    _, kc = await kernels.start(make_spec())
    name = fresh(names)
    (await run_cell(kc, "x = 'at the snapshot'")).check()
    panel, _ = await open_panel(kc)
    (field_id,) = panel.find(
        lambda s: s.get("_model_name") == "TextModel" and s["placeholder"] == "name (optional)"
    )
    await send_comm(
        kc, field_id, {"method": "update", "state": {"value": name}, "buffer_paths": []}
    )
    taken = await send_comm(kc, panel.button("Snapshot"), click())
    assert f"Snapshot {name}: live" in taken.stdout, taken.iopub
    (await run_cell(kc, "x = 'changed'")).check()
    # The restored process wakes up in the click, which had no reply of its own: the
    # restore cell must still get one.
    cell = await run_cell(kc, f"%container restore {name}", timeout=60)
    assert cell.status == "ok", f"{cell.ename}: {cell.evalue}"
    assert f"Restored to snapshot {name} (live)" in cell.stdout
    assert (await run_cell(kc, "print(x)")).check().strip() == "at the snapshot"


async def test_slow_snapshot_and_restore_show_bars_that_end_full(
    kernels: Kernels, make_spec, names: list[str]
) -> None:
    _, kc = await kernels.start(make_spec())
    name = fresh(names)
    # Every snapshot and restore shows its bar at once.
    (
        await run_cell(
            kc, "from sandbox_kernel.magics import progress; progress.PROGRESS_AFTER = 0"
        )
    ).check()
    (await run_cell(kc, "x = 1")).check()
    snap = await execute(kc, f"%container snapshot {name}")
    assert snap.reply and snap.reply["content"]["status"] == "ok"
    (shown,) = snap.of("display_data")
    assert WIDGET_VIEW in shown["content"]["data"]
    display_id = shown["content"]["transient"]["display_id"]
    final = [m for m in snap.of("update_display_data")
             if m["content"]["transient"]["display_id"] == display_id][-1]  # fmt: skip
    assert f"Snapshot {name}: done in" in final["content"]["data"]["text/plain"]
    assert "to disk in the background" in final["content"]["data"]["text/plain"]
    (await run_cell(kc, "x = 2")).check()
    before = snap.reply["content"]["execution_count"]
    restore = await execute(kc, f"%container restore {name}")
    assert restore.reply and restore.reply["content"]["status"] == "ok", restore.reply
    assert restore.reply["content"]["execution_count"] == before + 2
    (shown,) = restore.of("display_data")
    display_id = shown["content"]["transient"]["display_id"]
    bar_box = shown["content"]["data"][WIDGET_VIEW]["model_id"]
    bar_models = refs(restore.models()[bar_box])
    # The restored process finished the bar the old one showed: full, and its text.
    updates = [m for m in restore.of("update_display_data")
               if m["content"]["transient"]["display_id"] == display_id]  # fmt: skip
    assert updates, restore.iopub
    assert f"Restoring {name}: done in" in updates[-1]["content"]["data"]["text/plain"]
    assert restore.models()[bar_models[0]]["value"] == 1.0
    assert restore.models()[bar_models[0]]["bar_style"] == "success"
    assert f"Restored to snapshot {name} (live)" in restore.stdout
    assert (await run_cell(kc, "print(x)")).check().strip() == "1"


async def test_without_widgets_the_panel_is_text(
    kernels: Kernels, make_spec, names: list[str], ksm, workdir: Path
) -> None:
    _, kc = await kernels.start(make_spec())
    name = fresh(names)
    (await run_cell(kc, f"%container snapshot {name}")).check()
    # ipywidgets that cannot be imported: the text (and HTML) form alone.
    cell = await execute(kc, "import sys; sys.modules['ipywidgets'] = None\n%container")
    (shown,) = cell.of("display_data")
    assert WIDGET_VIEW not in shown["content"]["data"]
    assert name in shown["content"]["data"]["text/plain"]
    # A notebook run by nbclient (jupyter execute) keeps the text of the panel.
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%container")]
    texts = await execute_notebook(nb, ksm, make_spec(), workdir)
    assert "memory" in texts[0] and name in texts[0] and "%container help" in texts[0]
    assert json.dumps(nb.cells[0]["outputs"]).count(WIDGET_VIEW) == 1


async def test_the_timeline_goes_back_to_a_chosen_checkpoint(kernels: Kernels, make_spec) -> None:
    km, kc = await kernels.start(make_spec(autosave=True))
    runtime = Runtime()

    def kept() -> int:
        return len(runtime.record(km.kernel_id).extra.get("checkpoints") or [])

    for i, code in enumerate(("x = 'one'", "x = 'two'; open('two.txt', 'w').close()",
                              "x = 'three'"), 1):  # fmt: skip
        (await run_cell(kc, code)).check()
        await wait_until(lambda i=i: kept() >= i, 60, f"the checkpoint after cell {i}")
    panel, _ = await open_panel(kc)
    (timeline,) = panel.find(lambda s: s.get("_model_name") == "ToggleButtonsModel")
    state = panel.models[timeline]
    assert state["_options_labels"] == ["2", "3", "4"], state
    assert state["index"] == 2 and state["tooltips"][0].startswith("before cell 2: after [1]")
    (autosave,) = panel.find(lambda s: s.get("_model_name") == "CheckboxModel")
    assert panel.models[autosave]["value"] is True
    (message,) = panel.find(lambda s: s.get("_model_name") == "HTMLModel" and s["value"] == "")
    # The page picks "2" (the state before cell 2), then clicks Go back here.
    await send_comm(kc, timeline, {"method": "update", "state": {"index": 0}, "buffer_paths": []})
    done = await send_comm(kc, panel.button("Go back here"), click())
    assert "Undone: back to the state before cell 2" in done.stdout, done.iopub
    # The panel was made after that checkpoint: it is told it lost its process.
    said = [
        m["content"]["data"]["state"]["value"]
        for m in done.of("comm_msg")
        if m["content"]["comm_id"] == message and "value" in m["content"]["data"]["state"]
    ]
    assert said and "the state before cell 2" in said[-1], said
    after = await execute(kc, "import os; print(x, os.path.exists('two.txt'))")
    assert after.stdout.strip() == "one False", after.iopub
