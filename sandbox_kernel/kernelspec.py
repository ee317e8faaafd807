"""Writing kernelspecs that select the sandbox provisioner."""

from __future__ import annotations

import re
import sys
import tempfile
from typing import Any

from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager

from .display import format_size
from .errors import ConfigError
from .runtime.layers import check_image_name
from .runtime.limits import Limits
from .runtime.network import check_mode

PROVISIONER_NAME = "sandbox-provisioner"
# ASCII only, and whole names (fullmatch): with IGNORECASE alone, [a-z] also takes
# the Kelvin sign and the long s.
_NAME_RE = re.compile(r"[a-z0-9._-]+", re.IGNORECASE | re.ASCII)


def provisioner_config(image: str, limits: Limits, network: str) -> dict[str, Any]:
    """The ``metadata.kernel_provisioner.config`` for these settings (validated).

    Raises:
        ConfigError, ImageNotFound: a value cannot be used.
    """
    config: dict[str, Any] = {"image": check_image_name(image), "network": check_mode(network)}
    config["memory"] = format_size(limits.memory) if limits.memory else ""
    config["cpus"] = limits.cpus if limits.cpus else ""
    config["pids"] = limits.pids if limits.pids else ""
    config["disk"] = format_size(limits.disk) if limits.disk else ""
    return config


def install(
    name: str,
    display_name: str | None,
    config: dict[str, Any],
    user: bool = False,
    prefix: str | None = None,
) -> str:
    """Install kernelspec ``name`` running this Python's ipykernel in a sandbox.

    ``prefix`` installs under ``PREFIX/share/jupyter/kernels`` (``--sys-prefix``
    passes ``sys.prefix``), ``user`` into the user's Jupyter data folder, neither
    system-wide. Returns the folder written.

    Raises:
        ConfigError: the name is not a valid kernelspec name.
    """
    if not _NAME_RE.fullmatch(name):
        raise ConfigError("kernel name", name, "is not valid; use letters, digits, '.', '-', '_'")
    overrides = {
        "display_name": display_name or f"Python {sys.version_info[0]} (sandbox)",
        "metadata": {
            "debugger": True,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
        },
    }
    with tempfile.TemporaryDirectory(prefix="sandbox-kernelspec-") as tmp:
        spec_dir = write_kernel_spec(f"{tmp}/{name}", overrides=overrides)
        return str(
            KernelSpecManager().install_kernel_spec(
                spec_dir, kernel_name=name, user=user, prefix=prefix
            )
        )


def same_display_name(name: str, display_name: str) -> list[str]:
    """The other kernelspecs this Jupyter sees whose display name is ``display_name``:
    the launcher would show identical cards."""
    found = []
    for other, info in KernelSpecManager().get_all_specs().items():
        if other != name and info.get("spec", {}).get("display_name") == display_name:
            found.append(other)
    return sorted(found)
