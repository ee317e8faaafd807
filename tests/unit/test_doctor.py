"""The doctor's CRIU check: what it says for no CRIU, an old one, and one that dumps."""

from __future__ import annotations

import pytest

from sandbox_kernel import doctor


@pytest.mark.parametrize(
    ("criu", "version", "root", "ok", "detail"),
    [
        (None, None, True, False, "not found"),
        ("/c", (4, 1, 0), True, False, "/c is 4.1.0"),
        ("/c", None, True, False, "/c is unknown version"),
        ("/c", (4, 2, 1), True, True, "4.2.1 at /c: dumped 5 bytes"),
        ("/c", (4, 2, 1), False, False, "4.2.1 at /c: the dump probe needs root"),
    ],
)
def test_criu_check(
    monkeypatch: pytest.MonkeyPatch,
    criu: str | None,
    version: tuple[int, int, int] | None,
    root: bool,
    ok: bool,
    detail: str,
) -> None:
    monkeypatch.setattr(doctor, "find_criu", lambda: criu)
    monkeypatch.setattr(doctor, "criu_version", lambda path: version)
    monkeypatch.setattr(doctor, "probe_dump", lambda path: (True, "dumped 5 bytes"))
    check = doctor._criu(root)
    assert (check.name, check.ok, check.detail) == ("CRIU >= 4.2", ok, detail)
    assert check.fix == "sandbox-kernel install-criu"
