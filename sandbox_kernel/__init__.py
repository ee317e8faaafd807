"""Jupyter kernels in lightweight, snapshot-capable Linux containers."""

from .errors import SandboxError

__version__ = "0.1.0"

__all__ = ["SandboxError", "__version__"]
