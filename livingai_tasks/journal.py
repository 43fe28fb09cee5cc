"""Journaled calls inside a step: the pure part (no Celery, no I/O).

A step that makes many calls (model requests, tool calls) records each as a child node of
the step, keyed by its order within the step. When the step runs again after a crash, a
call already recorded returns its recorded result instead of running, the first call with
no record runs live, and a non-idempotent call whose start is on record but not its end is
of unknown outcome: the step is held IN_DOUBT, as a tool step is.

This module decides what a call does given its record (`decide_call`, a table like the
step's entry decision in celery_wing/lifecycle.py), builds the call's node versions, reads
token usage, and sums tokens for `show` and `stats`. celery_wing/journal.py runs it.

Why order, and a name beside it: a re-run must hand each call the result of the same call
in the first run. Order alone would hand a changed program the wrong result silently; the
name is checked so that a call made in another order than recorded fails the step instead.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import ConfigError
from .nodes import ExecutionNode, Meta, NodeType, Status, utcnow

__all__ = ["CallSpec", "CallDecision", "decide_call", "call_node_id", "is_call",
           "running_call", "usage_of", "token_totals", "call_label", "KINDS"]

# What a call may be, and the node type it is recorded as.
KINDS: dict[str, NodeType] = {"model": NodeType.PROMPT, "tool": NodeType.TOOL,
                              "memory": NodeType.MEMORY}
# A fixed namespace: a call's node id is a function of its step's id and its order, so a
# re-run of the step (in any process) finds the record of its n-th call without a search.
_NAMESPACE = uuid.UUID("6b1d2a4e-52f3-4c39-9a49-0c3e1f7d9a21")
# Who resolved a call stays on its next attempt's record; the resolution itself does not.
_CARRIED = (Meta.RESOLVED_BY, Meta.RESOLVED_AT)


def call_node_id(step_id: str, index: int) -> str:
    """The node id of the `index`-th call (from 0) of step `step_id`."""
    return str(uuid.uuid5(_NAMESPACE, f"{step_id}/{index}"))


def is_call(node: ExecutionNode) -> bool:
    """A journaled call's node (a child of a step), not a step: recovery, replay and the
    step tree treat them apart."""
    return Meta.CALL_OF in node.metadata


def default_name(fn: Callable[..., Any]) -> str:
    target = getattr(fn, "func", fn)  # a functools.partial names its function
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


@dataclass(frozen=True)
class CallSpec:
    """How one call is journaled: its name (checked on replay), kind, whether it is safe to
    run twice, the model it asks, how to read its token usage, and how to ask the outside
    world whether a non-idempotent call's effect happened."""

    name: str
    kind: str = "tool"
    idempotent: bool = False
    model: str | None = None
    usage: Callable[[Any], Any] | None = None
    reconcile: Callable[..., Any] | None = None

    @classmethod
    def of(cls, fn: Callable[..., Any], *, name: str | None = None, kind: str = "tool",
           idempotent: bool | None = None, model: str | None = None,
           usage: Callable[[Any], Any] | None = None,
           reconcile: Callable[..., Any] | None = None, awaitable: bool = False) -> CallSpec:
        """Checked; `idempotent` defaults to True for a model call, False for the others
        (a tool may have an effect: it must say when running it twice is safe).
        `awaitable`: `fn` is awaited (acall), so a coroutine function is accepted."""
        if not callable(fn):
            raise ConfigError(f"livingai_tasks.call() takes a callable first, got {fn!r}.")
        if not awaitable and inspect.iscoroutinefunction(getattr(fn, "func", fn)):
            raise ConfigError(f"{fn!r} is a coroutine function: livingai_tasks.call() journals "
                              "synchronous calls (a step body is synchronous); call it through "
                              "a synchronous wrapper, e.g. lambda: asyncio.run(fn(...)).")
        if kind not in KINDS:
            raise ConfigError(f"kind={kind!r}: accepted kinds are {sorted(KINDS)}.")
        if idempotent is None:
            idempotent = kind == "model"
        if not isinstance(idempotent, bool):
            raise ConfigError(f"idempotent must be True or False, got {idempotent!r}.")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(f"name must be a non-empty string, got {name!r}.")
        if model is not None and not isinstance(model, str):
            raise ConfigError(f"model must be a string (the model's name), got {model!r}.")
        for what, hook in (("usage", usage), ("reconcile", reconcile)):
            if hook is not None and not callable(hook):
                raise ConfigError(f"{what} must be a callable, got {hook!r}.")
        return cls(name or default_name(fn), kind, idempotent, model, usage, reconcile)


