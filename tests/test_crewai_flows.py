"""LivingAIFlowPersistence (CrewAI Flow state in our stores) on SQLite and a real PostgreSQL
server: the FlowPersistence interface round trip, a `@persist` flow whose state a new flow
instance restores by its id, pending human feedback, and JSON only (no pickle)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from .tools import import_crewai_or_skip

import_crewai_or_skip()  # before anything imports CrewAI (its telemetry off first)

from crewai.flow.async_feedback.types import PendingFeedbackContext  # noqa: E402
from crewai.flow.flow import Flow, listen, start  # noqa: E402
from crewai.flow.persistence import persist  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from livingai_tasks import ConfigError, NotJSONSerializableError  # noqa: E402
from livingai_tasks.adapters.crewai import SPACE, LivingAIFlowPersistence  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:crewai.*")
KINDS = ["sqlite", "postgres"]


class Counted(BaseModel):
    id: str = ""
    steps: list[str] = []
    total: int = 0


@pytest.fixture
def migrated(store: Any) -> Any:
    store.migrate()
    return store


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_the_interface_round_trips_json_state(migrated: Any) -> None:
    persistence = LivingAIFlowPersistence(migrated)
    persistence.init_db()
    assert persistence.load_state("f1") is None
    persistence.save_state("f1", "first", {"n": 1, "at": dt.date(2026, 12, 3), "tags": {"a"}})
    persistence.save_state("f1", "second", Counted(id="f1", steps=["a"], total=2))
    assert persistence.load_state("f1") == {"id": "f1", "steps": ["a"], "total": 2}
    persistence.save_state("f2", "first", {"n": 7})
    assert persistence.load_state("f2") == {"n": 7}
    # what the store keeps is JSON, readable by anyone
    record = json.loads(migrated.side_get(SPACE, "f1")["state"])
    assert record == {"method": "second", "state": {"id": "f1", "steps": ["a"], "total": 2}}
    persistence.delete("f1")
    assert persistence.load_state("f1") is None and persistence.load_state("f2") == {"n": 7}


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_a_persisted_flow_is_restored_by_its_id(migrated: Any) -> None:
    persistence = LivingAIFlowPersistence(migrated)

    @persist(persistence)
    class Tally(Flow[Counted]):
        @start()
        def first(self) -> None:
            self.state.steps.append("first")
            self.state.total += 1

        @listen(first)
        def second(self) -> int:
            self.state.steps.append("second")
            self.state.total += 10
            return self.state.total

    flow = Tally()
    assert flow.kickoff() == 11
    flow_id = flow.state.id
    assert persistence.load_state(flow_id) == {"id": flow_id, "steps": ["first", "second"],
                                               "total": 11}
    again = Tally()  # another process would build it the same way
    assert again.kickoff(inputs={"id": flow_id}) == 22  # went on from the stored state
    assert again.state.steps == ["first", "second", "first", "second"]


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_pending_feedback_is_kept_with_its_state_and_cleared(migrated: Any) -> None:
    persistence = LivingAIFlowPersistence(migrated)
    context = PendingFeedbackContext(flow_id="f9", flow_class="tests.Review",
                                     method_name="review", method_output="draft v1",
                                     message="Approve the draft?")
    persistence.save_pending_feedback("f9", context, {"id": "f9", "draft": "v1"})
    state, loaded = persistence.load_pending_feedback("f9")
    assert state == {"id": "f9", "draft": "v1"} and persistence.load_state("f9") == state
    assert loaded.to_dict() == context.to_dict()
    persistence.clear_pending_feedback("f9")
    assert persistence.load_pending_feedback("f9") is None
    assert persistence.load_state("f9") == state


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_state_that_is_not_json_is_refused(migrated: Any) -> None:
    persistence = LivingAIFlowPersistence(migrated)
    with pytest.raises(NotJSONSerializableError, match="flow f3"):
        persistence.save_state("f3", "m", {"client": object()})
    with pytest.raises(ConfigError, match="dict or a pydantic model"):
        persistence.save_state("f3", "m", ["not", "a", "state"])  # type: ignore[arg-type]
    assert persistence.load_state("f3") is None


def test_a_store_without_side_records_is_refused() -> None:
    with pytest.raises(ConfigError, match="side records"):
        LivingAIFlowPersistence(object())
