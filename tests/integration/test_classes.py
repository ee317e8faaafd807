"""Classes: a teacher publishes a base; the class's kernels start, restart and reset
onto it; the teacher resets them all; publishing again leaves running kernels alone.

Kernels start through jupyter_client with the class's own kernelspec, which
``sandbox-kernel class publish`` writes (here into a folder of the test's own).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from sandbox_kernel.runtime import Runtime, bases, classes, snapshots
from sandbox_kernel.runtime.record import Start

from .conftest import OWNER, Kernels, run_cli
from .probe import run_cell

pytestmark = pytest.mark.integration


@pytest.fixture
def classroom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder for class kernelspecs; the classes, bases and snapshots the test
    made are removed afterwards."""
    folder = tmp_path / "class-kernels"
    monkeypatch.setenv("SANDBOX_KERNEL_CLASS_KERNELS", str(folder))
    before = {b["id"] for b in bases.listing()}
    made = set(snapshots.names(OWNER))
    known = {c["name"] for c in classes.listing()}
    yield folder
    for meta in classes.listing():
        if meta["name"] not in known:
            (classes.classes_dir() / f"{meta['name']}.json").unlink()
    for meta in bases.listing():
        if meta["id"] not in before:
            bases.delete(meta["id"])
    for name in set(snapshots.names(OWNER)) - made:
        snapshots.delete(OWNER, name)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _teach(kernels: Kernels, make_spec, lesson: int) -> tuple[str, str]:
    """A teacher's kernel that set ``lesson`` and wrote notes.txt, snapshotted;
    returns (its kernel id, the snapshot)."""
    km, kc = await kernels.start(make_spec())
    (await run_cell(kc, "import os\nNOTES = os.path.expanduser('~/notes.txt')")).check()
    (await run_cell(kc, f"lesson = {lesson}\nopen(NOTES, 'w').write('lesson {lesson}')")).check()
    snap = _name("lesson")
    done = await run_cli("snapshot", km.kernel_id, snap)
    assert done.returncode == 0, done.stderr
    return km.kernel_id, snap


async def _publish(name: str, snap: str, folder: Path) -> KernelSpecManager:
    """``sandbox-kernel class publish``; the class's kernelspec runs in this process
    (``daemon: off``), as the other tests' kernels do."""
    done = await run_cli(
        "class", "publish", name, "--from", snap, "--memory", "1G",
        env={"SANDBOX_KERNEL_CLASS_KERNELS": str(folder)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Published class {name}" in done.stdout
    spec_file = folder / classes.kernelspec_name(name) / "kernel.json"
    spec = json.loads(spec_file.read_text())
    provisioner = spec["metadata"]["kernel_provisioner"]["config"]
    assert provisioner["class_name"] == name
    provisioner["daemon"] = "off"
    spec_file.write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder)])


STATE = "import socket\nprint(lesson, open(NOTES).read(), socket.gethostname())"


async def _state(kc) -> tuple[str, int | None]:
    cell = await run_cell(kc, STATE)
    return cell.check().strip(), cell.count


async def test_a_class_kernel_starts_restarts_and_resets_onto_the_base(
    kernels: Kernels, make_spec, classroom: Path
) -> None:
    _, snap = await _teach(kernels, make_spec, 42)
    name = _name("intro")
    kernels.ksm = await _publish(name, snap, classroom)
    spec = classes.kernelspec_name(name)
    km1, kc1 = await kernels.start(spec)
    km2, kc2 = await kernels.start(spec)
    runtime = Runtime()
    for km, kc in ((km1, kc1), (km2, kc2)):
        record = runtime.record(km.kernel_id)
        assert record.start is Start.BASE, record.base_note
        assert record.class_name == name
        # Its own hostname, and its cells numbered from 1 (the base's were not).
        assert await _state(kc) == (f"42 lesson 42 kernel-{km.kernel_id[:8]}", 1)

    broken = "lesson = 0\nopen(NOTES, 'w').write('broken')"
    (await run_cell(kc1, broken)).check()
    # A restart lands on the base, files and memory, numbered from 1 again.
    await km1.restart_kernel()
    await kc1.wait_for_ready(timeout=60)
    assert runtime.record(km1.kernel_id).start is Start.BASE
    assert await _state(kc1) == (f"42 lesson 42 kernel-{km1.kernel_id[:8]}", 1)

    # %container reset: the base again; the notebook's numbers go on.
    (await run_cell(kc1, broken)).check()
    cell = await run_cell(kc1, "%container reset")
    assert (
        cell.check()
        .strip()
        .endswith("The kernel was reset to its base: files and memory as the class starts.")
    ), cell
    assert cell.count == 3
    assert await _state(kc1) == (f"42 lesson 42 kernel-{km1.kernel_id[:8]}", 4)
    # The other kernel of the class saw none of it.
    (await run_cell(kc2, "lesson += 1")).check()
    assert (await _state(kc2))[0].startswith("43 lesson 42")

    # --pristine: the image's files, a fresh Python.
    done = await run_cli("reset", "--pristine", km1.kernel_id)
    assert done.returncode == 0, done.stderr
    assert "the image's pristine files" in done.stdout
    code = (
        "import os\nprint('lesson' in globals(), os.path.exists(os.path.expanduser('~/notes.txt')))"
    )
    cell = await run_cell(kc1, code)
    assert cell.check().strip() == "False False"


