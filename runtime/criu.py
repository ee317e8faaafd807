"""Find, install and probe CRIU >= 4.2, which the runtime hands to runc with ``--criu``.

Older CRIU fails on this kind of machine (3.17: vDSO bounds; 4.1: TCP sockets on
kernels >= 6.16), and Debian 12 has no 4.2. :func:`install_criu` therefore unpacks
CRIU and the libraries it needs, glibc included, from Debian's unstable suite into a
private prefix and starts it through that prefix's own loader. The system's apt
state and packages are left alone. See ARCHITECTURE.md, section "CRIU versions".
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandbox_kernel.errors import SandboxError

MIN_VERSION = (4, 2, 0)
SUITE = "unstable"
# The packages named in ARCHITECTURE.md; install_criu adds their dependency closure.
PACKAGES = ("criu", "libcompel1", "libnet9", "libnl-3-200", "libc6")
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_APT_TIMEOUT = 600.0
_TIMEOUT = 120.0
Completed = subprocess.CompletedProcess[str]


class CriuError(SandboxError):
    """CRIU could not be installed; the message says which step failed and why."""


def criu_prefix() -> str:
    """Return the private install prefix (``SANDBOX_KERNEL_CRIU_PREFIX`` or the default)."""
    return os.environ.get("SANDBOX_KERNEL_CRIU_PREFIX", "/opt/sandbox-kernel/criu")


def _capture(cmd: list[str], timeout: float, cwd: Path | None = None) -> Completed:
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def _executable(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def find_criu() -> str | None:
    """Return the CRIU binary the runtime should use, or None if none fits.

    Called by the runtime before it starts runc, and by ``sandbox-kernel doctor``.
    In order: ``SANDBOX_KERNEL_CRIU``; the private prefix's ``criu`` wrapper; the
    ``criu`` in PATH if its version is >= 4.2. The first two are trusted as they are
    once they name an executable file. Raises nothing.
    """
    override = os.environ.get("SANDBOX_KERNEL_CRIU")
    if override and _executable(override):
        return override
    wrapper = str(Path(criu_prefix(), "criu"))
    if _executable(wrapper):
        return wrapper
    system = shutil.which("criu")
    if system is not None and (criu_version(system) or (0, 0, 0)) >= MIN_VERSION:
        return system
    return None


def criu_version(path: str) -> tuple[int, int, int] | None:
    """Return the version ``path --version`` reports ("Version: 4.2.1"), or None.

    Called by :func:`find_criu`, :func:`install_criu` and the doctor. Raises nothing:
    a binary that cannot run or prints no version gives None.
    """
    try:
        result = _capture([path, "--version"], 30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", result.stdout)
    if result.returncode != 0 or match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def criu_check(criu: str) -> tuple[bool, str]:
    """Run ``criu check``; return (passed, its output). Used by install and the doctor.

    Raises nothing: a binary that cannot run gives (False, reason).
    """
    try:
        result = _capture([criu, "check"], _TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"could not run {criu} check: {exc}"
    return result.returncode == 0, (result.stdout + result.stderr).strip()


#: Where CRIU run as root keeps what it learned of the running kernel ("kdat"): the
#: path is fixed in CRIU's build.
KDAT_CACHE = Path("/run/criu.kdat")


def keep_kdat_cache(criu: str, stamp: Path) -> bool:
    """Make sure ``criu`` finds its cache of the running kernel's features; True if
    it is there (or CRIU keeps it itself).

    Without the cache CRIU probes the kernel at every start: about 30 ms of a
    80 ms restore of a small kernel here. CRIU saves the cache only where /run is a
    tmpfs, so that a reboot removes it. Where /run is not one (as on this kind of
    machine), it is made here: ``criu check`` runs once in a private mount
    namespace with a tmpfs on /run, and the file it saves is copied to
    :data:`KDAT_CACHE`. ``stamp`` (a file of the runtime's own) records the boot
    and the CRIU it was made by; another boot or another CRIU makes it again. CRIU
    checks the file's size and magic itself and probes again if they do not fit.

    Raises nothing: without the cache CRIU only starts slower.
    """
    if _run_is_tmpfs() or (criu in _kdat_kept and KDAT_CACHE.is_file()):
        return True
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        wanted = f"{boot} {os.uname().release} {criu}\n"
        if KDAT_CACHE.is_file() and stamp.read_text() == wanted:
            _kdat_kept.add(criu)
            return True
    except OSError:
        pass
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    if unshare is None:
        return False
    script = (
        "mount -t tmpfs -o size=1m,mode=0700 kdat /run && "
        f'{shlex.quote(criu)} check >/dev/null 2>&1; cat "{KDAT_CACHE}"'
    )
    try:
        made = subprocess.run(
            [unshare, "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True, timeout=_TIMEOUT, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    if made.returncode != 0 or not made.stdout:
        return False
    tmp = KDAT_CACHE.with_name(f".sandbox-kernel-kdat.{os.getpid()}")
    try:
        tmp.write_bytes(made.stdout)
        tmp.chmod(0o600)
        tmp.rename(KDAT_CACHE)  # two runtimes at once write the same bytes
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(wanted)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    _kdat_kept.add(criu)
    return True


#: The CRIUs whose cache this process has checked (the boot cannot change under it).
_kdat_kept: set[str] = set()


@functools.lru_cache(maxsize=1)
def _run_is_tmpfs() -> bool:
    return _fs_type(KDAT_CACHE.parent) == "tmpfs"


def _fs_type(path: Path) -> str:
    """The type of the filesystem mounted at ``path`` or above it ("" if unknown)."""
    best, kind = "", ""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        fields = line.split()
        point = fields[1]
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _run(cmd: list[str], what: str, timeout: float = _TIMEOUT, cwd: Path | None = None) -> str:
    """Run ``cmd`` and return its stdout; raise CriuError naming ``what`` on failure."""
    try:
        result = _capture(cmd, timeout, cwd)
    except subprocess.TimeoutExpired as exc:
        raise CriuError(f"{what}: timed out after {timeout:.0f} s: {shlex.join(cmd)}") from exc
    except OSError as exc:
        raise CriuError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise CriuError(f"{what} failed (exit {result.returncode}): {shlex.join(cmd)}\n{tail}")
    return result.stdout


def _source_entries() -> list[dict[str, str]]:
    """Return the machine's apt entries as deb822-style fields (lower-case keys)."""
    entries: list[dict[str, str]] = []
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        for line in path.read_text().splitlines() if path.is_file() else []:
            m = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s+([^#]*)", line)
            if m:
                opts = dict(o.split("=", 1) for o in (m[1] or "").split() if "=" in o)
                fields = dict(zip(("uris", "suites", "components"), m.group(2, 3, 4), strict=True))
                entries.append({"types": "deb", "signed-by": opts.get("signed-by", ""), **fields})
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        text = "\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("#"))
        for stanza in re.split(r"\n\s*\n", text):
            pairs = re.findall(r"^(\S+?):[ \t]*(.*(?:\n[ \t].*)*)", stanza, re.M)
            entries.append({key.lower(): value.strip() for key, value in pairs})
    return entries


def _debian_mirror() -> tuple[str, str]:
    """Return (URI, keyring) of the Debian main archive in the machine's apt sources."""
    release = Path("/etc/os-release")
    m = (
        re.search(r"^VERSION_CODENAME=\"?(\w+)", release.read_text(), re.M)
        if release.is_file()
        else None
    )
    wanted = {"stable", "testing", "unstable", "sid"} | ({m[1]} if m else set())
    for entry in _source_entries():
        if (
            entry.get("enabled", "yes").lower() != "no"
            and "deb" in entry.get("types", "").split()
            and "main" in entry.get("components", "").split()
            and wanted & set(entry.get("suites", "").split())
        ):
            for uri in entry.get("uris", "").split():
                if uri.startswith(("http://", "https://")):
                    keyring = entry.get("signed-by", "")
                    return uri.rstrip("/"), keyring if keyring.startswith("/") else DEFAULT_KEYRING
    raise CriuError(
        f"no Debian main archive (suites {sorted(wanted)}, component main) "
        "found in /etc/apt/sources.list or /etc/apt/sources.list.d"
    )


def _private_apt(work: Path, uri: str, keyring: str, arch: str) -> list[str]:
    """Write a private apt config under ``work``; return the apt options that select it."""
    for sub in ("sources.list.d", "lists/partial", "archives/partial", "cache"):
        (work / sub).mkdir(parents=True)
    (work / "status").touch()
    (work / "sources.list.d" / "criu.sources").write_text(
        f"Types: deb\nURIs: {uri}\nSuites: {SUITE}\nComponents: main\n"
        f"Architectures: {arch}\nSigned-By: {keyring}\n"
    )
    settings = {
        "Dir::Etc::SourceList": work / "sources.list",  # absent: only the private part
        "Dir::Etc::SourceParts": work / "sources.list.d",
        "Dir::Etc::Preferences": work / "preferences",
        "Dir::Etc::PreferencesParts": work / "preferences.d",
        "Dir::State::Lists": work / "lists",
        "Dir::State::status": work / "status",
        "Dir::Cache": work / "cache",
        "Dir::Cache::archives": work / "archives",
        "APT::Sandbox::User": "root",  # the work dir is private (0700): _apt can't write it
    }
    conf = "".join(f'{key} "{value}";\n' for key, value in settings.items())
    # The system's update hooks (PackageKit, AppStream) must not run for this private update.
    conf += "#clear APT::Update::Post-Invoke-Success;\n#clear APT::Update::Post-Invoke;\n"
    (work / "apt.conf").write_text(conf)
    return ["-c", str(work / "apt.conf")]


def _closure(apt: list[str]) -> list[str]:
    """Return PACKAGES plus everything they Depend or Pre-Depend on, in the private lists."""
    skip = ("recommends", "suggests", "conflicts", "breaks", "replaces", "enhances")
    cmd = ["apt-cache", *apt, "depends", "--recurse", *(f"--no-{s}" for s in skip), *PACKAGES]
    out = _run(cmd, "apt-cache depends")
    return sorted({ln.strip() for ln in out.splitlines() if ln[:1] not in ("", " ", "<")})


def install_criu(prefix: str | None = None, progress: Callable[[str], None] = print) -> str:
    """Install CRIU >= 4.2 into a private prefix and return the path of its wrapper.

    Called by ``python -m sandbox_kernel.runtime.criu`` and the CLI's setup step; needs
    root. Does nothing and returns the existing binary when :func:`find_criu` (or, with
    ``prefix`` given, ``<prefix>/criu``) is >= 4.2 and passes ``criu check``. Otherwise
    it fetches ``unstable`` from the machine's Debian mirror into private apt lists,
    downloads PACKAGES and their dependency closure, unpacks them next to the prefix,
    checks that every library resolves inside it, writes the ``criu`` wrapper and only
    then renames the result into place. Raises CriuError when a step fails.
    """
    target = Path(prefix or criu_prefix()).absolute()
    current = find_criu() if prefix is None else str(target / "criu")
    if current and _fits(current):
        progress(f"CRIU at {current} is >= 4.2 and passes criu check: nothing to do")
        return current
    uri, keyring = _debian_mirror()
    arch = _run(["dpkg", "--print-architecture"], "dpkg --print-architecture").strip()
    tmp = _work_folder(target)
    try:
        debs = _download(tmp, uri, keyring, arch, progress)
        root = _unpack(debs, tmp / "root", progress)
        command = _loader_command(root)
        progress("checking that every library CRIU needs is in the prefix")
        _check_libraries(root, command)
        _write_wrapper(root / "criu", command(target))
        version = _run([*command(root), "--version"], "criu --version").strip()
        progress(f"unpacked {version}; moving it into {target}")
        _move_into_place(root, target, tmp / "old")
    except OSError as exc:
        raise CriuError(f"installing CRIU into {target} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    installed = str(target / "criu")
    if (criu_version(installed) or (0, 0, 0)) < MIN_VERSION:
        raise CriuError(f"{installed} does not report a version >= 4.2 after install")
    passed, output = criu_check(installed)
    progress(f"criu check {'passed' if passed else 'FAILED'}: {output}")
    return installed


def _fits(criu: str) -> bool:
    """Whether ``criu`` is an executable CRIU >= 4.2 that passes ``criu check``."""
    return (
        _executable(criu)
        and (criu_version(criu) or (0, 0, 0)) >= MIN_VERSION
        and criu_check(criu)[0]
    )


def _work_folder(target: Path) -> Path:
    """A fresh hidden folder next to ``target`` (so the final rename stays on one
    filesystem). Raises CriuError if it cannot be made."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise CriuError(f"cannot create a work folder next to {target}: {exc}") from exc


def _download(
    tmp: Path, uri: str, keyring: str, arch: str, progress: Callable[[str], None]
) -> Path:
    """Fetch PACKAGES and their closure from ``uri``'s unstable suite through private
    apt lists under ``tmp``; return the folder of the ``.deb`` files.
    Raises CriuError when apt fails."""
    apt = _private_apt(tmp / "apt", uri, keyring, arch)
    progress(f"apt-get update: {uri} {SUITE} main {arch} (private lists)")
    _run(["apt-get", *apt, "update"], "apt-get update", _APT_TIMEOUT)
    packages = _closure(apt)
    progress(f"downloading {len(packages)} packages: {' '.join(packages)}")
    debs = tmp / "debs"
    debs.mkdir()
    _run(["apt-get", *apt, "download", *packages], "apt-get download", _APT_TIMEOUT, debs)
    return debs


def _unpack(debs: Path, root: Path, progress: Callable[[str], None]) -> Path:
    """Unpack every ``.deb`` in ``debs`` into ``root`` (made 0755); return ``root``.
    Raises CriuError when dpkg-deb fails."""
    for deb in sorted(debs.glob("*.deb")):
        progress(f"unpacking {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    root.chmod(0o755)
    return root


def _loader_command(root: Path) -> Callable[[Path], list[str]]:
    """How to start the CRIU unpacked in ``root`` once it sits at a given base: through
    the prefix's own loader, with the prefix's libraries only.
    Raises CriuError when the unpacked packages lack CRIU or a loader."""
    loaders = sorted(root.glob("usr/lib/*/ld-linux*.so.*"))
    if not loaders or not (root / "usr/sbin/criu").is_file():
        raise CriuError(f"unpacked packages lack usr/sbin/criu or a loader in {root}/usr/lib")
    triplet = loaders[0].parent.name

    def command(base: Path) -> list[str]:
        libs = f"{base}/usr/lib/{triplet}:{base}/lib/{triplet}"
        loader = f"{base}/{loaders[0].relative_to(root)}"
        return [loader, "--library-path", libs, f"{base}/usr/sbin/criu"]

    return command


def _check_libraries(root: Path, command: Callable[[Path], list[str]]) -> None:
    """Raise CriuError unless every library CRIU links resolves inside ``root``."""
    listing = _run([*command(root)[:3], "--list", str(root / "usr/sbin/criu")], "loader --list")
    outside = [
        ln.strip()
        for ln in listing.splitlines()
        if "=>" in ln and not ln.split("=>")[1].strip().startswith(f"{root}/")
    ]
    if outside:
        raise CriuError("libraries missing from the prefix:\n" + "\n".join(outside))


def _write_wrapper(wrapper: Path, command: list[str]) -> None:
    """Write the ``criu`` script that execs ``command`` with the caller's arguments."""
    wrapper.write_text(
        f"#!/bin/sh\n# Written by sandbox-kernel's install_criu.\n"
        f'exec {shlex.join(command)} "$@"\n'
    )
    wrapper.chmod(0o755)


def _move_into_place(root: Path, target: Path, old: Path) -> None:
    """Rename ``root`` to ``target``; a previous ``target`` moves to ``old`` first and
    comes back if the rename fails. Raises OSError."""
    if target.exists() or target.is_symlink():
        target.rename(old)
    try:
        root.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)
        raise


def probe_dump(criu: str) -> tuple[bool, str]:
    """Dump a throwaway process with ``criu`` and say how it went; used by the doctor.

    Starts ``sleep`` in its own session with stdio on /dev/null, dumps it (which ends
    it), and returns (True, "dumped N bytes in X s") or (False, the reason with the
    last lines of CRIU's log). The process and the image folder are always removed.
    Raises nothing.
    """
    with tempfile.TemporaryDirectory(prefix="sandbox-kernel-criu-probe-") as images:
        try:
            null = subprocess.DEVNULL
            proc = subprocess.Popen(
                ["sleep", "30"], stdin=null, stdout=null, stderr=null, start_new_session=True
            )
        except OSError as exc:
            return False, f"could not start the probe process: {exc}"
        try:
            start = time.monotonic()
            try:
                dump = [criu, "dump", "-t", str(proc.pid), "-D", images, "-o", "dump.log"]
                result = _capture([*dump, "-v4"], _TIMEOUT)
            except (OSError, subprocess.SubprocessError) as exc:
                return False, f"could not run {criu} dump: {exc}"
            elapsed = time.monotonic() - start
            log = Path(images, "dump.log")
            if result.returncode != 0:
                lines = log.read_text(errors="replace") if log.is_file() else result.stderr
                tail = "\n".join(lines.strip().splitlines()[-8:])
                return False, f"criu dump exited with {result.returncode}:\n{tail}"
            size = sum(p.stat().st_size for p in Path(images).iterdir() if p != log)
            return True, f"dumped {size} bytes in {elapsed:.2f} s"
        finally:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sandbox_kernel.runtime.criu``: install, then report.

    Returns 0 when CRIU is installed and ``criu check`` passes, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description="Install CRIU >= 4.2 into a private prefix.")
    parser.add_argument("--prefix", help=f"install prefix (default: {criu_prefix()})")
    args = parser.parse_args(argv)
    try:
        criu = install_criu(args.prefix)
    except CriuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    version = criu_version(criu) or (0, 0, 0)
    print(f"{criu}: CRIU {'.'.join(map(str, version))}")
    return 0 if criu_check(criu)[0] else 1
