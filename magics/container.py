"""``%container``: snapshots, restores and limits of the kernel's own container.

The magic parses and prints; the runtime, on the host, does the work through the
control channel. Loaded automatically in sandboxed kernels; elsewhere it says so
and does nothing.
"""

from __future__ import annotations

import functools
import json
import shlex
import time
from html import escape as html_escape
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments

from sandbox_kernel import protocol
from sandbox_kernel.display import (
    DIFF_GROUPS,
    Rich,
    format_size,
    group_diff,
    html_table,
    relative_time,
    table,
    tree_order,
)

from . import progress
from .autosave import Autosave
from .channel import Channel, ChannelError, Interrupted, available
from .handoff import RestoreHandoff
from .progress import View

#: The commands a user types, as ``%container COMMAND``, in the order of the help.
COMMANDS = protocol.COMMANDS
#: A snapshot or restore that takes longer than this many seconds shows a progress bar.
PROGRESS_AFTER = progress.PROGRESS_AFTER
#: Where the runtime leaves news of how the kernel's last process ended (see
#: ``runtime/exits.py``).
NOTICE = Path("/run/sandbox/notice.json")
#: What ``%container help`` prints: each command with one line.
HELP = """\
%container COMMAND: snapshots, restores and limits of this kernel's container.
%container alone opens a panel of the same (ipywidgets; text where widgets do not render).

  snapshot [NAME] [-m MESSAGE]   save the files and the live memory
  restore NAME                   go back to a snapshot, in place
  list                           the snapshots, as a tree of parents
  delete NAME                    delete a snapshot
  reset [--pristine]             back to the class's base (or the image's pristine files)
  class publish|reset|ps NAME    a class: publish it --from SNAPSHOT, reset or list its kernels
  diff [NAME] [--all]            files added, changed, deleted since a snapshot
  limits [--memory M] [--cpus C] [--pids P]   show or change the limits
  autosave [on|off|status]       checkpoint the kernel each time it goes idle after a cell
  history                        the checkpoints: cell, first line, time, bytes added
  undo [N] [--to CELL]           go back to before the last N cells (1), or before CELL
  status                         use against the limits, and the snapshots"""


