"""The runtime: images and layers, OCI bundles, runc, cgroups, network, the store.

Its main names load at their first use: a process that needs one module (a
kernel's job on its node, say) does not pay for importing all of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lifecycle import KernelConfig
    from .limits import Limits
    from .record import KernelRecord, Start
    from .runtime import Runtime

__all__ = ["KernelConfig", "KernelRecord", "Limits", "Runtime", "Start"]

_WHERE = {"KernelConfig": "lifecycle", "Limits": "limits", "KernelRecord": "record",
          "Start": "record", "Runtime": "runtime"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
