"""CrewAI Flow state in a livingai_tasks store: `LivingAIFlowPersistence`, a FlowPersistence.

Storage: the store's side records (stores.base.KeepsSideRecords: SQLite, PostgreSQL, Redis,
tiered, memory), space "crewai.flows", one group per flow id, two keys:

    "state"   -> {"method": name of the method that completed, "state": the state as JSON}
    "pending" -> {"context": PendingFeedbackContext.to_dict(), "state": ...}  (while a flow
                 waits for human feedback)

Each save replaces the flow's state in one atomic write (a flow resumes from its latest
state; CrewAI's SQLite persistence keeps every version, which nothing reads back). JSON
only: a pydantic state is its JSON dump, a dict state goes through pydantic's JSON encoding
(dates, sets, models); anything else is refused with the path of the value.
"""

from __future__ import annotations

import json
from typing import Any

from crewai.flow.async_feedback.types import PendingFeedbackContext
from crewai.flow.persistence.base import FlowPersistence
from pydantic import BaseModel, Field, PrivateAttr
from pydantic_core import PydanticSerializationError, to_jsonable_python

from ...errors import ConfigError, NotJSONSerializableError
from ...stores.base import KeepsSideRecords
from . import _framework  # noqa: F401  (the missing-extra error)

__all__ = ["LivingAIFlowPersistence", "SPACE"]

SPACE = "crewai.flows"  # the side-records space of every flow's state
_STATE = "state"
_PENDING = "pending"


def _state_json(flow_uuid: str, state: dict[str, Any] | BaseModel) -> Any:
    try:
        if isinstance(state, BaseModel):
            return state.model_dump(mode="json")
        if isinstance(state, dict):
            return to_jsonable_python(state)
    except PydanticSerializationError as exc:
        raise NotJSONSerializableError(
            f"The state of flow {flow_uuid} is not JSON ({exc}); keep JSON values (or "
            "pydantic models of them) in a flow's state.") from exc
    raise ConfigError(f"The state of flow {flow_uuid} must be a dict or a pydantic model, "
                      f"got {type(state).__name__}.")


class LivingAIFlowPersistence(FlowPersistence):
    """CrewAI Flow persistence over a livingai_tasks store (`@persist(persistence)` or
    `MyFlow(persistence=...)`). The store must keep side records (every store of
    livingai_tasks does); run its `migrate()` once first (the SQL stores keep them in the
    `lai_side_records` table)."""

    persistence_type: str = Field(default="LivingAIFlowPersistence")
    _store: KeepsSideRecords = PrivateAttr()

    def __init__(self, store: object, /, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(store, KeepsSideRecords):
            raise ConfigError(
                f"LivingAIFlowPersistence needs a store with side records (KeepsSideRecords: "
                f"side_get, side_put, side_delete, side_groups), got {type(store).__name__}; "
                "the SQL, Redis, tiered and memory stores of livingai_tasks have them.")
        self._store = store

    @property
    def store(self) -> KeepsSideRecords:
        return self._store

    def init_db(self) -> None:
        """Nothing to create here: the store's schema is its own (`migrate()`, run once
        by the deployment, as for every livingai_tasks table)."""

    def save_state(self, flow_uuid: str, method_name: str,
                   state_data: dict[str, Any] | BaseModel) -> None:
        record = {"method": method_name, "state": _state_json(flow_uuid, state_data)}
        self._store.side_put(SPACE, str(flow_uuid), {_STATE: json.dumps(record).encode()})

    def load_state(self, flow_uuid: str) -> dict[str, Any] | None:
        raw = self._store.side_get(SPACE, str(flow_uuid)).get(_STATE)
        if raw is None:
            return None
        state = json.loads(raw)["state"]
        return state if isinstance(state, dict) else None

    def save_pending_feedback(self, flow_uuid: str, context: PendingFeedbackContext,
                              state_data: dict[str, Any] | BaseModel) -> None:
        state = _state_json(flow_uuid, state_data)
        pending = {"context": context.to_dict(), "state": state}
        # The state and the pending feedback in one write: a flow is never found waiting
        # with an older state, nor with the new state and no pending marker.
        self._store.side_put(SPACE, str(flow_uuid), {
            _STATE: json.dumps({"method": context.method_name, "state": state}).encode(),
            _PENDING: json.dumps(pending, default=str).encode()})

    def load_pending_feedback(self, flow_uuid: str
                              ) -> tuple[dict[str, Any], PendingFeedbackContext] | None:
        raw = self._store.side_get(SPACE, str(flow_uuid)).get(_PENDING)
        if raw is None:
            return None
        pending = json.loads(raw)
        return pending["state"], PendingFeedbackContext.from_dict(pending["context"])

    def clear_pending_feedback(self, flow_uuid: str) -> None:
        self._store.side_delete(SPACE, str(flow_uuid), [_PENDING])

    def delete(self, flow_uuid: str) -> None:
        """Forget a flow's state and pending feedback."""
        self._store.side_delete(SPACE, str(flow_uuid))