def trim_heap() -> None:
    """Give the memory the C heap holds free back to the system before a dump.

    Freed memory stays mapped and dirty in the heap (glibc keeps it for later
    allocations, and a freed numpy temporary of a few MB raises its threshold for
    using mmap), so CRIU would save it: pages of garbage in every snapshot, and in
    every child as pages changed. ``malloc_trim(0)`` drops them (``MADV_DONTNEED``);
    what is still allocated is untouched.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _show(rich: Rich) -> None:
    """Display ``rich``: an HTML table where the frontend renders one, else its text."""
    from IPython.display import display

    display(rich)


def _parse(command: str, line: str) -> Any:
    """Parse a command's arguments, with shell quoting ("-m 'a note'").

    Raises:
        UsageError: the arguments do not fit the command.
    """
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise UsageError(f"%container: {err}") from None
    return _parser(command).parse_args(words)


@functools.cache
def _parser(command: str) -> MagicArgumentParser:
    """The argument parser of one ``%container`` command, made on first use (making
    them all at import would slow every kernel's start)."""
    parser = MagicArgumentParser(prog=f"%container {command}", add_help=False)
    if command == "snapshot":
        parser.add_argument("name", nargs="?", help="snapshot name (default: snap-DATE-TIME)")
        parser.add_argument("-m", "--message", default="", help="a note kept with the snapshot")
    elif command in ("restore", "delete"):
        parser.add_argument("name", help="the snapshot's name")
    elif command == "diff":
        parser.add_argument(
            "name", nargs="?", help="compare with this snapshot (default: the latest)"
        )
        parser.add_argument("--all", action="store_true", help="also IPython's own history files")
    elif command == "reset":
        parser.add_argument(
            "--pristine", action="store_true", help="the image's pristine files, even with a base"
        )
    elif command == "class":
        parser.add_argument("action", choices=protocol.CLASS_ACTIONS)
        parser.add_argument("name", nargs="?", help="the class's name")
        parser.add_argument("--from", dest="snapshot", help="publish: the live snapshot")
    elif command == "autosave":
        parser.add_argument("state", nargs="?", choices=("on", "off", "status"), default="status")
    elif command == "undo":
        parser.add_argument("n", nargs="?", type=int, help="how many cells to undo (default 1)")
        parser.add_argument("--to", type=int, metavar="CELL", help="go back to before cell CELL")
    elif command == "limits":
        parser.add_argument("--memory", help="memory limit, e.g. 2G")
        parser.add_argument("--cpus", help="CPU quota in cores, e.g. 1.5")
        parser.add_argument("--pids", help="most processes and threads, e.g. 512")
    return parser


@magics_class
class ContainerMagics(Magics):
    """The ``%container`` line magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.channel = Channel() if available() else None
        #: Carries this process across restores; None outside a sandboxed kernel.
        self.handoff = RestoreHandoff(shell, self.channel) if self.channel is not None else None
        #: Checkpoints when the kernel goes idle; None outside a sandboxed kernel.
        self.autosave: Autosave | None = None
        if self.handoff is not None and self.channel is not None:
            self.handoff.new_kernel_hooks.append(self._warn_of_last_end)
            self.handoff.start()
            self._warn_of_last_end()
            self.autosave = Autosave(shell, self.handoff, self.channel.request)
            self.autosave.start()

    def _warn_of_last_end(self) -> None:
        """If the kernel's last process died (out of memory, a signal), say so before
        the first cell's output: the notebook's stock dialog tells nothing of why."""
        text = last_end_warning(NOTICE)
        shell = self.shell
        if not text or shell is None:
            return

        def warn(*_: Any) -> None:
            import sys

            print(text, file=sys.stderr, flush=True)
            shell.events.unregister("pre_run_cell", warn)

        shell.events.register("pre_run_cell", warn)

    @line_magic
    @magic_arguments()
    @argument("command", choices=COMMANDS, help="what to do")
    @argument("args", nargs="*", help="the command's own arguments (see below)")
    def container(self, line: str) -> None:
        """Snapshot, restore and limit this kernel's container.

        %container                               a panel: gauges, snapshots, limits
        %container help                          the commands, one line each
        %container snapshot [NAME] [-m MESSAGE]  save files and live memory
        %container restore NAME                  go back to a snapshot, in place
        %container list                          the snapshots, with time, size, parent, mode
        %container delete NAME                   delete a snapshot
        %container reset [--pristine]            back to the base, or the image's files
        %container class publish NAME --from SNAPSHOT | reset NAME | ps [NAME]
        %container diff [NAME] [--all]           files added, changed, deleted since a snapshot
        %container limits [--memory M] [--cpus C] [--pids P]   show or change the limits
        %container status                        use against the limits, and snapshots
        %container autosave [on|off|status]      checkpoint the kernel when idle after a cell
        %container history                       the checkpoints, with the cells they follow
        %container undo [N] [--to CELL]          back to before the last N cells, in place
        """
        command, _, rest = line.strip().partition(" ")
        if command == "" and self.channel is not None:
            from .panel import open_panel

            open_panel(self)
            return
        if command in ("", "help", "-h", "--help"):
            print(HELP)
            return
        if command not in COMMANDS:
            raise UsageError(
                f"%container: unknown command {command!r}; use one of {', '.join(COMMANDS)}"
            )
        if self.channel is None:
            print("%container works in sandboxed kernels only; this kernel is not one.")
            return
        getattr(self, f"_{command}")(rest)

    # ---- commands --------------------------------------------------------------

    def _snapshot(self, line: str, view: View | None = None) -> dict[str, Any] | None:
        """``%container snapshot``; the snapshot's meta, or None in a process restored
        from this very snapshot (the restore's cell is then finished). Its progress
        bar goes to ``view`` (the panel's), else to the cell's output."""
        args = _parse("snapshot", line)
        name = args.name or time.strftime("snap-%Y%m%d-%H%M%S")
        print(f"Taking snapshot {name} ...", flush=True)
        assert self.handoff is not None
        trim_heap()
        self.handoff.snapshot_starts()
        # Quick snapshots stay quiet; big ones show a bar, with the step under way.
        bar = (
            progress.Progress(f"Snapshot {name}", view)
            if view is not None
            else progress.displayed(f"Snapshot {name}")
        )
        bar.start()
        try:
            meta: dict[str, Any] = self._call(
                "snapshot", name=name, message=args.message, on_progress=bar.step,
                count=self._count_if_alone(),
            )  # fmt: skip
        except Interrupted:
            # Either the runtime died mid-snapshot, or this process is a restore of
            # the snapshot it was taking: ask which. The bar is the old process's.
            bar.abandon()
            info = self._call("resume")
            if not info:
                raise UsageError(
                    "%container: the runtime went away during the snapshot; "
                    "`%container list` shows whether it was taken"
                ) from None
            self.handoff.finish_restore(info)
            # The restoring request's bar, which its process could not finish.
            progress.finish_handed_over(self.handoff.kernel, info)
            return None
        except BaseException:
            self.handoff.snapshot_ends()
            bar.finish(ok=False)
            raise
        self.handoff.snapshot_ends()
        bar.finish()
        mode = meta["mode"]
        # Saved in the background: `%container list` shows it as saving until then.
        saving = "; writing it to disk in the background" if meta.get("saving") else ""
        if meta.get("copied_from"):
            saving = "; the checkpoint taken after the last cell, kept under this name"
        print(
            f"Snapshot {name}: {mode} ({'files and memory' if mode == 'live' else 'files only'}), "
            f"{meta['seconds']:.2f} s, kernel paused {meta['paused_seconds']:.2f} s, "
            f"memory {format_size(meta['memory_bytes'])}, files {format_size(meta['file_bytes'])}"
            f"{saving}"
        )
        if meta["reason"]:
            print(f"Files only because {meta['reason']}")
        return meta

    def _count_if_alone(self) -> int | None:
        """The next cell's number if the running cell is nothing but one ``%container
        snapshot`` line: right after a checkpoint, nothing ran since, and the runtime
        may name that checkpoint instead of dumping again."""
        assert self.handoff is not None
        try:
            parent, _ = self.handoff.cell_origin()
            code = str(parent.get("content", {}).get("code", "")).strip()
        except (AttributeError, KeyError, TypeError):
            return None
        if "\n" in code or not code.startswith("%container snapshot"):
            return None
        return self.handoff.next_number()

    def _restore(self, line: str, view: View | None = None) -> None:
        """``%container restore``; its progress bar goes to ``view`` (the panel's),
        else to the cell's output, and is finished by the process the restore
        ends in (the request carries it: ``progress``)."""
        args = _parse("restore", line)
        assert self.handoff is not None
        listed = self._call("list")
        metas = {m["name"]: m for m in listed["snapshots"]}
        # One a kernel of this user took on another node of a cluster: fetched first.
        metas.update({m["name"]: m for m in listed.get("shared", []) if m["name"] not in metas})
        if args.name not in metas:
            raise UsageError(
                f"%container restore: no snapshot named {args.name!r}; "
                "`%container list` shows yours"
            )
        parent, idents = self.handoff.cell_origin()
        print(f"Restoring {args.name} ...", flush=True)
        count = self.handoff.next_number()
        # The bar's pace: a restore takes about what the snapshot took.
        expected = float(metas[args.name].get("seconds") or 1.0)
        title = f"Restoring {args.name}"
        self._handed_over(
            "restore", title, expected, view, name=args.name, parent=parent, ident=idents,
            count=count,
        )  # fmt: skip
        # A live restore replaces this process; reaching this line means the runtime
        # restarted the kernel on the snapshot's files instead.
        print(f"Restored the files of {args.name}; the kernel restarts.")

    def _list(self, line: str) -> None:
        listed = self._call("list")
        metas, store = listed["snapshots"], listed["store"]
        usage = (
            f"Your snapshots: {store['count']} of {store['quota_count']}, "
            f"{format_size(store['bytes'])} of {format_size(store['quota_bytes'])}."
        )
        for failed in listed.get("unsaved", []):
            print(f"Snapshot {failed['name']} was not saved: {failed['error']}")
        elsewhere = listed.get("shared", [])
        if elsewhere:
            names = ", ".join(f"{m['name']} ({m['node']})" for m in elsewhere)
            print(f"On other nodes of the cluster (a restore fetches them): {names}")
        if not metas:
            print("No snapshots yet: `%container snapshot NAME` takes one.")
            print(usage)
            return
        _show(snapshot_table(metas, usage, time.time()))

    def _delete(self, line: str) -> None:
        args = _parse("delete", line)
        self._call("delete", name=args.name)
        print(f"Deleted snapshot {args.name}")

    def _reset(self, line: str) -> None:
        args = _parse("reset", line)
        assert self.handoff is not None
        parent, idents = self.handoff.cell_origin()
        where = "the image's pristine files" if args.pristine else "its base, if it has one"
        print(f"Resetting: the kernel restarts on {where}.", flush=True)
        count = self.handoff.next_number()
        self._call(
            "reset", parent=parent, ident=idents, count=count, pristine=bool(args.pristine),
            peers=self.handoff.frontend_peers(),
        )  # fmt: skip

    def _class(self, line: str) -> None:
        args = _parse("class", line)
        if args.action in ("publish", "reset") and not args.name:
            raise UsageError(f"%container class {args.action}: name the class, e.g. intro-2026")
        if args.action == "publish" and not args.snapshot:
            raise UsageError(
                "%container class publish: name the snapshot, e.g. --from lesson-1 "
                "(`%container list` shows yours)"
            )
        done = self._call("class", action=args.action, name=args.name, snapshot=args.snapshot)
        _show(class_view(args.action, args.name, done))

    def _diff(self, line: str) -> None:
        args = _parse("diff", line)
        changes = self._call("diff", name=args.name)
        _show(diff_view(changes, args.all))

    def _limits(self, line: str) -> None:
        args = _parse("limits", line)
        limits = self._call("limits", memory=args.memory, cpus=args.cpus, pids=args.pids)
        rows = [["LIMIT", "VALUE"], *_limit_rows(limits)]
        text = ", ".join(f"{name} {value}" for name, value in rows[1:])
        _show(Rich(text, html_table(rows)))

    def _status(self, line: str) -> None:
        _show(status_view(self._call("status")))

    def _autosave(self, line: str) -> None:
        args = _parse("autosave", line)
        state = self._call("autosave", state=None if args.state == "status" else args.state)
        if self.autosave is not None:
            self.autosave.heard(bool(state["autosave"]))
        text = (
            f"Autosave is {'on' if state['autosave'] else 'off'}: {state['checkpoints']} "
            f"checkpoints kept (the last {state['retain']})."
        )
        if state.get("why_off"):
            text += f" It turned itself off: {state['why_off']}."
        print(text)

    def _history(self, line: str) -> None:
        done = self._call("history")
        rows = [["BEFORE CELL", "AFTER", "TIME", "ADDED"]]
        for c in done["checkpoints"]:
            added = format_size(c["added_bytes"]) + (" (saving)" if c.get("saving") else "")
            rows.append([str(c["next"]), f"[{c['cell']}] {c['line']}",
                         relative_time(c["time"], time.time()), added])  # fmt: skip
        if len(rows) == 1:
            state = "on" if done["autosave"] else "off (`%container autosave on`)"
            print(f"No checkpoints yet; autosave is {state}.")
            return
        text = table(rows)
        _show(Rich(text, html_table(rows)))

    def _undo(self, line: str, view: View | None = None) -> None:
        """``%container undo``; like a restore, its bar goes to ``view`` (the panel's
        timeline), else to the cell's output, and the process it ends in finishes it."""
        args = _parse("undo", line)
        assert self.handoff is not None
        if args.n is not None and args.to is not None:
            raise UsageError("%container undo: give N or --to CELL, not both")
        parent, idents = self.handoff.cell_origin()
        count = self.handoff.next_number()
        print("Undoing ...", flush=True)
        title = f"Back to before cell {args.to}" if args.to is not None else "Undoing"
        self._handed_over(
            "undo", title, 1.0, view, n=args.n, to=args.to, parent=parent, ident=idents,
            count=count,
        )  # fmt: skip
        # A live restore replaces this process; reaching this line means the runtime
        # restarted the kernel on the checkpoint's files instead.
        print("Undone: the files are back; the kernel restarts.")

    # ---- plumbing ----------------------------------------------------------------

    def _handed_over(
        self, op: str, title: str, expected: float, view: View | None, **args: Any
    ) -> None:
        """``op`` (a restore or an undo), with a progress bar in ``view`` (else in the
        cell's output) that the process the operation ends in finishes."""
        assert self.handoff is not None
        bar = (
            progress.Progress(title, view, expected=expected)
            if view is not None
            else progress.displayed(title, expected=expected)
        )
        bar.start()
        try:
            self._call(op, progress=bar.handover(), peers=self.handoff.frontend_peers(), **args)
        except BaseException:
            bar.finish(ok=False)
            raise
        bar.finish()

    def _call(self, op: str, **args: Any) -> Any:
        """Send ``op`` through the channel; the result.

        Raises:
            Interrupted: the connection broke (the process may have been restored).
            UsageError: the runtime refused or failed; its message says why.
        """
        assert self.channel is not None
        try:
            return self.channel.request(op, **args)
        except Interrupted:
            raise
        except ChannelError as err:
            raise UsageError(f"%container {op}: {err}") from None


# ---- views: the same figures as HTML and as text -------------------------------------


def snapshot_table(metas: list[dict[str, Any]], usage: str, now: float) -> Rich:
    """The snapshots as a tree (a child under its parent), with relative times."""
    rows = [["NAME", "TAKEN", "MODE", "MEMORY", "FILES", "MESSAGE"]]
    for depth, m in tree_order(metas):
        name = ("   " * (depth - 1) + "└─ " if depth else "") + m["name"]
        rows.append([
            name, relative_time(m["created"], now),
            f"{m['mode']} (saving)" if m.get("saving") else m["mode"],
            format_size(m["memory_bytes"]), format_size(m["file_bytes"]), m["message"],
        ])  # fmt: skip
    return Rich(f"{table(rows)}\n{usage}", html_table(rows, caption=usage))


def diff_view(changes: dict[str, Any], everything: bool = False) -> Rich:
    """A diff grouped into added, changed and deleted, each sorted."""
    base = changes["since"] or "the kernel's start"
    grouped = group_diff(changes, everything)
    hidden = sum(len(changes.get(k) or []) for k, _ in DIFF_GROUPS) - sum(
        len(v) for v in grouped.values()
    )
    note = f" ({hidden} of IPython's history files hidden; --all shows them)" if hidden else ""
    counts = ", ".join(f"{len(grouped[k])} {k}" for k, _ in DIFF_GROUPS)
    if not any(grouped.values()):
        text = f"No changes since {base}{note}."
        return Rich(text, f"<p>{html_escape(text)}</p>")
    head = f"Changes since {base}: {counts}{note}."
    lines = [head]
    rows = [["", "PATH"]]
    for key, mark in DIFF_GROUPS:
        for path in grouped[key]:
            lines.append(f"{mark} {path}")
            rows.append([key, path])
    return Rich("\n".join(lines), html_table(rows, caption=head))


def _cores(cpus: float | None) -> str:
    if not cpus:
        return "unlimited"
    return f"{cpus:g} core" + ("" if cpus == 1 else "s")


def _limit_rows(limits: dict[str, Any]) -> list[list[str]]:
    memory = format_size(limits["memory"]) if limits["memory"] else "unlimited"
    cpus = _cores(limits["cpus"])
    pids = str(limits["pids"]) if limits["pids"] else "unlimited"
    return [["memory", memory], ["cpus", cpus], ["pids", pids]]


def status_view(status: dict[str, Any]) -> Rich:
    """Use against the limits in one unit style per row, and where the files came from."""
    use, limits = status["usage"] or {}, status["limits"]

    def share(used: float | None, limit: float | None) -> str:
        if used is None or not limit:
            return ""
        return f"{used / limit:.0%}"

    cpu = use.get("cpu_seconds")
    rows = [["", "IN USE", "LIMIT", "SHARE"]]
    rows.append(["memory", format_size(use.get("memory")),
                 format_size(limits["memory"]) if limits["memory"] else "unlimited",
                 share(use.get("memory"), limits["memory"])])  # fmt: skip
    rows.append(["cpu", f"{cpu:.1f} s of CPU time" if cpu is not None else "-",
                 _cores(limits["cpus"]), ""])  # fmt: skip
    rows.append(["pids", str(use.get("pids", "-")), str(limits["pids"] or "unlimited"),
                 share(use.get("pids"), limits["pids"])])  # fmt: skip
    origin = (
        f"Latest snapshot taken or restored: {status['current']}."
        if status["current"] else "No snapshot taken or restored yet."
    )  # fmt: skip
    foot = (
        f"{status['snapshots']} snapshots, {format_size(status['snapshot_bytes'])}. {origin}"
        + _last_exit_line(status.get("last_exit"), time.time())
    )
    return Rich(f"{table(rows)}\n{foot}", html_table(rows, caption=foot))


def last_end_warning(notice: Path) -> str:
    """The warning for the news in ``notice``, or "" when there is none."""
    try:
        last = json.loads(notice.read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(last, dict) or not last.get("text"):
        return ""
    return f"Warning: the previous kernel process ended: {last['text']}"


def _last_exit_line(last: dict[str, Any] | None, now: float) -> str:
    if not last:
        return ""
    when = relative_time(float(last.get("time", now)), now)
    if last.get("reason") == "oom":
        limit = format_size(last.get("limit")) if last.get("limit") else "unlimited"
        return f" Last end: out of memory (limit {limit}), {when}."
    return f" Last end: killed by {last.get('signal')}, {when}."


def class_view(action: str, name: str | None, done: Any) -> Rich:
    """What ``%container class ACTION`` answered, as a line or a table."""
    if action == "publish":
        again = "; running kernels keep their base until reset" if done["replaced"] else ""
        text = (
            f"Published class {done['name']}: base {done['base']} from snapshot "
            f"{done['snapshot']}, kernelspec {done['kernelspec']} ({done['display_name']}){again}."
        )
        return Rich(text, f"<p>{html_escape(text)}</p>")
    if action == "reset":
        rows = [["KERNEL", "USER", "RESET TO", "NOTE"]]
        rows += [[r["kernel_id"][:8], r["user"], r["to"] or "failed", r["error"]] for r in done]
        caption = f"Class {name}: {len(done)} kernels reset."
    elif name:
        rows = [["KERNEL", "USER", "STARTED", "BASE", "MEMORY"]]
        for k in done["kernels"]:
            base = (k["base"] or "-") + ("" if k["current"] or not k["base"] else " (earlier)")
            rows.append([k["kernel_id"][:8], k["user"], k["start"], base,
                         format_size(k["memory_bytes"])])  # fmt: skip
        caption = f"Class {name}: base {done['class']['base']}, {len(rows) - 1} kernels."
    else:
        rows = [["CLASS", "KERNELSPEC", "BASE", "KERNELS"]]
        rows += [
            [c["name"], c["kernelspec"], c["base"], str(c["kernels"])] for c in done["classes"]
        ]
        caption = f"{len(rows) - 1} classes."
    if len(rows) == 1:
        return Rich(caption, f"<p>{html_escape(caption)}</p>")
    return Rich(f"{table(rows)}\n{caption}", html_table(rows, caption=caption))
