"""Per-user quotas and the daemon's config file (``/etc/sandbox-kernel/daemon.toml``).

Example::

    admin_group = "sandbox-admins"   # sees and acts on every user's kernels
    teacher_group = "teachers"       # may publish classes (root and admins may too)

    [quota]                          # everyone's, unless overridden below
    kernels = 4                      # kernels running at once
    memory_total = "8G"              # the sum of their memory limits
    memory = "4G"                    # the most one kernel may ask for ...
    cpus = 2                         # ... and its cpus, pids and disk
    pids = 1024
    disk = "20G"
    snapshot_bytes = "20G"           # what their snapshots may take
    snapshots = 100                  # and how many they may keep

    [groups.students]                # members of a group: beats the defaults, up
    kernels = 2                      # or down (of several groups, the largest wins)

    [users.alice]                    # one user (by name or uid): beats groups
    memory_total = "32G"

A value of ``"unlimited"`` lifts a quota. Root is never held to quotas. Beyond one,
a request is refused with one line naming the quota and its value; nothing running
or stored is touched.
"""

from __future__ import annotations

import dataclasses
import grp
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox_kernel.display import format_size
from sandbox_kernel.errors import ConfigError, QuotaError

from . import snapshots
from .callers import Caller
from .limits import Limits, parse_size
from .ports import DEFAULT_SOCKET

#: Where the daemon reads its config unless told otherwise.
DEFAULT_CONFIG = Path("/etc/sandbox-kernel/daemon.toml")
#: Where the daemon listens unless its config or command line says otherwise.
_SIZES = ("memory_total", "memory", "disk", "snapshot_bytes")
_COUNTS = ("kernels", "pids", "snapshots")


@dataclass(frozen=True)
class Quota:
    """One user's quotas; None is unlimited."""

    kernels: int | None = None
    memory_total: int | None = None
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    disk: int | None = None
    snapshot_bytes: int | None = None
    snapshots: int | None = None

    @staticmethod
    def parse(table: Mapping[str, Any], where: str) -> dict[str, int | float | None]:
        """The quotas a config table sets (only those it names).

        Raises:
            ConfigError: an unknown key, or a value that is no size or number.
        """
        known = {f.name for f in dataclasses.fields(Quota)}
        values: dict[str, int | float | None] = {}
        for key, value in table.items():
            what = f"{where}.{key}"
            if key not in known:
                raise ConfigError(what, value, f"is not a quota; use one of {', '.join(known)}")
            if value == "unlimited":
                values[key] = None
            elif key in _SIZES:
                values[key] = parse_size(value, what)
            elif key == "cpus":
                values[key] = _number(value, what, float)
            else:
                values[key] = _number(value, what, int)
        return values

    def show(self, key: str) -> str:
        value = getattr(self, key)
        if value is None:
            return "unlimited"
        return format_size(int(value)) if key in _SIZES else f"{value:g}"


