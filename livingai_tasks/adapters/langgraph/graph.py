"""LangGraph graphs run inside a livingai step, each node a journaled call (`lai.call`).

`durable_graph(builder)` compiles a copy of a StateGraph whose node callables are rewritten
(as Temporal's LangGraph plugin rewrites them into activities): each node runs as a journaled
call of the running step, named "langgraph:<node>", with the node's own metadata saying how:

    builder.add_node("agent", call_model, metadata={"kind": "model"})        # idempotent
    builder.add_node("refund", refund, metadata={"idempotent": False})       # the default

A re-run of the step after a crash re-runs the graph from its input: finished nodes return
their recorded updates without running, the node the worker died in runs again if it is
idempotent, and a non-idempotent one holds the step IN_DOUBT (resolve or reconcile), never
running twice. `run_graph(graph, input)` is how a step runs it; it maps `interrupt()` onto
the step's durable waits (see its docstring).

A node's update is recorded as LangGraph's serializer writes it (msgpack, base64 in the
JSON), with the same never-unpickle, allowlisted settings as LivingAISaver; a model node
(kind="model") also records its token usage and model name, read from the AIMessages it
returns (usage_metadata, response_metadata["model_name"]), so `show`/`stats` count them once.

Determinism: the journal matches calls by order, so nodes must run one at a time in an
order the graph fixes. run_graph runs a graph with max_concurrency=1: the branches of a
super-step run one after another in LangGraph's task order (each in LangGraph's worker
thread, with the step's context carried there). Sync graphs only (`invoke`); a coroutine
node is refused by lai.call.
"""

from __future__ import annotations

import base64
import contextvars
import copy
import dataclasses
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph, StateGraph
from langgraph.types import Command

from ...celery_wing import context as step_context
from ...celery_wing.journal import call
from ...celery_wing.waits import wait_for
from ...errors import ConfigError
from . import _framework  # noqa: F401  (the missing-extra error)
from .saver import safe_serializer

__all__ = ["durable_graph", "run_graph", "NODE_KEYS", "INTERRUPT_EVENT"]

NODE_KEYS = ("idempotent", "kind", "model")  # the node metadata this adapter reads
INTERRUPT_EVENT = "langgraph-interrupt"  # the event name a paused graph waits for
_KINDS = ("model", "tool", "memory")
# The running step's context, for nodes LangGraph runs in its worker thread: contextvars
# follow LangGraph's submit() (it copies the context), thread-locals do not.
_STEP: contextvars.ContextVar[Any] = contextvars.ContextVar("livingai_langgraph_step",
                                                            default=None)


@dataclasses.dataclass
class _Codec:
    """Encodes node updates with the compiled graph's allowlisted serializer (set once the
    graph is compiled: LangGraph derives the allowlist from its state schemas then)."""

    serde: Any = dataclasses.field(default_factory=safe_serializer)

    def encode(self, value: Any) -> list[str]:
        kind, data = self.serde.dumps_typed(value)
        return [kind, base64.b64encode(data).decode("ascii")]

    def decode(self, packed: list[str]) -> Any:
        return self.serde.loads_typed((packed[0], base64.b64decode(packed[1])))


def _options(name: str, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    found = {k: v for k, v in (metadata or {}).items() if k in NODE_KEYS}
    kind = found.get("kind", "tool")
    if kind not in _KINDS:
        raise ConfigError(f"LangGraph node {name!r}: metadata kind={kind!r} is not one of "
                          f"{_KINDS}")
    idempotent = found.get("idempotent", kind == "model")
    if not isinstance(idempotent, bool):
        raise ConfigError(f"LangGraph node {name!r}: metadata idempotent must be True or "
                          f"False, got {idempotent!r}")
    return {"kind": kind, "idempotent": idempotent, "model": found.get("model")}


def _messages(update: Any) -> list[AIMessage]:
    values = update.values() if isinstance(update, Mapping) else \
        [getattr(update, "update", None)] if isinstance(update, Command) else []
    found: list[AIMessage] = []
    for value in values:
        if isinstance(value, Mapping):
            found += _messages(value)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, AIMessage):
                found.append(item)
    return found


def _usage(messages: list[AIMessage]) -> dict[str, int] | None:
    counted: list[Mapping[str, Any]] = [m.usage_metadata for m in messages if m.usage_metadata]
    if not counted:
        return None
    return {key: sum(int(u.get(key) or 0) for u in counted)
            for key in ("input_tokens", "output_tokens", "total_tokens")}