class CallDecision(str, Enum):
    RUN = "RUN"  # no record, or one that did not succeed and may run again: call it live
    REPLAY = "REPLAY"  # recorded SUCCESS: return its recorded result, do not call
    RECONCILE = "RECONCILE"  # outcome unknown, the call's reconcile callback decides
    IN_DOUBT = "IN_DOUBT"  # outcome unknown and no way to tell: hold the step
    MISMATCH = "MISMATCH"  # another call is recorded at this place: fail the step


def decide_call(recorded: ExecutionNode | None, *, name: str, index: int,
                reconcilable: bool) -> tuple[CallDecision, str]:
    """What the `index`-th call of a step, made under `name`, does given the latest record
    at its place (None: there is none)."""
    if recorded is None:
        return CallDecision.RUN, ""
    was = recorded.metadata.get(Meta.CALL_NAME)
    if not is_call(recorded) or was != name or recorded.metadata.get(Meta.CALL_INDEX) != index:
        return CallDecision.MISMATCH, (
            f"call #{index} of step {recorded.metadata.get(Meta.CALL_OF, '?')} is {name!r} in "
            f"this run, but the record at that place is {was!r} (node {recorded.id}): the "
            "step's calls came in another order than recorded (its code changed, or its "
            "calls depend on something not recorded, such as the time or a random number). "
            "The step fails rather than return another call's result; start a new execution "
            "for the changed code")
    status = recorded.status
    if status in (Status.SUCCESS, Status.SKIPPED):
        return CallDecision.REPLAY, "recorded: its result is returned"
    if status is Status.IN_DOUBT and recorded.metadata.get(Meta.RESOLUTION) == "retry":
        return CallDecision.RUN, "an operator chose to run it again"
    unknown = status is Status.IN_DOUBT or (
        status in (Status.RUNNING, Status.CRASHED) and not recorded.is_idempotent())
    if unknown:
        why = (f"non-idempotent call #{index} {name!r} ({recorded.id}) started in attempt "
               f"{recorded.metadata.get(Meta.ATTEMPT)} and its worker died before it "
               "finished: its effect may or may not have happened")
        if status is Status.IN_DOUBT:
            why = str(recorded.metadata.get(Meta.IN_DOUBT_REASON) or why)
        return (CallDecision.RECONCILE if reconcilable else CallDecision.IN_DOUBT), why
    return CallDecision.RUN, ""  # FAILED, or an idempotent call that never finished


def running_call(step: ExecutionNode, index: int, spec: CallSpec, *, fence: int, owner: str,
                 worker: str, input: Any, previous: ExecutionNode | None) -> ExecutionNode:
    """The RUNNING version of a call about to run live (a new attempt of `previous`)."""
    attempt = int(previous.metadata.get(Meta.ATTEMPT, 0)) + 1 if previous else 1
    carried = {k: v for k, v in (previous.metadata if previous else {}).items()
               if k in _CARRIED}
    metadata: dict[str, Any] = {
        Meta.CALL_OF: step.id, Meta.CALL_INDEX: index, Meta.CALL_NAME: spec.name,
        Meta.CALL_KIND: spec.kind, Meta.IDEMPOTENT: spec.idempotent, Meta.ATTEMPT: attempt,
        Meta.RECONCILABLE: spec.reconcile is not None, Meta.FENCE: fence, Meta.OWNER: owner,
        Meta.WORKER: worker, **carried}
    if spec.model is not None:
        metadata[Meta.MODEL] = spec.model
    return ExecutionNode(
        id=call_node_id(step.id, index), execution_id=step.execution_id, parent_id=step.id,
        seq=step.seq, type=KINDS[spec.kind], status=Status.RUNNING,
        created_at=previous.created_at if previous else utcnow(), input=input,
        metadata=metadata)