def _number(value: object, what: str, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(what, value, "is not a number of 0 or more; write e.g. 4")
    if kind is int and not float(value).is_integer():
        raise ConfigError(what, value, "is not a whole number; write e.g. 4")
    return int(value) if kind is int else float(value)


@dataclass
class DaemonConfig:
    """What ``daemon.toml`` says; every key has a default, and no file is fine."""

    socket: str = DEFAULT_SOCKET
    admin_group: str = ""
    #: Members may publish classes (kernelspecs every user sees); root and admins may.
    teacher_group: str = ""
    defaults: dict[str, int | float | None] = field(default_factory=dict)
    users: dict[str, dict[str, int | float | None]] = field(default_factory=dict)
    groups: dict[str, dict[str, int | float | None]] = field(default_factory=dict)
    #: Seconds between the daemon's own sweeps for what dead servers left (0: never).
    gc_interval: float = 600.0

    @classmethod
    def load(cls, path: Path | None) -> DaemonConfig:
        """Read ``path`` (default :data:`DEFAULT_CONFIG`; a missing default is fine).

        Raises:
            ConfigError: the file cannot be read or holds a bad value.
        """
        given = path is not None
        path = path or DEFAULT_CONFIG
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            if given:
                raise ConfigError("daemon config", str(path), "does not exist") from None
            return cls()
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError("daemon config", str(path), f"cannot be read: {err}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "daemon.toml") -> DaemonConfig:
        """The config a parsed TOML document gives. Raises ConfigError."""
        config = cls()
        for key, value in data.items():
            if key in ("socket", "admin_group", "teacher_group"):
                if not isinstance(value, str):
                    raise ConfigError(f"{where}: {key}", value, "must be a string")
                setattr(config, key, value)
            elif key == "gc_interval":
                config.gc_interval = float(_number(value, f"{where}: {key}", float))
            elif key == "quota":
                config.defaults = Quota.parse(_table(value, key, where), f"{where}: quota")
            elif key in ("users", "groups"):
                tables = _table(value, key, where)
                parsed = {
                    str(name): Quota.parse(
                        _table(t, f"{key}.{name}", where), f"{where}: {key}.{name}"
                    )
                    for name, t in tables.items()
                }
                setattr(config, key, parsed)
            else:
                raise ConfigError(
                    f"{where}: {key}", value,
                    "is not a setting; use socket, admin_group, teacher_group, gc_interval, quota, "
                    "users, groups",
                )  # fmt: skip
        if not config.socket.startswith("/"):
            raise ConfigError(f"{where}: socket", config.socket, "must be an absolute path")
        return config

    def is_admin(self, caller: Caller) -> bool:
        """Root, or a member of the admin group: sees and acts on everything."""
        return caller.is_root or bool(self.admin_group and caller.in_group(self.admin_group))

    def may_teach(self, caller: Caller) -> bool:
        """Root, an admin, or a member of the teacher group: may publish classes."""
        group = self.teacher_group
        return self.is_admin(caller) or bool(group and caller.in_group(group))

    def quota_for(self, caller: Caller) -> Quota:
        """``caller``'s quotas: the defaults, overridden by their groups' (of several
        groups, the largest value; unlimited beats any), overridden by their own
        entry. Root's: none."""
        if caller.is_root:
            return Quota()
        size, count = snapshots.quota()  # the store's own, unless the config says
        values: dict[str, int | float | None] = {"snapshot_bytes": size, "snapshots": count}
        values.update(self.defaults)
        from_groups: dict[str, int | float | None] = {}
        for name, table in self.groups.items():
            if not _in_group(caller, name):
                continue
            for key, value in table.items():
                if key not in from_groups:
                    from_groups[key] = value
                else:
                    from_groups[key] = _larger(from_groups[key], value)
        values.update(from_groups)
        for name in (caller.name, str(caller.uid)):
            values.update(self.users.get(name, {}))
        return Quota(**values)  # type: ignore[arg-type]


def _table(value: object, key: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key}", value, "must be a table, e.g. [quota]")
    return value


def _in_group(caller: Caller, name: str) -> bool:
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        return name.isdigit() and int(name) in (caller.gid, *caller.groups)
    return gid in (caller.gid, *caller.groups)


def _larger(a: int | float | None, b: int | float | None) -> int | float | None:
    if a is None or b is None:
        return None
    return max(a, b)


# ---- the checks ------------------------------------------------------------------------


def check_kernel(quota: Quota, limits: Limits, running: Iterable[Limits]) -> None:
    """Refuse one more kernel with ``limits`` beside the user's ``running`` ones.

    Raises:
        QuotaError: naming the quota and its value.
    """
    running = list(running)
    if quota.kernels is not None and len(running) + 1 > quota.kernels:
        raise QuotaError(
            "kernels", quota.show("kernels"),
            f"you have {len(running)} kernels running; shut one down first",
        )  # fmt: skip
    check_limits(quota, limits, running)


def check_limits(quota: Quota, limits: Limits, others: Iterable[Limits]) -> None:
    """Refuse ``limits`` for one kernel of a user whose other kernels have ``others``.

    Raises:
        QuotaError: naming the quota and its value.
    """
    for key in ("memory", "cpus", "pids", "disk"):
        top, wanted = getattr(quota, key), getattr(limits, key)
        if top is None:
            continue
        if wanted is None:
            raise QuotaError(
                key, quota.show(key), f"a kernel may not have an unlimited {key}; set one"
            )
        if wanted > top:
            shown = format_size(int(wanted)) if key in ("memory", "disk") else f"{wanted:g}"
            raise QuotaError(key, quota.show(key), f"a kernel asked for {key} {shown}")
    if quota.memory_total is not None:
        if limits.memory is None:
            raise QuotaError(
                "memory_total", quota.show("memory_total"),
                "a kernel may not have an unlimited memory; set one",
            )  # fmt: skip
        used = 0
        for other in others:
            used += other.memory if other.memory is not None else quota.memory_total
        if used + limits.memory > quota.memory_total:
            raise QuotaError(
                "memory_total", quota.show("memory_total"),
                f"your kernels' memory limits would add up to {format_size(used + limits.memory)}",
            )  # fmt: skip
