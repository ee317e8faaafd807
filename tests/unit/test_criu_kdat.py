"""CRIU's kernel-features cache, kept for it where /run is not a tmpfs."""

from pathlib import Path

import pytest

from sandbox_kernel.runtime import criu


def test_fs_type_is_the_innermost_mount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n"
        "tmpfs /running tmpfs rw 0 0\n"
        "nsfs /run/netns/x nsfs rw 0 0\n"
    )
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/proc/self/mounts":
            return real(mounts)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    assert criu._fs_type(Path("/run")) == "tmpfs"
    assert criu._fs_type(Path("/run/criu.kdat")) == "tmpfs"
    assert criu._fs_type(Path("/runaway")) == "ext4"
    assert criu._fs_type(Path("/run/netns/x")) == "nsfs"
