"""The runtime: images and layers, OCI bundles, runc, cgroups, network, the store."""

from .limits import Limits
from .runtime import KernelConfig, Runtime

__all__ = ["KernelConfig", "Limits", "Runtime"]