async def test_class_reset_resets_its_kernels_and_no_other(
    kernels: Kernels, make_spec, classroom: Path
) -> None:
    teacher, snap = await _teach(kernels, make_spec, 7)
    # Names and display names every user's launcher would show are checked first.
    for args, message in (
        (("../../etc", "--from", snap), "class name '../../etc' is not valid"),
        (("ok-name", "--from", snap, "--display-name", "a\nb"), "must be printable"),
    ):
        done = await run_cli("class", "publish", *args)
        assert done.returncode == 2 and message in done.stderr, done
    assert not classes.kernels_folder().exists() or not any(classes.kernels_folder().iterdir())
    name = _name("lab")
    ksm = await _publish(name, snap, classroom)
    other_km, other_kc = await kernels.start(make_spec())
    (await run_cell(other_kc, "mine = 'kept'")).check()
    kernels.ksm = ksm
    students = [await kernels.start(classes.kernelspec_name(name)) for _ in range(2)]
    for _, kc in students:
        (await run_cell(kc, "lesson = -1")).check()

    listed = await run_cli("class", "ps", name)
    assert listed.returncode == 0, listed.stderr
    for km, _ in students:
        assert km.kernel_id in listed.stdout
    assert other_km.kernel_id not in listed.stdout and teacher not in listed.stdout

    done = await run_cli("class", "reset", name)
    assert done.returncode == 0, done.stdout + done.stderr
    for km, kc in students:
        assert km.kernel_id in done.stdout
        assert (await _state(kc))[0] == f"7 lesson 7 kernel-{km.kernel_id[:8]}"
    assert (await run_cell(other_kc, "print(mine)")).check().strip() == "kept"


async def test_publishing_again_leaves_running_kernels_alone(
    kernels: Kernels, make_spec, classroom: Path
) -> None:
    own = kernels.ksm
    name = _name("course")
    _, first = await _teach(kernels, make_spec, 1)
    kernels.ksm = await _publish(name, first, classroom)
    km_old, kc_old = await kernels.start(classes.kernelspec_name(name))
    old_base = Runtime().record(km_old.kernel_id).base
    (await run_cell(kc_old, "work = 'in progress'")).check()

    kernels.ksm = own
    _, second = await _teach(kernels, make_spec, 2)
    kernels.ksm = await _publish(name, second, classroom)
    # The running kernel is untouched, its base kept.
    assert (await run_cell(kc_old, "print(work, lesson)")).check().strip() == "in progress 1"
    assert old_base in {b["id"] for b in bases.listing()}
    # A new kernel starts from the new base.
    km_new, kc_new = await kernels.start(classes.kernelspec_name(name))
    assert (await _state(kc_new))[0].startswith("2 lesson 2")
    assert Runtime().record(km_new.kernel_id).base not in (None, old_base)
    # The old one moves to it at its reset.
    done = await run_cli("class", "reset", name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (await _state(kc_old))[0].startswith("2 lesson 2")
    # Then no kernel uses the old base: it is deleted.
    assert old_base not in {b["id"] for b in bases.listing()}
    assert classes.load(name)["retired"] == []


NOTEBOOKS = Path(__file__).parents[2] / "notebooks"


async def test_the_classroom_notebooks_run(ksm, make_spec, workdir: Path, classroom: Path) -> None:
    """The teaching notebooks: the teacher's publishes class intro from a notebook;
    the student's starts from it, breaks things and resets."""
    import nbformat

    from .conftest import execute_notebook

    teacher = nbformat.read(NOTEBOOKS / "classroom-teacher.ipynb", as_version=4)
    outputs = await execute_notebook(teacher, ksm, make_spec(), workdir)
    text = "".join(outputs)
    assert "5 heights, mean 1.712 m" in text
    assert "Published class intro: base " in text, text
    assert "Class intro: base " in text
    spec_file = classroom / "class-intro" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["daemon"] = "off"
    spec_file.write_text(json.dumps(spec))

    student = nbformat.read(NOTEBOOKS / "classroom-student.ipynb", as_version=4)
    class_ksm = KernelSpecManager(kernel_dirs=[str(classroom)])
    outputs = await execute_notebook(student, class_ksm, "class-intro", workdir)
    code = [c for c in student.cells if c.cell_type == "code"]
    first, broken, reset, after = (
        o for o, c in zip(outputs, student.cells, strict=True) if c.cell_type == "code"
    )
    assert first.startswith("5 heights, mean 1.712 m\nLesson 1: the mean and the median\n"), first
    assert broken.strip() == "heights: [] | notes there: False"
    assert "reset to its base" in reset, reset
    assert after == "5 heights, mean 1.712 m\nLesson 1: the mean and the median\n"
    # Numbered from 1, and never twice.
    assert [c.execution_count for c in code] == [1, 2, 3, 4]
