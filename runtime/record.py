"""What one kernel is: the typed record kept in ``kernels/<id>/record.json``.

Only :mod:`~sandbox_kernel.runtime.store` reads and writes the file; everything
else holds a :class:`KernelRecord`. The JSON keeps the field names of earlier
versions, so a server upgraded while kernels run adopts them (see
:meth:`KernelRecord.from_dict`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from .hostpath import Identity, first_use
from .limits import Limits


class Start(enum.Enum):
    """How the kernel's current process was started. The state machine:

    - ``PENDING``: prepared, never started. With a base that fits, every start
      (restarts included) restores the base (``BASE``) or, if that fails, starts
      cold (``COLD``, with the reason in :attr:`KernelRecord.base_note`); without
      one it starts from the image.
    - ``IMAGE``: a cold start of a kernel that has no base.
    - ``BASE``: restored from its base's memory.
    - ``COLD``: a kernel with a base (or one that did not fit) that started without
      it: a base that failed, or is gone.
    """

    PENDING = "pending"
    IMAGE = "image"
    BASE = "base"
    COLD = "cold"


@dataclass
class KernelRecord:
    """One kernel: what it is made of, where it lives, what limits it has.

    Attributes:
        kernel_id, container_id, hostname: the id the kernel was made under (Jupyter's,
            except for a pool kernel: see :attr:`public_id`); runc's id (also the cgroup's
            name); the hostname inside.
        image, layers: the image's name and the read-only layers (ids), lowest last.
        snapshot: the snapshot the files came from (the next snapshot's parent).
        restoring: set while a restore has stopped the old process and the new one
            is not yet running (see ``Snapshotting.finish_restore``).
        executable, python_prefixes, prefix_identities: the kernel's Python and the
            host folders bound read-only, each with its identity at the first start
            (None in a record of a version that kept none, until ``adopt``).
        cwd, cwd_identity, cwd_inside: the host working folder, its identity at the
            first start (the same), and where the kernel sees it (another path for a
            base).
        base, start, base_note: the base snapshot's id, how the process started
            (:class:`Start`) and why not from the base, if so.
        limits, ceiling: the kernel's limits now, and what it may raise them back
            up to (the kernelspec's; only an operator goes above).
        network, index, kernel_ip: ``none`` or ``egress``; the /30 it has; its address.
        uid, gid, user, home: who the kernel runs as.
        created: seconds since the epoch.
        owner: the process that owns the kernel: ``{"pid", "start"}``.
        shm: the size of its /dev/shm (None: its memory limit).
        class_name: the class it belongs to (see ``classes.py``): its starts and
            resets follow the class's current base.
        pristine_cwd: set when the base is a pristine base (see ``pristine.py``):
            the working folder its template ran in, which each restore relocates to
            ``cwd_inside``. Its restarts keep the kernel's files.
        owner_uid: the user the kernel belongs to: who asked the daemon for it, or
            for a root server's kernel (and a record of an earlier version) its uid.
    """

    kernel_id: str
    container_id: str
    hostname: str
    image: str
    layers: list[str]
    executable: str
    python_prefixes: list[str]
    prefix_identities: list[Identity] | None
    cwd: str
    cwd_identity: Identity | None
    cwd_inside: str
    limits: Limits
    ceiling: Limits
    network: str
    index: int
    kernel_ip: str
    uid: int
    gid: int
    user: str
    home: str
    created: float
    owner: dict[str, int]
    base: str | None = None
    start: Start = Start.PENDING
    base_note: str = ""
    snapshot: str | None = None
    restoring: str | None = None
    owner_uid: int | None = None
    shm: int | None = None
    class_name: str | None = None
    pristine_cwd: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def public_id(self) -> str:
        """The id Jupyter knows the kernel by: its own, or for a kernel taken from a
        warm pool (made before Jupyter chose an id) the id it was claimed as."""
        alias = self.extra.get("alias")
        return alias if isinstance(alias, str) and alias else self.kernel_id

    @property
    def pooled(self) -> bool:
        """Whether the kernel waits in a warm pool, claimed by nobody yet."""
        return isinstance(self.extra.get("pool"), dict)

    @property
    def belongs_to(self) -> int:
        """The uid of the user the kernel belongs to (see ``owner_uid``)."""
        return self.uid if self.owner_uid is None else self.owner_uid

    # ---- the start's state machine ------------------------------------------------

    @property
    def wants_base(self) -> bool:
        """Whether the next start restores the base: every start of a kernel that
        has one (a class kernel: restarts land on the base too)."""
        return self.base is not None

    def started_from_base(self) -> None:
        """The base was restored."""
        self.start = Start.BASE
        self.base_note = ""

    def started_cold(self, note: str | None = None) -> None:
        """A cold start; ``note`` says why the base was not used (kept if None)."""
        self.start = Start.COLD if self.base or self.base_note or note else Start.IMAGE
        if note is not None:
            self.base_note = note

    def describe(self) -> str:
        """One line about the kernel for logs: id, image, limits, network."""
        return (
            f"kernel {self.public_id} (image {self.image}, {self.limits.describe()}, "
            f"network {self.network})"
        )

    # ---- JSON ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The record as ``record.json`` holds it."""
        data = {**self.extra}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                data[f.name] = getattr(self, f.name)
        data["limits"] = self.limits.to_dict()
        data["ceiling"] = self.ceiling.to_dict()
        data["cwd_identity"] = self.cwd_identity and self.cwd_identity.to_dict()
        data["prefix_identities"] = self.prefix_identities and [
            i.to_dict() for i in self.prefix_identities
        ]
        data["start"] = self.start.value
        # Read by earlier versions (a server not yet restarted, or a downgrade).
        data["started_from"] = _STARTED_FROM.get(self.start)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelRecord:
        """A record from ``record.json``, including those of earlier versions: their
        ``started_from`` is read as :attr:`start` (and wins where an earlier version
        wrote it last), and identities they lack stay None until :meth:`adopt`
        takes them. Keys this version does not know are kept in :attr:`extra` and
        written back.

        Raises:
            KeyError, TypeError, ValueError: the data is no kernel record.
        """
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["limits"] = Limits.from_dict(data["limits"])
        values["ceiling"] = Limits.from_dict(data.get("ceiling") or data["limits"])
        cwd_identity = data.get("cwd_identity")
        values["cwd_identity"] = Identity.from_dict(cwd_identity) if cwd_identity else None
        prefixes = data.get("prefix_identities")
        values["prefix_identities"] = (
            None if prefixes is None else [Identity.from_dict(i) for i in prefixes]
        )
        values["start"] = _start_of(data)
        values["base_note"] = data.get("base_note") or ""
        values["cwd_inside"] = data.get("cwd_inside") or data["cwd"]
        record = cls(**values)
        record.extra = {k: v for k, v in data.items() if k not in known and k != "started_from"}
        return record

    def adopt(self) -> None:
        """Take the identities of the user's folders if the record has none (one
        written by a version that kept none): from now on they are checked against
        these.

        Raises:
            ConfigError: a folder is gone or is a symlink.
        """
        if self.cwd_identity is None:
            self.cwd_identity = first_use(self.cwd, "working directory")[0]
        if self.prefix_identities is None:
            self.prefix_identities = [
                first_use(p, "Python prefix")[0] for p in self.python_prefixes
            ]


#: What earlier versions wrote as ``started_from`` for each :class:`Start`.
_STARTED_FROM = {Start.BASE: "base", Start.COLD: "cold"}


def _start_of(data: dict[str, Any]) -> Start:
    """:attr:`KernelRecord.start` of a record, whichever version wrote it last."""
    started = data.get("started_from")
    start = Start(data["start"]) if "start" in data else Start.PENDING
    if started == "base" and start is not Start.BASE:
        return Start.BASE  # an earlier version started it since
    if started == "cold" and start is not Start.COLD:
        return Start.COLD
    # No mark: never started, or started from the image (earlier versions set the
    # mark only for kernels with a base). Both start the same way next time.
    return start
