"""Lookups of the outside world, each a small function that tests can replace.

Where state lives, which runc, which ip and nft. Integration tests use the real ones;
the environment variables exist so an operator can move the state elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sandbox_kernel.errors import RequirementMissing

#: Prefix of every name the runtime gives to host objects: container ids, netns,
#: cgroups. ``gc`` only ever touches names that start with it.
PREFIX = "sk-"


def state_dir() -> Path:
    """Persistent state: layers, images, kernel records. ``$SANDBOX_KERNEL_STATE_DIR``."""
    return Path(os.environ.get("SANDBOX_KERNEL_STATE_DIR", "/var/lib/sandbox-kernel"))


def layers_dir() -> Path:
    """Content-addressed, read-only layers: ``layers/sha256-<hex>/``."""
    return state_dir() / "layers"


def images_dir() -> Path:
    """Image definitions: ``images/<name>.json`` lists an image's layers."""
    return state_dir() / "images"


def kernels_dir() -> Path:
    """One folder per kernel container: its bundle, writable layer, log and record."""
    return state_dir() / "kernels"


def net_dir() -> Path:
    """Address reservations, one file per /30 subnet in use."""
    return state_dir() / "net"


def cgroup_parent() -> str:
    """The cgroup under which every kernel container's cgroup is made."""
    return os.environ.get("SANDBOX_KERNEL_CGROUP_PARENT", "sandbox-kernel")


def container_id(kernel_id: str) -> str:
    """The runc container id (also the netns name) of kernel ``kernel_id``."""
    return f"{PREFIX}{kernel_id}"


def cgroup_of(container_id: str) -> str:
    """A container's cgroup, below the root of each hierarchy."""
    return f"{cgroup_parent()}/{container_id}"


def _require(name: str, fix: str, env: str | None = None) -> str:
    if env and os.environ.get(env):
        return os.environ[env]
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise RequirementMissing(name, fix)
    return found


def runc_binary() -> str:
    """The runc to run containers with: ``$SANDBOX_KERNEL_RUNC`` or runc in PATH."""
    return _require("runc", "apt-get install -y runc", "SANDBOX_KERNEL_RUNC")


#: The container's init: PID 1, it reaps orphaned processes and passes signals on to
#: the kernel. Inside the container it is the host's, through the /usr bind.
TINI = "/usr/bin/tini"


def tini_binary() -> str:
    """The init the kernel runs under (see :data:`TINI`).

    Raises:
        RequirementMissing: tini is not installed.
    """
    if not Path(TINI).exists():
        raise RequirementMissing("tini", "apt-get install -y tini")
    return TINI


def ip_binary() -> str:
    """iproute2's ``ip``."""
    return _require("ip", "apt-get install -y iproute2")


def nsenter_binary() -> str:
    """util-linux's ``nsenter``, to set up the network inside a kernel's namespace."""
    return _require("nsenter", "apt-get install -y util-linux")


def nft_binary() -> str:
    """nftables' ``nft``, for the firewall that keeps kernels apart."""
    return _require("nft", "apt-get install -y nftables")
