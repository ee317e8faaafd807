"""The cell file a kernel writes for the runtime (``timetravel.read_cell``): the
kernel's own file, read by root, so hostile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sandbox_kernel.runtime.timetravel import CELL_FILE, CELL_FILE_MAX, read_cell

GOOD = {
    "header": {"msg_id": "m1", "session": "s"}, "ident": ["00ff"], "count": 7,
    "peers": {"shell": 2, "iopub": 1, "other": 9, "bad": "x"},
}  # fmt: skip


def write(folder: Path, data: object) -> Path:
    path = folder / CELL_FILE
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_good_cell_file_gives_the_cell_to_answer(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    cell = read_cell(tmp_path, os.getuid())
    assert cell == {
        "parent": {"header": {"msg_id": "m1", "session": "s"}}, "ident": ["00ff"],
        "count": 7, "peers": {"shell": 2, "iopub": 1},
    }  # fmt: skip


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(GOOD))
    (tmp_path / CELL_FILE).symlink_to(secret)
    assert read_cell(tmp_path, os.getuid()) is None


def test_a_file_of_another_user_is_refused(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    assert read_cell(tmp_path, os.getuid() + 1) is None


def test_a_folder_or_fifo_in_its_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / CELL_FILE).mkdir()
    assert read_cell(tmp_path, os.getuid()) is None
    (tmp_path / CELL_FILE).rmdir()
    os.mkfifo(tmp_path / CELL_FILE)  # a read would block: it is not opened for reading
    assert read_cell(tmp_path, os.getuid()) is None


def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    write(tmp_path, "x" * (CELL_FILE_MAX + 1))
    assert read_cell(tmp_path, os.getuid()) is None


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        "[]",
        json.dumps({"header": "h", "ident": []}),
        json.dumps({"header": {"msg_id": 5}, "ident": []}),
        json.dumps({"header": {"msg_id": "m"}, "ident": [1]}),
        json.dumps({"header": {"msg_id": "m"}}),
    ],
)
def test_a_malformed_cell_file_gives_nothing(tmp_path: Path, data: str) -> None:
    write(tmp_path, data)
    assert read_cell(tmp_path, os.getuid()) is None


def test_a_missing_file_gives_nothing(tmp_path: Path) -> None:
    assert read_cell(tmp_path, os.getuid()) is None
