"""A cluster's pure parts: the shared store's index read as hostile, the names a
published snapshot gets on another node, what node-run publishes against what,
and how the provisioner follows a moved kernel and notices a silent node."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import slurm
from sandbox_kernel.runtime import shared
from sandbox_kernel.runtime.fsutil import write_json
from sandbox_kernel.runtime.noderun import Publisher
from sandbox_kernel.slurm import SlurmJob


def _publish(folder: Path, name: str, **more: Any) -> None:
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "created": 1.0, **more}))


def test_the_index_is_read_as_hostile(tmp_path: Path) -> None:
    _publish(tmp_path, "good", kernel_id="k", created=2.0)
    _publish(tmp_path, "older", kernel_id="k", created=1.0)
    (tmp_path / "liar.json").write_text(json.dumps({"name": "someone-else"}))
    (tmp_path / "huge.json").write_text(" " * (shared.INDEX_MAX + 1) + "{}")
    (tmp_path / "junk.json").write_text("{not json")
    os.symlink("/etc/passwd", tmp_path / "link.json")
    os.mkfifo(tmp_path / "fifo.json")  # never read: it would block
    assert [e["name"] for e in shared.entries(tmp_path)] == ["older", "good"]
    assert shared.read_entry(str(tmp_path), "link") is None
    with pytest.raises(Exception, match="is not valid"):
        shared.read_entry(str(tmp_path), "../escape")


def test_a_checkpoint_is_carried_under_a_name_deleted_with_its_kernel() -> None:
    assert shared.local_name("lesson-1") == "lesson-1"
    assert shared.local_name("ckpt-0123abcd-7-beef") == "moved-0123abcd-7-beef"
    assert len(shared.local_name("ckpt-" + "x" * 59)) == 64


def test_forget_published_keeps_the_users_snapshots(tmp_path: Path) -> None:
    for name, checkpoint in (("mine", False), ("ckpt-k-1", True)):
        _publish(tmp_path, name, kernel_id="k", checkpoint=checkpoint)
        (tmp_path / f"{name}.sks").write_bytes(b"x")
    _publish(tmp_path, "ckpt-other-1", kernel_id="other", checkpoint=True)
    shared.forget_published(tmp_path, "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-other-1.json", "mine.json", "mine.sks",
    ]  # fmt: skip


class _Node:
    """The node daemon as node-run's publisher sees it."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.exported: list[tuple[str, str | None]] = []

    async def call(self, op: str, **args: Any) -> Any:
        if op == "kernel_snapshots":
            return self.rows
        assert op == "export_snapshot"
        Path(args["path"]).write_bytes(b"stream")
        self.exported.append((args["name"], args["since"]))
        return {}


def _row(name: str, parent: str | None, created: float) -> dict[str, Any]:
    return {"name": name, "parent": parent, "created": created,
            "checkpoint": name.startswith("ckpt-")}  # fmt: skip


def test_each_is_published_against_the_nearest_published_ancestor(tmp_path: Path) -> None:
    node = _Node([
        _row("a", None, 1), _row("ckpt-k-1", "a", 2), _row("ckpt-k-2", "ckpt-k-1", 3),
        _row("b", "ckpt-k-2", 4),
    ])  # fmt: skip
    publisher = Publisher(node, "k", tmp_path)  # type: ignore[arg-type]
    asyncio.run(publisher.tick())
    # Only the latest checkpoint; a user's snapshot never against a checkpoint (those
    # go at the kernel's shutdown).
    assert node.exported == [("a", None), ("ckpt-k-2", "a"), ("b", "a")]
    entry = json.loads((tmp_path / "b.json").read_text())
    assert (entry["kernel_id"], entry["since"], entry["checkpoint"]) == ("k", "a", False)
    assert (tmp_path / "b.sks").read_bytes() == b"stream"
    assert not list(tmp_path.glob(".*partial"))
    node.rows.append(_row("ckpt-k-3", "b", 5))
    asyncio.run(publisher.tick())  # within CHECKPOINT_EVERY of the last: not yet
    assert len(node.exported) == 3
    publisher.last_checkpoint -= shared.CHECKPOINT_EVERY
    asyncio.run(publisher.tick())
    assert node.exported[-1] == ("ckpt-k-3", "b")


def test_the_provisioner_follows_a_move_and_notices_a_silent_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_KERNEL_SLURM_DIR", str(tmp_path))
    job = SlurmJob("kid", logging.getLogger("test"))
    job.job_id, job.node = 7, "node1"
    ready = tmp_path / "kid.ready"
    # As node-run writes it: a new file each time, renamed into place.
    write_json(ready, {"job": "7", "node": "node1", "address": "10.0.0.1",
                       "ports": {"shell_port": 1}})  # fmt: skip
    assert job._follow() is False  # the same job: nothing to do
    write_json(ready, {"job": "9", "node": "node2", "address": "10.0.0.2",
                       "ports": {"shell_port": 2}})  # fmt: skip
    assert job._follow() is True
    assert (job.job_id, job.node, job.forwarder.target) == (
        9,
        "node2",
        ("10.0.0.2", {"shell_port": 2}),
    )
    assert job._silent() is False  # no heartbeat yet: a kernel still starting
    alive = tmp_path / "kid.alive"
    alive.touch()
    assert job._silent() is False
    monkeypatch.setattr(slurm, "DEAD_AFTER", 0.0)
    assert job._silent() is True  # its time did not move since
    os.utime(alive, ns=(1, 1))
    assert job._silent() is False  # it moved
