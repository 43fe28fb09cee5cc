"""Reading a chaos run back: what the record (node versions), our kill log, and the side-effect
counters say about every execution. Pure functions over data fetched after the run.

Kill-to-resume is computed without adding anything to the library:
  * in flight at a kill = a RUNNING version whose `owner` (host:pid of the pool child) is
    one of the pids that died, and whose attempt had not reached SUCCESS before the kill;
  * recovered = the first later version carrying `recovered_at` (written by recovery when it
    fenced the step and published it again);
  * re-run start = the first start of that node's body after the kill (the steps note their
    starts in Redis) or, for a tool decided by its reconcile callback, the callback's call;
    cross-checked with the SUCCESS version's `completed_at - latency_ms`.
A SIGSTOP counts like a kill of the paused pids, except that a paused process lives on: only
a step whose body it had begun before the stop was caught by it.

Records: every lai.checkpoint() call of a step body carries a marker in its state and is
noted (with the hold the body measured) outside our stores; a noted marker in no stored
version is a record lost. The engine's own figures come from each worker process's Metrics.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from livingai_tasks import Execution, ExecutionNode, ExecutionStatus, Status, decode

from ..core.library import idempotency_key_of
from ..core.stats import percentile

__all__ = ["Kill", "RunData", "analyse", "evidence", "anomalies"]


@dataclass
class Kill:
    t: float  # time.time() just before the signal
    # "main": SIGKILL of the worker's main process (its pool child dies with it); "child":
    # of one pool child; "stop": SIGSTOP of the whole worker, SIGCONT at `until`
    mode: str
    worker: str
    pids: list[int]
    until: float | None = None


@dataclass
class RunData:
    kills: list[Kill]
    run_of: dict[str, str]  # execution id -> run id
    executions: dict[str, Execution | None]
    versions: dict[str, list[list[ExecutionNode]]]  # execution id -> each node's versions
    starts: list[dict[str, Any]]  # body starts (trace)
    reconciles: list[dict[str, Any]]
    done: dict[str, float]  # run id -> when summarize finished
    effects: dict[str, int]  # effect key -> times the side effect ran
    effect_run: dict[str, str]  # effect key -> run id
    submitted_at: dict[str, float] = field(default_factory=dict)  # execution id -> time
    first_task: dict[str, str] = field(default_factory=dict)  # execution id -> 1st task id
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # checkpoint() calls
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # pid -> engine metrics


def _ts(value: datetime | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.timestamp()


def _pid(node: ExecutionNode) -> int | None:
    owner = str(node.metadata.get("owner") or "")
    tail = owner.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _stats(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_s": _r(percentile(values, 50, nearest_rank=True)),
            "p99_s": _r(percentile(values, 99, nearest_rank=True)),
            "max_s": _r(max(values) if values else None)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


FIRST_STEP_UNRECORDED = (
    "first step never recorded: its worker died after taking the message and before the "
    "step's prerun wrote a node; start() leaves the execution with no lease deadline, so "
    "recovery never lists it, and the message waits in the broker's unacked hash for the "
    "visibility timeout")


ALL_STEPS_DONE = ("every step is SUCCESS (the last one ran) but the execution is still "
                  "RUNNING: it was never marked COMPLETED")


def _lost_kind(ex: Execution | None, nodes: list[list[ExecutionNode]]) -> str:
    if ex is None:
        return "no execution record"
    if not nodes and ex.lease_deadline is None:
        return FIRST_STEP_UNRECORDED
    if nodes and all(h[-1].status is Status.SUCCESS for h in nodes):
        return ALL_STEPS_DONE
    return "stuck RUNNING"


def _outcomes(data: RunData) -> dict[str, Any]:
    by_status: Counter[str] = Counter()
    lost, failed, in_doubt, inconsistent = [], [], [], []
    for eid, ex in data.executions.items():
        status = ex.status.value if ex else "MISSING"
        by_status[status] += 1
        run = data.run_of[eid]
        if ex is None or ex.status is ExecutionStatus.RUNNING:
            nodes = data.versions.get(eid, [])
            lost.append({"execution_id": eid, "status": status, "reason": ex and ex.reason,
                         "kind": _lost_kind(ex, nodes),
                         "nodes": [(n[-1].seq, n[-1].metadata.get("task"), n[-1].status.value)
                                   for n in nodes]})
        elif ex.status is ExecutionStatus.FAILED:
            failed.append({"execution_id": eid, "reason": ex.reason})
        elif ex.status is ExecutionStatus.IN_DOUBT:
            held = [n[-1] for n in data.versions.get(eid, []) if n[-1].status is Status.IN_DOUBT]
            in_doubt.append({"execution_id": eid, "reason": ex.reason,
                             "nodes": [{"node_id": n.id, "task": n.metadata.get("task"),
                                        "reason": n.metadata.get("in_doubt_reason")}
                                       for n in held]})
        completed = ex is not None and ex.status is ExecutionStatus.COMPLETED
        if completed != (run in data.done):
            inconsistent.append({"execution_id": eid, "status": status,
                                 "summarize_ran": run in data.done})
    return {"by_status": dict(by_status), "lost": lost, "failed": failed,
            "in_doubt": in_doubt, "inconsistent": inconsistent}


def _side_effects(data: RunData) -> dict[str, Any]:
    per_run: Counter[str] = Counter()
    for key, count in data.effects.items():
        per_run[data.effect_run.get(key, "?")] += count
    dup_keys = {k: c for k, c in data.effects.items() if c > 1}
    dup_runs = {r: c for r, c in per_run.items() if c > 1}
    # Keys per run: a run charged under two keys was charged twice in a way no provider's
    # idempotency can catch (target 0); the same key twice is a call a provider that honours
    # keys deduplicates (reported).
    keys_of_run: Counter[str] = Counter(data.effect_run.get(k, "?") for k in data.effects)
    distinct = {r: n for r, n in keys_of_run.items() if n > 1}
    completed_runs = {data.run_of[e] for e, ex in data.executions.items()
                      if ex is not None and ex.status is ExecutionStatus.COMPLETED}
    missing = sorted(r for r in completed_runs if per_run.get(r, 0) == 0)
    return {"total": sum(data.effects.values()), "keys": len(data.effects),
            "duplicate_keys": dup_keys, "duplicates": sum(c - 1 for c in dup_keys.values()),
            "same_key_repeats": sum(c - 1 for c in dup_keys.values()),
            "runs_charged_under_distinct_keys": distinct,
            "distinct_key_duplicates": sum(n - 1 for n in distinct.values()),
            # A step re-published under a new id would get a new key: count per run as well.
            "runs_charged_more_than_once": dup_runs,
            "completed_without_side_effect": missing}


def _first_after(times: list[float], t: float) -> float | None:
    later = [x for x in times if x > t]
    return min(later) if later else None


def _fence(v: ExecutionNode) -> int:
    return int(v.metadata.get("fence", 0))


def _fenced_by_recovery(history: list[ExecutionNode]) -> list[tuple[int, ExecutionNode]]:
    """(index, version) of each version recovery wrote: it raised the fence and stamped
    `recovered_at` (later versions inherit the stamp, so the fence step is what counts)."""
    return [(i, v) for i, v in enumerate(history) if i and "recovered_at" in v.metadata
            and _fence(v) > _fence(history[i - 1])]


def _resumes(data: RunData) -> dict[str, Any]:
    dead = {pid: k for k in data.kills for pid in k.pids}
    starts: dict[str, list[float]] = defaultdict(list)
    for ev in data.starts:
        starts[ev["task_id"]].append(float(ev["t"]))
    reconcile_at: dict[str, list[float]] = defaultdict(list)
    for ev in data.reconciles:
        reconcile_at[ev["key"]].append(float(ev["t"]))
    hit: list[dict[str, Any]] = []
    spurious: list[dict[str, Any]] = []
    continuation: list[dict[str, Any]] = []
    kills_with_step = set()
    # One hit per step attempt and fault: an attempt has several RUNNING versions when its
    # body saves checkpoints (each a version of its own).
    counted: set[tuple[str, int, int]] = set()
    for eid, nodes in data.versions.items():
        for pos, history in enumerate(nodes):
            node = history[-1]
            fenced = _fenced_by_recovery(history)
            for i, v in enumerate(history):
                if v.status is not Status.RUNNING:
                    continue
                attempt = int(v.metadata.get("attempt", 0))
                same = [w for w in history[i + 1:] if int(w.metadata.get("attempt", 0)) == attempt]
                pid = _pid(v)
                kill = dead.get(pid) if pid is not None else None
                ok = [w for w in same if w.status is Status.SUCCESS]
                done_at = _ts(ok[0].completed_at) if ok else None
                rec = [(j, w) for j, w in fenced if j > i and int(w.metadata.get("attempt", 0))
                       == attempt and w.status is not Status.SUCCESS]
                if kill is not None and kill.mode == "stop" and not any(
                        ev["task_id"] == node.id and ev.get("pid") == pid
                        and float(ev["t"]) <= kill.t for ev in data.starts):
                    # A paused process lives on: a step it began after its SIGCONT is not
                    # one the pause caught (a killed process begins nothing later).
                    kill = None
                if kill is None or (done_at is not None and done_at <= kill.t):
                    if rec:  # recovery took over a step whose process we never killed
                        spurious.append({"execution_id": eid, "node_id": node.id,
                                         "task": node.metadata.get("task"), "attempt": attempt,
                                         "owner": v.metadata.get("owner"),
                                         "recovered_at": rec[0][1].metadata.get("recovered_at")})
                    continue
                if (node.id, attempt, id(kill)) in counted:
                    continue
                counted.add((node.id, attempt, id(kill)))
                kills_with_step.add(id(kill))
                t_rec = _ts(rec[0][1].metadata["recovered_at"]) if rec else None
                key = idempotency_key_of(eid, node.id)
                t_start = _first_after(starts.get(node.id, []) + reconcile_at.get(key, []),
                                       kill.t)
                later_ok = [w for w in history if w.status is Status.SUCCESS
                            and int(w.metadata.get("attempt", 0)) > attempt]
                t_from_record = None
                if later_ok and later_ok[0].completed_at is not None:
                    t_from_record = (_ts(later_ok[0].completed_at) or 0.0) \
                        - (later_ok[0].latency_ms or 0) / 1000
                hit.append({
                    "execution_id": eid, "node_id": node.id, "task": node.metadata.get("task"),
                    "attempt": attempt, "kill_mode": kill.mode, "kill_t": kill.t,
                    "recovered_s": _r(t_rec - kill.t) if t_rec else None,
                    "resumed_s": _r(t_start - kill.t) if t_start else None,
                    "resumed_from_record_s": _r(t_from_record - kill.t) if t_from_record
                    else None,
                    "final_status": node.status.value,
                    "reconciled": bool(node.metadata.get("reconciled")),
                })
            # A finished step fenced by recovery: the next step's message was lost (with a
            # worker that had received it but not started it), and recovery replays this
            # step's recorded output to publish the rest of the canvas.
            for _, v in fenced:
                if v.status is not Status.SUCCESS:
                    continue
                t_rec = _ts(v.metadata["recovered_at"]) or 0.0
                before = [k for k in data.kills if k.t <= t_rec]
                nxt = nodes[pos + 1][-1].id if pos + 1 < len(nodes) else None
                t_next = _first_after(starts.get(nxt, []), t_rec) if nxt else None
                continuation.append({
                    "execution_id": eid, "node_id": node.id, "task": node.metadata.get("task"),
                    "recovered_since_kill_s": _r(t_rec - before[-1].t) if before else None,
                    "next_step_since_kill_s": _r(t_next - before[-1].t) if before and t_next
                    else None})
    # A re-run killed again before its body started leaves no start time of its own: the
    # first kill's resume then runs to the third attempt. Shown apart, not hidden.
    again = {(h["node_id"], h["attempt"] - 1) for h in hit}
    for h in hit:
        h["rerun_killed_too"] = (h["node_id"], h["attempt"]) in again
    resumed = [h["resumed_s"] for h in hit if h["resumed_s"] is not None]
    once = [h["resumed_s"] for h in hit if h["resumed_s"] is not None
            and not h["rerun_killed_too"]]
    via_continuation = [c["next_step_since_kill_s"] for c in continuation
                        if c["next_step_since_kill_s"] is not None]
    return {
        "kills": len(data.kills),
        "kills_by_mode": dict(Counter(k.mode for k in data.kills)),
        "kills_that_hit_a_step": len(kills_with_step),
        "steps_in_flight_at_a_kill": len(hit),
        "steps_not_resumed": [h for h in hit if h["resumed_s"] is None],
        "resume": _stats(resumed),
        "resume_rerun_not_killed": _stats(once),
        "resume_main_kill": _stats([h["resumed_s"] for h in hit
                                    if h["resumed_s"] is not None and h["kill_mode"] == "main"]),
        "resume_child_kill": _stats([h["resumed_s"] for h in hit if h["resumed_s"] is not None
                                     and h["kill_mode"] == "child"]),
        "resume_stop": _stats([h["resumed_s"] for h in hit if h["resumed_s"] is not None
                               and h["kill_mode"] == "stop"]),
        "recovered": _stats([h["recovered_s"] for h in hit if h["recovered_s"] is not None]),
        "resume_via_continuation_replay": _stats(via_continuation),
        "resume_all": _stats(resumed + via_continuation),
        "continuation_replays": continuation,
        "recoveries_without_a_kill": spurious,
        "hits": hit,
    }


def _tools(data: RunData) -> dict[str, Any]:
    """The non-idempotent tool: how crashes during it were decided."""
    reconciled = held = rerun = 0
    for nodes in data.versions.values():
        for history in nodes:
            last = history[-1]
            if last.metadata.get("idempotent") is not False:
                continue
            if last.metadata.get("reconciled"):
                reconciled += 1
            elif last.status is Status.IN_DOUBT:
                held += 1
            elif int(last.metadata.get("attempt", 1)) > 1:
                rerun += 1  # reconcile said "not done": it ran again, same key
    calls = Counter("found" if ev["found"] else "not found" for ev in data.reconciles)
    return {"reconciled_done": reconciled, "rerun_after_reconcile_not_done": rerun,
            "held_in_doubt": held, "reconcile_calls": dict(calls)}


def _attempts(data: RunData) -> dict[str, Any]:
    per_task: dict[str, Counter[int]] = defaultdict(Counter)
    for nodes in data.versions.values():
        for history in nodes:
            last = history[-1]
            per_task[str(last.metadata.get("task"))][int(last.metadata.get("attempt", 0))] += 1
    body_runs = Counter(ev["step"] for ev in data.starts)
    return {"final_attempt_by_task": {t: dict(c) for t, c in per_task.items()},
            "body_runs_by_step": dict(body_runs)}


def _marker(v: ExecutionNode) -> str | None:
    """The `ck` marker inside a checkpoint version's state (loadtest.fleet.app), if any."""
    if v.checkpoint is None:
        return None
    try:
        state = json.loads(decode(v.checkpoint, node_id=v.id))
    except Exception:  # noqa: BLE001 - a blob we cannot read holds no marker we can count
        return None
    return state.get("ck") if isinstance(state, dict) else None


