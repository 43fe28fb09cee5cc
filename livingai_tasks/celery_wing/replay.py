"""ReplaySession: run a recorded execution again through Celery, under a new execution id.

    FULL            every step again, from the first step's recorded input
    FROM_NODE       from one step on, with its recorded input
    MOCK_TOOLS      every step again, but tools and other non-idempotent steps return
                    their recorded outputs
    COUNTERFACTUAL  from one step on, with a new input for that step

The original record is never modified: a replay is a new execution whose metadata links
it to the original (`replay_of`, `replay_mode`). Replay rebuilds a chain, so it covers
linear executions (one step per seq); a group or chord is refused with a clear error.
FULL and FROM_NODE would run non-idempotent tools (charge a card again): they refuse to
unless `allow_side_effects=True`; MOCK_TOOLS is the safe way to re-run the reasoning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from celery import Celery, chain, signature

from ..errors import ConfigError, ReplayError
from ..journal import is_call
from ..mailbox import steps_only
from ..nodes import ExecutionNode, Meta, NodeType
from ..stores import Store
from .install import Run, start
from .tasks import RECORDED_TASK

__all__ = ["ReplayMode", "ReplaySession", "ReplayError", "NodeDiff"]


class ReplayMode(str, Enum):
    FULL = "FULL"
    FROM_NODE = "FROM_NODE"
    MOCK_TOOLS = "MOCK_TOOLS"
    COUNTERFACTUAL = "COUNTERFACTUAL"


@dataclass(frozen=True)
class NodeDiff:
    seq: int
    task: str
    original_output: Any
    replayed_output: Any
    status: str  # "same", "changed", "missing" (not in the replay) or "new"

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "task": self.task, "status": self.status,
                "original_output": self.original_output,
                "replayed_output": self.replayed_output}


class ReplaySession:
    def __init__(self, app: Celery, store: Store) -> None:
        self.app = app
        self.store = store

    def _linear_nodes(self, execution_id: str) -> list[ExecutionNode]:
        nodes = _steps(self.store.nodes(execution_id))  # events and calls are not steps
        if not nodes:
            raise ReplayError(f"No recorded steps for execution {execution_id!r}.")
        seqs = [n.seq for n in nodes]
        if len(set(seqs)) != len(seqs):
            raise ReplayError(f"Execution {execution_id} ran steps in parallel (a group or "
                              "chord): replay rebuilds linear chains only.")
        return nodes

    def start(self, execution_id: str, mode: ReplayMode | str, *, node_id: str | None = None,
              new_input: Any = None, allow_side_effects: bool = False) -> Run:
        """Publish the replay and return its Run (a new execution id)."""
        try:
            mode = ReplayMode(str(mode).upper())
        except ValueError:
            raise ConfigError(f"Unknown replay mode {mode!r}. Accepted: "
                              f"{', '.join(m.value for m in ReplayMode)}.") from None
        nodes = self._linear_nodes(execution_id)
        first = 0
        if mode in (ReplayMode.FROM_NODE, ReplayMode.COUNTERFACTUAL):
            if node_id is None:
                raise ConfigError(f"Replay mode {mode.value} needs a node id (--node).")
            ids = [n.id for n in nodes]
            if node_id not in ids:
                raise ReplayError(f"No node {node_id!r} in execution {execution_id!r}.")
            first = ids.index(node_id)
        elif node_id is not None:
            raise ConfigError(f"Replay mode {mode.value} takes no node id.")
        if mode is ReplayMode.COUNTERFACTUAL:
            new_input = _as_input(new_input)
        elif new_input is not None:
            raise ConfigError("Only COUNTERFACTUAL takes a new input.")
        todo = nodes[first:]
        if mode is not ReplayMode.MOCK_TOOLS and not allow_side_effects:
            risky = [n for n in todo if not n.is_idempotent()]
            if risky:
                names = ", ".join(str(n.metadata.get(Meta.TASK)) for n in risky)
                raise ReplayError(f"Replaying would run non-idempotent tool step(s) {names} "
                                  "again (real side effects). Use --mode MOCK_TOOLS, or pass "
                                  "allow_side_effects=True / --allow-side-effects.")
        canvas = chain(*(self._signature(n, i == 0, mode, new_input if i == 0 else None)
                         for i, n in enumerate(todo)))
        return start(canvas, metadata={Meta.REPLAY_OF: execution_id,
                                       Meta.REPLAY_MODE: mode.value,
                                       Meta.REPLAY_FROM: todo[0].id})

    def _signature(self, node: ExecutionNode, head: bool, mode: ReplayMode,
                   new_input: dict[str, Any] | None) -> Any:
        recorded = node.input if isinstance(node.input, dict) else {}
        args = list(recorded.get("args", []))
        kwargs = dict(recorded.get("kwargs", {}))
        if new_input is not None:
            args, kwargs = new_input["args"], new_input["kwargs"]
        elif not head:
            args = args[1:]  # in a chain, the previous step's output comes first
        if mode is ReplayMode.MOCK_TOOLS and _mocked(node):
            return signature(RECORDED_TASK, args=args if head else (),
                             kwargs={"output": node.output}, app=self.app)
        task = str(node.metadata.get(Meta.TASK) or "")
        if task not in self.app.tasks:
            raise ReplayError(f"Step task {task!r} of node {node.id} is not registered in "
                              f"app {self.app.main!r}: import the module that defines it.")
        return signature(task, args=args, kwargs=kwargs, app=self.app)

    def diff(self, original_id: str, replay_id: str) -> list[NodeDiff]:
        """Per step (matched by position): same or changed output."""
        original = _steps(self.store.nodes(original_id))
        replayed = _steps(self.store.nodes(replay_id))
        execution = self.store.get_execution(replay_id)
        start_id = (execution.metadata.get(Meta.REPLAY_FROM) if execution else None)
        offset = next((i for i, n in enumerate(original) if n.id == start_id), 0)
        out = []
        for i, node in enumerate(original[offset:]):
            other = replayed[i] if i < len(replayed) else None
            task = str(node.metadata.get(Meta.TASK))
            if other is None:
                out.append(NodeDiff(node.seq, task, node.output, None, "missing"))
            else:
                same = _canonical(node.output) == _canonical(other.output)
                out.append(NodeDiff(node.seq, task, node.output, other.output,
                                    "same" if same else "changed"))
        for other in replayed[len(original) - offset:]:
            out.append(NodeDiff(other.seq, str(other.metadata.get(Meta.TASK)), None, other.output,
                                "new"))
        return out


def _steps(nodes: list[ExecutionNode]) -> list[ExecutionNode]:
    """The steps, without the mailbox's events and the steps' journaled calls: a replayed
    step makes its calls again (live; MOCK_TOOLS does not serve recorded call results yet)."""
    return [n for n in steps_only(nodes) if not is_call(n)]


def _mocked(node: ExecutionNode) -> bool:
    """MOCK_TOOLS serves a recorded output in place of every tool, and of every other step
    with a side effect (a non-idempotent agent step that sends an email is one too)."""
    return node.type is NodeType.TOOL or not node.is_idempotent()


def _canonical(value: Any) -> str:
    """JSON with sorted keys: two outputs are the same whatever order their keys came in."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _as_input(value: Any) -> dict[str, Any]:
    """A counterfactual input: {"args": [...], "kwargs": {...}}, or a bare list of args."""
    if isinstance(value, list):
        return {"args": value, "kwargs": {}}
    if isinstance(value, dict) and set(value) <= {"args", "kwargs"} and value:
        args, kwargs = value.get("args", []), value.get("kwargs", {})
        if isinstance(args, list) and isinstance(kwargs, dict):
            return {"args": args, "kwargs": kwargs}
    raise ConfigError(
        f"A counterfactual input must be a JSON list of positional arguments, or an object "
        f'{{"args": [...], "kwargs": {{...}}}}; got {value!r}.'
    )
