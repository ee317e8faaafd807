"""Resource limits of a kernel container: parsing, validation and formatting.

Pure logic with no I/O: the CLI, the provisioner's traits and the runtime all parse
limits here, so a bad value gets the same message wherever it is typed.

Units: memory and disk in bytes, CPUs in (possibly fractional) cores, pids as a count.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: The smallest memory limit accepted: an ipykernel needs about 60 MB to start.
MIN_MEMORY = 64 << 20
#: The smallest writable layer accepted.
MIN_DISK = 16 << 20
#: The CFS period runc is given; the quota is ``cpus * CPU_PERIOD``.
CPU_PERIOD = 100_000
#: A kernel and its ZMQ threads need a few dozen pids.
MIN_PIDS = 32


def parse_size(value: str | int, what: str = "memory limit", minimum: int = 1) -> int:
    """Parse a size such as ``2G``, ``512M`` or ``1073741824`` into bytes.

    Raises:
        ConfigError: the value is not a size, or is below ``minimum`` bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(what, value, "is not a size; use a number with K, M or G, e.g. 2G")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(what, value, "is not a size; use a number with K, M or G, e.g. 2G")
        size = int(float(match.group(1)) * _FACTORS[match.group(2).upper()])
    if size < minimum:
        raise ConfigError(
            what, value, f"is too small; use at least {format_size(minimum)}, e.g. 2G"
        )
    return size


def parse_cpus(value: str | float) -> float:
    """Parse a CPU quota in cores, such as ``1.5``.

    Raises:
        ConfigError: the value is not a positive number of at least 0.01 cores.
    """
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        raise ConfigError("cpu limit", value, "is not a number; use cores, e.g. 1.5") from None
    if not math.isfinite(cpus) or cpus < 0.01:
        raise ConfigError("cpu limit", value, "must be at least 0.01 cores; use e.g. 1.5")
    return round(cpus, 3)


def parse_pids(value: str | int) -> int:
    """Parse a limit on the number of processes and threads.

    Raises:
        ConfigError: the value is not a whole number of at least ``MIN_PIDS``.
    """
    try:
        pids = int(value)
    except (TypeError, ValueError):
        raise ConfigError("pids limit", value, "is not a whole number; use e.g. 512") from None
    if pids < MIN_PIDS:
        raise ConfigError("pids limit", value, f"is too small; use at least {MIN_PIDS}, e.g. 512")
    return pids


@dataclass(frozen=True)
class Limits:
    """The limits of one kernel container. None means unlimited.

    Attributes:
        memory: bytes of memory; swap cannot be used beyond it.
        cpus: cores of CPU time per period.
        pids: processes and threads.
        disk: bytes of the kernel's writable layer.
    """

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    disk: int | None = None

    @classmethod
    def parse(
        cls,
        memory: str | int | None = None,
        cpus: str | float | None = None,
        pids: str | int | None = None,
        disk: str | int | None = None,
    ) -> Limits:
        """Build limits from user text; empty or None means unlimited.

        Raises:
            ConfigError: naming the first bad value and its fix.
        """
        return cls(
            memory=None
            if memory is None or memory == ""
            else parse_size(memory, "memory limit", MIN_MEMORY),
            cpus=None if cpus is None or cpus == "" else parse_cpus(cpus),
            pids=None if pids is None or pids == "" else parse_pids(pids),
            disk=None if disk is None or disk == "" else parse_size(disk, "disk size", MIN_DISK),
        )

    def merged(self, other: Limits) -> Limits:
        """These limits with every limit that ``other`` sets replaced."""
        changes = {k: v for k, v in asdict(other).items() if v is not None}
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for JSON state files and the runtime's API."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        """The inverse of :meth:`to_dict`; unknown keys are ignored."""
        return cls(**{k: data.get(k) for k in ("memory", "cpus", "pids", "disk")})

    def describe(self) -> str:
        """One line for people, e.g. ``memory 2G, cpus 1.5, pids 512, disk 5G``."""
        return ", ".join(
            [
                f"memory {format_size(self.memory) if self.memory else 'unlimited'}",
                f"cpus {self.cpus if self.cpus else 'unlimited'}",
                f"pids {self.pids if self.pids else 'unlimited'}",
                f"disk {format_size(self.disk) if self.disk else 'unlimited'}",
            ]
        )