def _journaled(name: str, runnable: Any, options: dict[str, Any], codec: _Codec
               ) -> Callable[[Any, RunnableConfig], Any]:
    def run_node(state: Any, config: RunnableConfig) -> dict[str, Any]:
        update = runnable.invoke(state, config)
        record: dict[str, Any] = {"update": codec.encode(update)}
        if options["kind"] == "model":
            messages = _messages(update)
            record["usage"] = _usage(messages)
            record["model"] = options["model"] or next(
                (m.response_metadata.get("model_name") for m in messages
                 if m.response_metadata.get("model_name")), None)
        return record

    def node(state: Any, config: RunnableConfig) -> Any:
        ctx = _STEP.get()
        own = step_context.local.step
        if ctx is not None and own is None:
            step_context.local.step = ctx  # LangGraph's worker thread: the step's context
        try:
            record = call(run_node, state, config, name=f"langgraph:{name}",
                          kind=options["kind"], idempotent=options["idempotent"],
                          model=options["model"])
        finally:
            if ctx is not None and own is None:
                step_context.local.step = None
        return codec.decode(record["update"])

    return node


def durable_graph(builder: StateGraph[Any, Any, Any, Any], **compile_kwargs: Any
                  ) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile a copy of `builder` whose nodes run as journaled calls (the builder itself
    is left as it was). Node metadata: `kind` ("tool" default, "model", "memory"),
    `idempotent` (default True for a model node, False otherwise), `model` (a model
    node's model name, else read from its AIMessages). A checkpointer is given unless
    `compile_kwargs` has one: an in-process InMemorySaver, which is what interrupt() needs
    within one run; durability comes from the journal, not from it."""
    codec = _Codec()
    rewritten = copy.copy(builder)
    rewritten.nodes = {
        name: dataclasses.replace(spec, runnable=RunnableLambda(
            _journaled(name, spec.runnable, _options(name, spec.metadata), codec), name=name))
        for name, spec in builder.nodes.items()}
    compile_kwargs.setdefault("checkpointer", InMemorySaver(serde=safe_serializer()))
    graph = rewritten.compile(**compile_kwargs)
    saver = graph.checkpointer
    if saver is not None and not isinstance(saver, bool):
        codec.serde = saver.serde  # the allowlist LangGraph derived from the state schemas
    return graph


def run_graph(graph: CompiledStateGraph[Any, Any, Any, Any], input: Any,
              config: RunnableConfig | None = None, *, wait_name: str = INTERRUPT_EVENT
              ) -> Any:
    """Run a graph from `durable_graph` inside the running step and return its output.

    Interrupts: when a node calls `interrupt(value)`, the graph pauses and the step waits
    durably (`lai.wait_for(wait_name)`: its worker is freed). Resume it with
    `lai.send(execution_id, wait_name, answer)`: the step runs again from its start, its
    recorded nodes replay, and the interrupted node runs again with `interrupt()` returning
    `answer` (as LangGraph re-runs an interrupted node from its start). One interrupt at a
    time: the k-th interrupt of a run receives the k-th event. Only in idempotent steps
    (@lai.agent_step), as every wait."""
    run_config: dict[str, Any] = dict(config or {})
    configurable = dict(run_config.get("configurable") or {})
    ctx = step_context.local.step
    # The in-process checkpointer's thread: this step's own, so that two runs in one
    # process never meet, and dropped at the end (the journal is what lasts).
    thread = configurable.setdefault(
        "thread_id", f"livingai:{ctx.node.id if ctx is not None else uuid.uuid4()}")
    run_config["configurable"] = configurable
    run_config["max_concurrency"] = 1  # one node at a time, in LangGraph's order (see above)
    settings = RunnableConfig(**run_config)  # type: ignore[typeddict-item]
    token = _STEP.set(ctx)
    try:
        result = graph.invoke(input, settings)
        while graph.checkpointer is not None and graph.get_state(settings).interrupts:
            result = graph.invoke(Command(resume=wait_for(wait_name)), settings)
        return result
    finally:
        _STEP.reset(token)
        saver = graph.checkpointer
        if saver is not None and not isinstance(saver, bool) and \
                thread.startswith("livingai:"):
            saver.delete_thread(thread)
