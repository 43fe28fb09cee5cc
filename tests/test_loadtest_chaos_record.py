"""Reading a chaos run back (loadtest/chaos/record.py), as pure logic over a hand-made record:
what a SIGSTOP caught, which duplicate calls count against the target, and which
checkpoints were lost."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from livingai_tasks import (
    Codec,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    Status,
    encode,
)
from loadtest.chaos.record import Kill, RunData, analyse

T0 = 1_800_000_000.0  # the stop, in epoch seconds


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _version(node_id: str, status: Status, pid: int, attempt: int, *, fence: int = 0,
             done: float | None = None, recovered: bool = False) -> ExecutionNode:
    metadata: dict[str, Any] = {"task": "lt.lai.act", "attempt": attempt, "fence": fence,
                                "owner": f"host:{pid}", "idempotent": False}
    if recovered:
        metadata["recovered_at"] = _at(T0 + 16).isoformat()
    return ExecutionNode(execution_id="e1", type=NodeType.TOOL, id=node_id, seq=3,
                         status=status, metadata=metadata,
                         completed_at=_at(done) if done else None,
                         latency_ms=300 if done else None)


def _data(starts: list[dict[str, Any]], versions: list[ExecutionNode], **extra: Any) -> RunData:
    return RunData(
        kills=[Kill(T0, "stop", "w1", [100, 101], until=T0 + 21)], run_of={"e1": "run-1"},
        executions={"e1": Execution(id="e1", status=ExecutionStatus.COMPLETED)},
        versions={"e1": [versions]}, starts=starts, reconciles=[],
        done={"run-1": T0 + 30}, effects=extra.pop("effects", {"k1": 1}),
        effect_run=extra.pop("effect_run", {"k1": "run-1"}), **extra)


def test_a_stop_catches_a_step_its_process_had_begun_and_times_the_resume() -> None:
    # Two RUNNING versions of one attempt (the second a checkpoint): one step hit, once.
    history = [_version("n1", Status.RUNNING, 101, 1),
               _version("n1", Status.RUNNING, 101, 1),
               _version("n1", Status.CRASHED, 101, 1, fence=1, recovered=True),
               _version("n1", Status.RUNNING, 202, 2, fence=1),
               _version("n1", Status.SUCCESS, 202, 2, fence=1, done=T0 + 18)]
    starts = [{"task_id": "n1", "step": "act", "pid": 101, "t": T0 - 0.5},
              {"task_id": "n1", "step": "act", "pid": 202, "t": T0 + 16.5}]
    resumes = analyse(_data(starts, history))["resumes"]
    [hit] = resumes["hits"]
    assert hit["kill_mode"] == "stop" and hit["resumed_s"] == 16.5
    assert resumes["resume_stop"]["p99_s"] == 16.5


def test_a_step_the_paused_process_began_after_its_sigcont_was_not_caught() -> None:
    history = [_version("n1", Status.RUNNING, 101, 1),
               _version("n1", Status.SUCCESS, 101, 1, done=T0 + 23)]
    starts = [{"task_id": "n1", "step": "act", "pid": 101, "t": T0 + 22}]
    resumes = analyse(_data(starts, history))["resumes"]
    assert resumes["hits"] == [] and resumes["steps_in_flight_at_a_kill"] == 0


def test_the_same_key_twice_is_reported_apart_from_a_run_charged_under_two_keys() -> None:
    history = [_version("n1", Status.SUCCESS, 101, 1, done=T0 - 5)]
    same_key = analyse(_data([], history, effects={"k1": 2}))["side_effects"]
    assert same_key["same_key_repeats"] == 1 and same_key["distinct_key_duplicates"] == 0
    two_keys = analyse(_data([], history, effects={"k1": 1, "k2": 1},
                             effect_run={"k1": "run-1", "k2": "run-1"}))["side_effects"]
    assert two_keys["same_key_repeats"] == 0 and two_keys["distinct_key_duplicates"] == 1


def test_a_checkpoint_whose_marker_is_in_no_stored_version_is_a_record_lost() -> None:
    def checkpoint(marker: str) -> ExecutionNode:
        node = _version("n1", Status.RUNNING, 101, 1)
        return node.evolve(checkpoint=encode(json.dumps({"ck": marker}).encode(), Codec.ZLIB))

    stored = [_version("n1", Status.RUNNING, 101, 1), checkpoint("a"),
              _version("n1", Status.SUCCESS, 101, 1, done=T0 - 5)]
    notes = [{"ck": m, "held_ms": h, "durable": False, "eid": "e1", "t": T0, "pid": 101}
             for m, h in (("a", 3.0), ("b", 41.5))]
    metrics = {"101": {"counters": {"checkpoint_budget_overruns": 2},
                       "histograms": {"checkpoint_held_ms": {"count": 5, "max": 120.0}}}}
    records = analyse(_data([], stored, checkpoints=notes, metrics=metrics))["records"]
    assert records["checkpoints_made"] == 2 and records["records_lost"] == 1
    assert records["lost_markers"] == ["b"]
    assert records["hold_ms"]["max"] == 41.5  # the bodies' own timing, judged on the budget
    assert records["engine_held_max_ms"] == 120.0  # durable writes too: reported only
    assert records["engine_counters"] == {"checkpoint_budget_overruns": 2}
