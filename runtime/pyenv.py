"""Which host folders a kernel's Python needs: the virtualenv and the base install."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sandbox_kernel.errors import ConfigError

#: Host trees every container already sees through the /usr bind.
SYSTEM_TREES = (Path("/usr"),)


def python_prefixes(executable: str) -> list[Path]:
    """The prefixes to bind read-only so ``executable`` runs inside the container.

    For a virtualenv's python that is the virtualenv itself and the base install it
    was made from (``home`` in ``pyvenv.cfg``, and wherever its symlinks lead).
    Prefixes already under /usr are left out, and nested ones are merged.

    Raises:
        ConfigError: ``executable`` cannot be found.
    """
    found = executable if "/" in executable else shutil.which(executable)
    if not found or not Path(found).exists():
        raise ConfigError(
            "kernel executable", executable, "does not exist; reinstall the kernelspec"
        )
    exe = Path(found).absolute()
    candidates: list[Path] = []
    cfg = exe.parent.parent / "pyvenv.cfg"
    if cfg.is_file():
        candidates.append(exe.parent.parent)
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                candidates.append(Path(value.strip()).resolve().parent)
    candidates.append(exe.resolve().parent.parent)
    return merge_prefixes(candidates)


def package_dirs() -> list[Path]:
    """Where this package's code lives, so kernels can import ``sandbox_kernel.magics``.

    For a regular install that is inside the environment (merged away with it);
    for an editable one, the source folders.
    """
    import sandbox_kernel
    import sandbox_kernel.magics
    import sandbox_kernel.runtime

    modules = (sandbox_kernel, sandbox_kernel.magics, sandbox_kernel.runtime)
    return [Path(m.__file__).resolve().parent for m in modules if m.__file__]


def merge_prefixes(candidates: list[Path]) -> list[Path]:
    """Drop duplicates, paths under /usr, and paths inside another candidate."""
    kept: list[Path] = []
    for path in sorted(set(candidates), key=lambda p: (len(p.parts), str(p))):
        if any(path == t or t in path.parents for t in SYSTEM_TREES):
            continue
        if path == Path("/"):
            continue
        if any(k == path or k in path.parents for k in kept):
            continue
        kept.append(path)
    return kept


#: Run by the kernel's own Python in an empty HOME: IPython makes its profile and
#: its history database there, as it would at a kernel's first start.
_HOME_SCRIPT = (
    "from IPython.core.interactiveshell import InteractiveShell; "
    "InteractiveShell.instance().history_manager.end_session()"
)


def home_template(executable: str, store: Path, uid: int = 0, gid: int = 0) -> Path | None:
    """A home folder with IPython's profile and history database already made.

    Copied into each new kernel's home, so its first start does not have to make
    them (with the fsyncs of a new sqlite database, that costs about 45 ms here).
    Made once per Python and user under ``store`` and reused; None if that Python
    cannot make one (then the kernel makes its own at start, only slower).

    The Python is the user's, so it runs as the kernel's user ``uid``:``gid``, never
    as root. What it made is then checked (folders, regular files with one link
    and symlinks only: no FIFO that would hang a copy, no hard link to a file the
    user could not read) and given to root, so the user cannot change it later.
    """
    key = hashlib.sha256(f"{Path(executable).absolute()}\0{uid}".encode()).hexdigest()[:16]
    target = store / key
    if target.is_dir():
        return target
    store.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=store, prefix=".building-"))
    as_user = os.geteuid() == 0 and uid != 0
    if as_user:
        os.chown(tmp, uid, gid)
    env = {"HOME": str(tmp), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    ids: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if as_user else {}
    try:
        done = subprocess.run(
            [executable, "-c", _HOME_SCRIPT], env=env, cwd=tmp,
            capture_output=True, timeout=60, check=False, **ids,
        )  # fmt: skip
        if done.returncode != 0 or not _plain_tree(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        if as_user:
            for path in [tmp, *tmp.rglob("*")]:
                os.lchown(path, 0, 0)
        tmp.rename(target)
    except (OSError, subprocess.SubprocessError):
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir():
            return target  # another process made it first
        return None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _plain_tree(root: Path) -> bool:
    """Whether ``root`` holds only folders, symlinks and files with a single link."""
    for path in root.rglob("*"):
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
    return True
