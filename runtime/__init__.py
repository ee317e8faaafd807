"""The runtime: images and layers, OCI bundles, runc, cgroups, network, the store."""

from .lifecycle import KernelConfig
from .limits import Limits
from .record import KernelRecord, Start
from .runtime import Runtime

__all__ = ["KernelConfig", "KernelRecord", "Limits", "Runtime", "Start"]
