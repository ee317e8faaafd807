"""One helper that runs notebook code in a sandboxed kernel and returns what it printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cell:
    """What one executed cell produced."""

    status: str
    stdout: str = ""
    stderr: str = ""
    ename: str = ""
    evalue: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    count: int | None = None  # the reply's execution count

    def check(self) -> str:
        """The cell's stdout; fail loudly if the cell raised."""
        assert self.status == "ok", f"cell failed: {self.ename}: {self.evalue}\n{self.stderr}"
        return self.stdout


async def run_cell(kc: Any, code: str, timeout: float = 60) -> Cell:
    """Execute ``code`` as a notebook cell through the kernel client ``kc``."""
    cell = Cell(status="")

    def hook(msg: dict[str, Any]) -> None:
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                cell.stdout += content["text"]
            else:
                cell.stderr += content["text"]
        elif kind == "display_data":
            # Rich output's text form (the magic's tables), where text is shown.
            cell.stdout += content["data"].get("text/plain", "") + "\n"
        elif kind == "error":
            cell.ename, cell.evalue = content["ename"], content["evalue"]
        if kind in ("stream", "error", "execute_result", "display_data", "update_display_data"):
            cell.outputs.append(msg)

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    cell.status = reply["content"]["status"]
    cell.count = reply["content"].get("execution_count")
    if cell.status == "error" and not cell.ename:
        cell.ename = reply["content"].get("ename", "")
        cell.evalue = reply["content"].get("evalue", "")
    return cell