def _records(data: RunData) -> dict[str, Any]:
    """Checkpoints the step bodies made (lai.checkpoint() returned) against the versions the
    store holds: a marker noted by a body and found in no version is a record lost. Holds:
    each call timed by the body, from call to return (what the agent waits, including the
    JSON encoding of its ~20 KB state), and the engine's own figures, as each worker process
    last published them: `checkpoint_held_ms` covers every save of the process (durable
    ones too, which may wait past the budget by design), `checkpoint_budget_overruns`
    counts the non-durable saves released past their budget."""
    found = {m for nodes in data.versions.values() for history in nodes for v in history
             if (m := _marker(v)) is not None}
    noted = [c for c in data.checkpoints if c["eid"] in data.executions]
    lost = [c for c in noted if c["ck"] not in found]
    holds = [float(c["held_ms"]) for c in noted]
    counters: Counter[str] = Counter()
    engine_max = None
    for snap in data.metrics.values():
        for name, value in (snap.get("counters") or {}).items():
            counters[name] += value
        held = (snap.get("histograms") or {}).get("checkpoint_held_ms") or {}
        if held.get("count"):
            engine_max = max(engine_max or 0.0, float(held["max"]))
    wanted = ("checkpoint_saves", "checkpoint_budget_overruns", "checkpoint_dropped",
              "checkpoint_rejected", "checkpoint_spilled", "checkpoint_store_errors",
              "steps_requeued_store_down")
    return {"checkpoints_made": len(noted), "records_lost": len(lost),
            "lost_markers": [c["ck"] for c in lost[:20]],
            "durable_on_return": sum(1 for c in noted if c.get("durable") in (True, "durable")),
            # what checkpoint() answered, as the caller saw it (True/False, or its name)
            "answers": dict(Counter(str(c.get("durable")) for c in noted)),
            "hold_ms": {"n": len(holds),
                        "p50": _r(percentile(holds, 50, nearest_rank=True)),
                        "p99": _r(percentile(holds, 99, nearest_rank=True)),
                        "max": _r(max(holds) if holds else None)},
            "engine_held_max_ms": _r(engine_max),
            "engine_counters": {k: counters[k] for k in wanted if k in counters},
            "processes_reporting": len(data.metrics)}


