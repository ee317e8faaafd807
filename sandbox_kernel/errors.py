"""The exception root of sandbox-kernel and its subclasses.

Every error the package raises on purpose is a :class:`SandboxError`. Each subclass
carries the fields that explain it (a kernel id, a command, an exit status, stderr)
and builds its own message from them, so callers never format messages by hand.
"""

from __future__ import annotations

from collections.abc import Sequence


class SandboxError(Exception):
    """Root of every error sandbox-kernel raises on purpose."""


class ConfigError(SandboxError, ValueError):
    """A setting or an argument has a value that cannot be used.

    The message names the setting, the bad value and the fix.
    """

    def __init__(self, setting: str, value: object, fix: str) -> None:
        self.setting = setting
        self.value = value
        self.fix = fix
        super().__init__(f"{setting} {value!r} {fix}")


class CommandError(SandboxError):
    """An outside program (runc, ip, nft, mount, criu) failed.

    Attributes:
        argv: the command line that ran.
        returncode: its exit status, or None when it timed out.
        stderr: what it printed on stderr, stripped.
    """

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stderr: str, hint: str = ""
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        self.hint = hint
        status = "timed out" if returncode is None else f"exited with status {returncode}"
        message = f"`{' '.join(self.argv)}` {status}"
        if self.stderr:
            message += f": {self.stderr}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class KernelNotFound(SandboxError, LookupError):
    """No kernel container with this kernel id is known to the runtime."""

    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        super().__init__(
            f"no sandboxed kernel with id {kernel_id!r}; `sandbox-kernel ps` lists the running ones"
        )


class KernelStateError(SandboxError):
    """A kernel container is not in a state that allows the operation."""

    def __init__(self, kernel_id: str, problem: str) -> None:
        self.kernel_id = kernel_id
        self.problem = problem
        super().__init__(f"kernel {kernel_id}: {problem}")


class ImageNotFound(SandboxError, LookupError):
    """The kernelspec names an image the runtime does not have."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = list(known)
        super().__init__(
            f"image {name!r} does not exist; use one of: {', '.join(self.known) or 'host'}"
        )


class RequirementMissing(SandboxError):
    """Something the runtime needs on this machine is missing; the fix is a command."""

    def __init__(self, what: str, fix: str) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} is missing; fix it with: {fix}")


class QuotaError(SandboxError, ValueError):
    """A request would take a user past one of their quotas (the daemon's config).
    Nothing already running or stored is touched.

    Attributes:
        quota: the quota's name in the config, e.g. ``kernels``.
        limit: its value for the user, as people read it.
    """

    def __init__(self, quota: str, limit: str, problem: str) -> None:
        self.quota = quota
        self.limit = limit
        super().__init__(
            f"quota {quota} = {limit}: {problem}; ask the server's operator to raise it"
        )


class DaemonError(SandboxError):
    """The daemon cannot be reached, or answered with something that is no reply."""
