"""IPython extension for sandboxed kernels: the ``%container`` magic.

Loaded automatically in sandboxed kernels; ``%load_ext sandbox_kernel.magics`` also
works, and outside a sandboxed kernel the magic says so and does nothing.
"""

from typing import Any

from .container import ContainerMagics
from .handoff import RestoreHandoff


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%container``. Called by IPython's ``%load_ext`` and ``--ext``."""
    ipython.register_magics(ContainerMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove ``%container`` and its event hook. Called by IPython's ``%unload_ext``."""
    magics = ipython.magics_manager.registry.pop("ContainerMagics", None)
    ipython.magics_manager.magics["line"].pop("container", None)
    if magics is not None and magics.handoff is not None:
        magics.handoff.close()  # unregisters its pre_execute hook
    if magics is not None and magics.autosave is not None:
        magics.autosave.close()


__all__ = [
    "ContainerMagics",
    "RestoreHandoff",
    "load_ipython_extension",
    "unload_ipython_extension",
]