def analyse(data: RunData) -> dict[str, Any]:
    durations = []
    for eid, t0 in data.submitted_at.items():
        t1 = data.done.get(data.run_of[eid])
        if t1 is not None:
            durations.append(t1 - t0)
    return {"executions": len(data.executions), "outcomes": _outcomes(data),
            "side_effects": _side_effects(data), "tool": _tools(data),
            "resumes": _resumes(data), "attempts": _attempts(data),
            "records": _records(data),
            "execution_duration": _stats(durations)}


def _version(v: ExecutionNode) -> dict[str, Any]:
    m = v.metadata
    return {"status": v.status.value, "attempt": m.get("attempt"), "fence": m.get("fence"),
            "owner": m.get("owner"), "recovered_at": m.get("recovered_at"),
            "completed_at": v.completed_at.isoformat() if v.completed_at else None,
            "latency_ms": v.latency_ms, "reconciled": m.get("reconciled"),
            "in_doubt_reason": m.get("in_doubt_reason"),
            "error": v.error.type + ": " + v.error.message[:200] if v.error else None}


def anomalies(report: dict[str, Any]) -> list[str]:
    """Execution ids worth a closer look: lost, failed, held, inconsistent, odd recoveries."""
    out = report["outcomes"]
    res = report["resumes"]
    ids = [x["execution_id"] for key in ("lost", "failed", "in_doubt", "inconsistent")
           for x in out[key]]
    ids += [x["execution_id"] for x in res["recoveries_without_a_kill"]]
    ids += [x["execution_id"] for x in res["steps_not_resumed"]]
    ids += [x["execution_id"] for x in res["continuation_replays"][:3]]
    return list(dict.fromkeys(ids))


def evidence(data: RunData, execution_ids: list[str], limit: int = 25) -> dict[str, Any]:
    """The record of each execution, every version of every node, for a bug report."""
    found: dict[str, Any] = {}
    for eid in execution_ids[:limit]:
        ex = data.executions.get(eid)
        found[eid] = {
            "run": data.run_of.get(eid), "first_task_id": data.first_task.get(eid),
            "submitted_at": data.submitted_at.get(eid),
            "execution": ex.to_dict() if ex else None,
            "nodes": [{"node_id": h[-1].id, "seq": h[-1].seq, "task": h[-1].metadata.get("task"),
                       "versions": [_version(v) for v in h]} for h in data.versions.get(eid, [])],
            "body_starts": [ev for ev in data.starts if ev.get("eid") == eid],
        }
    return found
