"""How the CLI shows records on a terminal: tables, the step tree, one node in full.

Stored strings come from step code (an exception message, a tool's output): every one is
escaped before it reaches the terminal, so none can move the cursor, recolour the screen or
fake a line of the tree.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from ..journal import call_label, is_call, token_totals
from ..nodes import ExecutionNode, Meta, Status

__all__ = ["safe", "table", "render_tree", "node_detail", "as_json", "tokens_line"]

# C0 controls (newline and tab included: a table row is one line), DEL, C1 controls, and
# the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def safe(value: Any) -> str:
    """`value` as text with every control character written as an escape (\\x1b, \\n)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def as_json(data: Any) -> str:
    """JSON for machines; control characters are escaped by JSON itself."""
    return json.dumps(data, indent=2, default=str)


def table(rows: list[list[str]], header: list[str]) -> str:
    rows = [[safe(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value} ms"


def render_tree(nodes: list[ExecutionNode], resolve_hint: str = "") -> list[str]:
    """Nodes as a tree by parent_id, siblings in seq order. An IN_DOUBT node gets a line
    saying how to look at it and decide it (`resolve_hint` names the app to publish on)."""
    ids = {n.id for n in nodes}
    children: dict[str | None, list[ExecutionNode]] = {}
    for n in nodes:
        children.setdefault(n.parent_id if n.parent_id in ids else None, []).append(n)
    lines: list[str] = []

    def walk(parent: str | None, indent: str) -> None:
        kids = children.get(parent, [])
        for i, n in enumerate(kids):
            last = i == len(kids) - 1
            error = f"  {n.error.type}: {n.error.message}" if n.error else ""
            lines.append(safe(
                f"{_label(n)}  {n.status.value}  {_ms(n.latency_ms)}  "
                f"tokens {n.cost_tokens or '-'}  attempt {n.metadata.get(Meta.ATTEMPT, '-')}  "
                f"[{n.id}]{error}"))
            place = f"{n.seq}.{n.metadata.get(Meta.CALL_INDEX)}" if is_call(n) else n.seq
            lines[-1] = f"{indent}{'└─' if last else '├─'} #{place} {n.type.value:<6} " + \
                lines[-1]
            more = indent + ("   " if last else "│  ")
            held_by_call = any(is_call(c) and c.status is Status.IN_DOUBT
                               for c in children.get(n.id, []))
            if n.status is Status.IN_DOUBT and held_by_call:
                lines.append(f"{more}   held by its journaled call below: resolve that call")
            elif n.status is Status.IN_DOUBT:
                lines.append(f"{more}   next: `livingai-tasks show {safe(n.execution_id)} "
                             f"{safe(n.id)}` to see it, then `livingai-tasks resolve "
                             f"{safe(n.execution_id)} {safe(n.id)} {resolve_hint}--done "
                             "'<its output as JSON>'` if it happened, or `--retry` if not")
            if n.status is Status.WAITING:
                lines.append(f"{more}   {_waiting(n, resolve_hint)}")
            walk(n.id, more)

    walk(None, "")
    return lines


def _label(node: ExecutionNode) -> str:
    """A step's task name; a journaled call's name and model; a mailbox entry's event name,
    key and receiver."""
    if is_call(node):
        return call_label(node)
    if Meta.EVENT not in node.metadata:
        return str(node.metadata.get(Meta.TASK, "?"))
    to = node.metadata.get(Meta.CONSUMED_BY)
    return (f"event {node.metadata[Meta.EVENT]} (key {node.metadata.get(Meta.EVENT_KEY)}"
            f"{f', received by {to}' if to else ', not received yet'})")


def _waiting(node: ExecutionNode, hint: str) -> str:
    """What a WAITING node waits for, and the command that ends the wait."""
    wait = node.metadata.get(Meta.WAIT) or {}
    deadline = wait.get("deadline")
    until = (f" until {time.strftime('%F %T', time.gmtime(float(deadline)))} UTC"
             if isinstance(deadline, (int, float)) else "")
    eid, nid = safe(node.execution_id), safe(node.id)
    kind = wait.get("kind")
    if kind == "approval":
        who = ", ".join(map(safe, wait.get("approvers") or [])) or "anyone"
        return (f"waits for approval ({who}){until}: `livingai-tasks approve {eid} {nid} "
                f"{hint}--by NAME` or `deny ... --reason TEXT`")
    if kind == "sleep":
        return f"sleeps{until}: the recovery tick wakes it"
    return (f"waits for event {safe(str(wait.get('name')))!r}{until}: `livingai-tasks send "
            f"{eid} {safe(str(wait.get('name')))} '<payload JSON>' {hint}--key KEY`")


def node_detail(node: ExecutionNode) -> dict[str, Any]:
    """What an operator needs to decide a node: its input, output, error and metadata."""
    data = node.to_dict()
    data["has_checkpoint"] = node.checkpoint is not None
    return data


def tokens_line(nodes: list[ExecutionNode]) -> str:
    """The tokens of an execution's recorded model calls (each call once), or ""."""
    totals = token_totals(nodes)
    if not totals["calls"]:
        return ""
    models = ", ".join(f"{m} {t['total_tokens']}" for m, t in sorted(totals["by_model"].items()))
    return (f"  tokens: {totals['total_tokens']} (input {totals['input_tokens']}, output "
            f"{totals['output_tokens']}) in {totals['calls']} recorded call(s): {models}")