# -- token usage ----------------------------------------------------------------------------

# The names providers give the three counts (OpenAI's chat and responses APIs, Anthropic,
# Pydantic AI, LangChain's usage_metadata), first match wins.
_INPUT = ("input_tokens", "prompt_tokens", "request_tokens", "input")
_OUTPUT = ("output_tokens", "completion_tokens", "response_tokens", "output")
_TOTAL = ("total_tokens", "total")


def _field(found: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = found.get(name) if isinstance(found, Mapping) else getattr(found, name, None)
        if value is not None:
            return value
    return None


def usage_of(found: Any, *, what: str) -> dict[str, int] | None:
    """Token usage as {"input_tokens", "output_tokens", "total_tokens"} from a mapping or
    an object with those counts (under the names providers use), or None for None. A total
    missing is input + output. ConfigError for anything else: a usage that cannot be read
    would be counted wrong, silently."""
    if found is None:
        return None
    counts = {"input_tokens": _field(found, _INPUT), "output_tokens": _field(found, _OUTPUT),
              "total_tokens": _field(found, _TOTAL)}
    if all(v is None for v in counts.values()):
        raise ConfigError(
            f"{what}: no token counts in {found!r}. Accepted: a mapping or object with "
            "input_tokens/prompt_tokens, output_tokens/completion_tokens and optionally "
            "total_tokens.")
    for key, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ConfigError(f"{what}: {key} must be an int >= 0, got {value!r}.")
    if counts["total_tokens"] is None:
        counts["total_tokens"] = (counts["input_tokens"] or 0) + (counts["output_tokens"] or 0)
    return {k: int(v or 0) for k, v in counts.items()}


def usage_in_result(result: Any) -> Any:
    """Where a model call's result usually keeps its usage: result["usage"] (a provider's
    JSON) or result.usage; None if neither."""
    if isinstance(result, Mapping):
        return result.get("usage")
    return getattr(result, "usage", None)


def model_in_result(result: Any) -> str | None:
    found = result.get("model") if isinstance(result, Mapping) else None
    return found if isinstance(found, str) else None


def token_totals(nodes: list[ExecutionNode]) -> dict[str, Any]:
    """Tokens of an execution's recorded calls, from the latest version of each node (as
    Store.nodes() gives them): a call replayed by a re-run writes no new node, so it counts
    once. Per model too; calls with no usage recorded are not counted."""
    total = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "calls": 0}
    by_model: dict[str, dict[str, int]] = {}
    for node in nodes:
        usage = node.metadata.get(Meta.USAGE)
        if not is_call(node) or not isinstance(usage, dict):
            continue
        model = str(node.metadata.get(Meta.MODEL) or "?")
        per = by_model.setdefault(model, {"input_tokens": 0, "output_tokens": 0,
                                          "total_tokens": 0, "calls": 0})
        for bucket in (total, per):
            bucket["calls"] += 1
            for key in ("input_tokens", "output_tokens", "total_tokens"):
                bucket[key] += int(usage.get(key) or 0)
    return {**total, "by_model": by_model}


def call_label(node: ExecutionNode) -> str:
    """How the step tree names a call: its name and model (its place is #seq.order)."""
    model = node.metadata.get(Meta.MODEL)
    return f"{node.metadata.get(Meta.CALL_NAME)}" + (f" ({model})" if model else "")
