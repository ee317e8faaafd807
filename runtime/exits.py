"""Why a kernel's process ended, and the notice its next process shows the user.

The kernel runs under tini with ``-v``, which writes to the kernel's log how its
child ended: ``Main child exited with signal (with signal 'Bus error')``. With the
memory cgroup's OOM count, that tells an OOM kill (SIGKILL from the OOM killer), a
crash in native code (SIGSEGV, SIGBUS, SIGABRT, ...) and a signal from outside
apart. The runtime keeps the last one in the kernel's record, and the next start of
the kernel puts a notice in its run folder (``/run/sandbox/notice.json`` inside),
which the ``%container`` extension shows before the first cell's output.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

from sandbox_kernel.display import format_size

#: tini's line for a child killed by a signal.
_SIGNALLED = re.compile(r"Main child exited with signal \(with signal '([^']+)'\)")
#: tini's line when it starts the kernel: what comes after it is this process's.
_SPAWNED = "Spawned child process"
#: The same line, written by the runtime when it brings a dead kernel back from a
#: checkpoint (``timetravel.py``): the process after it is a new one.
SPAWNED = _SPAWNED
#: The notice's file in the kernel's run folder.
NOTICE = "notice.json"

_DESCRIPTIONS = {signal.strsignal(s) or "": s for s in signal.Signals}


def signal_in_log(tail: str) -> signal.Signals | None:
    """The signal that ended the kernel's last process, from the end of its log;
    None if it exited by itself (or the log does not say)."""
    last = tail.rfind(_SPAWNED)
    found = _SIGNALLED.findall(tail[last:] if last >= 0 else tail)
    if not found:
        return None
    return _DESCRIPTIONS.get(found[-1])


def describe(oom: bool, sig: signal.Signals | None, memory: int | None) -> dict[str, Any] | None:
    """The record of how the kernel ended (``last_exit``), with the message for
    the user; None for an exit by itself or one that was asked for."""
    limit = format_size(memory) if memory else "unlimited"
    if oom:
        text = (
            f"The kernel ran out of memory: it used its whole memory limit ({limit}) and "
            "the OOM killer ended it. Everything in its memory was lost; its files are "
            "kept. Use less memory, or raise the limit: `%container limits --memory ...` "
            "in this kernel, `sandbox-kernel limits KERNEL_ID --memory ...` as its "
            "operator, or `sandbox-kernel install --memory ...` for its kernelspec."
        )
        return {"reason": "oom", "signal": "SIGKILL", "limit": memory, "text": text,
                "time": time.time()}  # fmt: skip
    if sig is None:
        return None
    what = signal.strsignal(sig) or sig.name
    text = (
        f"The kernel was killed by signal {sig.name} ({what}). Everything in its memory "
        "was lost; its files are kept. Its log (`sandbox-kernel logs KERNEL_ID`) has "
        "what it printed last."
    )
    if sig in (signal.SIGBUS, signal.SIGSEGV, signal.SIGABRT, signal.SIGILL, signal.SIGFPE):
        text += " A crash in native code (an extension module) does this."
    return {"reason": "signal", "signal": sig.name, "limit": memory, "text": text,
            "time": time.time()}  # fmt: skip
