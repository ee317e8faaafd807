"""install_criu's steps, with apt, dpkg and the loader faked: no root, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_kernel.runtime import criu

LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"


@pytest.fixture
def fake_tools(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Stand-ins for the commands install_criu runs; returns the commands run."""
    ran: list[list[str]] = []

    def run(cmd: list[str], what: str, timeout: float = 0, cwd: Path | None = None) -> str:
        ran.append(cmd)
        if cmd[0] == "dpkg":
            return "amd64\n"
        if cmd[0] == "apt-cache":
            return "criu\n  Depends: libc6\nlibc6\n<virtual>\n"
        if cmd[0] == "apt-get" and "download" in cmd:
            assert cwd is not None
            (cwd / "criu_4.2_amd64.deb").touch()
            (cwd / "libc6_2.40_amd64.deb").touch()
        if cmd[0] == "dpkg-deb":
            root = Path(cmd[3])
            for rel in (LOADER, "usr/sbin/criu"):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).touch()
        if "--list" in cmd:
            root = Path(cmd[0]).parents[3]
            return f"\tlibc.so.6 => {root}/usr/lib/x86_64-linux-gnu/libc.so.6 (0x1)\n"
        if cmd[-1] == "--version":
            return "Version: 4.2\n"
        return ""

    monkeypatch.setattr(criu, "_run", run)
    monkeypatch.setattr(criu, "_debian_mirror", lambda: ("http://deb.example", "/k.gpg"))
    monkeypatch.setattr(criu, "criu_version", lambda path: (4, 2, 0))
    monkeypatch.setattr(criu, "criu_check", lambda path: (True, "Looks good."))
    return ran


def test_install_unpacks_checks_and_moves_into_place(
    tmp_path: Path, fake_tools: list[list[str]]
) -> None:
    target = tmp_path / "prefix" / "criu"
    target.mkdir(parents=True)
    (target / "stale").touch()
    said: list[str] = []
    installed = criu.install_criu(str(target), said.append)
    assert installed == f"{target}/criu"
    wrapper = (target / "criu").read_text()
    assert wrapper == (
        "#!/bin/sh\n# Written by sandbox-kernel's install_criu.\n"
        f"exec {target}/{LOADER} --library-path "
        f"{target}/usr/lib/x86_64-linux-gnu:{target}/lib/x86_64-linux-gnu "
        f'{target}/usr/sbin/criu "$@"\n'
    )
    assert not (target / "stale").exists()
    assert list(target.parent.iterdir()) == [target]  # the work folder is gone
    assert said[0] == "apt-get update: http://deb.example unstable main amd64 (private lists)"
    assert said[1] == "downloading 2 packages: criu libc6"
    assert said[-1] == "criu check passed: Looks good."
    assert [cmd[0] for cmd in fake_tools][:4] == ["dpkg", "apt-get", "apt-cache", "apt-get"]


def test_libraries_from_outside_the_prefix_are_refused(
    tmp_path: Path, fake_tools: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = criu._run

    def run(cmd: list[str], what: str, timeout: float = 0, cwd: Path | None = None) -> str:
        if "--list" in cmd:
            return "\tlibnl-3.so.200 => /lib/libnl-3.so.200 (0x1)\n"
        return fake(cmd, what, timeout, cwd)

    monkeypatch.setattr(criu, "_run", run)
    target = tmp_path / "criu"
    with pytest.raises(criu.CriuError, match="libraries missing from the prefix"):
        criu.install_criu(str(target), lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_fitting_criu_is_kept(tmp_path: Path, fake_tools: list[list[str]]) -> None:
    (tmp_path / "criu").write_text("#!/bin/sh\n")
    (tmp_path / "criu").chmod(0o755)
    said: list[str] = []
    assert criu.install_criu(str(tmp_path), said.append) == f"{tmp_path}/criu"
    assert fake_tools == []
    assert said == [f"CRIU at {tmp_path}/criu is >= 4.2 and passes criu check: nothing to do"]
