"""CRIU finds its cache of the kernel's features, even where /run is not a tmpfs
(CRIU itself keeps it only on one): each restore and dump skips ~30 ms of probes."""

import subprocess
from pathlib import Path

import pytest

from sandbox_kernel.runtime import checkpoint, criu, paths

pytestmark = pytest.mark.integration


def test_criu_loads_the_kept_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    criu.KDAT_CACHE.unlink(missing_ok=True)
    (paths.state_dir() / "criu.kdat.stamp").unlink(missing_ok=True)
    monkeypatch.setattr(criu, "_kdat_kept", set())
    binary = checkpoint.criu_binary()
    log = tmp_path / "check.log"
    subprocess.run([binary, "check", "-v4", "--log-file", str(log)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    assert f"Loaded kdat cache from {criu.KDAT_CACHE}" in log.read_text()
    assert criu.KDAT_CACHE.stat().st_mode & 0o077 == 0
    # Made once: a stale stamp (another boot) makes it again; the same does not.
    before = criu.KDAT_CACHE.stat().st_mtime_ns
    monkeypatch.setattr(criu, "_kdat_kept", set())
    assert criu.keep_kdat_cache(binary, paths.state_dir() / "criu.kdat.stamp")
    assert criu.KDAT_CACHE.stat().st_mtime_ns == before
    if not criu._run_is_tmpfs():
        (paths.state_dir() / "criu.kdat.stamp").write_text("another boot\n")
        monkeypatch.setattr(criu, "_kdat_kept", set())
        assert criu.keep_kdat_cache(binary, paths.state_dir() / "criu.kdat.stamp")
        assert criu.KDAT_CACHE.stat().st_mtime_ns != before
