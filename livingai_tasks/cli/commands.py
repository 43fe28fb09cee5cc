"""The `livingai-tasks` commands: each takes the parsed arguments, prints, returns an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from typing import Any

from ..celery_wing import runtime
from ..celery_wing.journal_resolve import resolve
from ..celery_wing.recover import recover_once
from ..celery_wing.replay import ReplaySession
from ..demo.run import DemoConfig, run_demo
from ..errors import ConfigError, LivingAIError
from ..journal import token_totals
from ..nodes import ExecutionStatus
from ..settings import Settings
from ..stores import mask_url
from ..stores.base import ListsWorkers, SetsAside, Store
from ..stores.corrupt import SkippedRecord, collect_skipped
from .render import as_json, node_detail, render_tree, safe, table, tokens_line
from .targets import app_named, json_argument, named_app, named_store
from .wait_commands import waiting_due

__all__ = ["cmd_list", "cmd_show", "cmd_migrate", "cmd_recover", "cmd_resolve", "cmd_replay",
           "cmd_stats", "cmd_demo", "cmd_rejected"]


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(as_json(data) if args.json else text)


# -- commands ---------------------------------------------------------------------------


def _corrupt_note(skipped: list[SkippedRecord]) -> str:
    """The line that flags the corrupt records a listing left out ("" if none)."""
    if not skipped:
        return ""
    found = {s.key: s for s in skipped}.values()  # a row met by two listings, once
    ids = ", ".join(f"{safe(s.execution_id)} ({safe(s.key)})" for s in found)
    return (f"{len(found)} corrupt record(s) skipped: {ids}. `livingai-tasks show <id>` says "
            "what is wrong with each.")


def _flag(args: argparse.Namespace, note: str) -> str:
    """`note` for the text output; in JSON mode it goes to stderr, keeping stdout JSON."""
    if note and args.json:
        print(f"livingai-tasks: warning: {note}", file=sys.stderr)
    return f"\n{note}" if note else ""


def cmd_list(args: argparse.Namespace) -> int:
    status = ExecutionStatus(args.status) if args.status else None
    with collect_skipped() as skipped:
        rows = named_store(args).list_executions(status=status, limit=args.limit,
                                                 offset=args.offset)
    text = table([[e.id, e.status.value, str(e.attempts), e.updated_at.strftime("%F %T"),
                    (e.reason or "")[:60]] for e in rows],
                  ["EXECUTION", "STATUS", "RECOVERIES", "UPDATED (UTC)", "REASON"])
    note = _flag(args, _corrupt_note(skipped))
    _emit(args, [e.to_dict() for e in rows], (text if rows else "no executions") + note)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = named_store(args)
    execution = store.get_execution(args.execution)
    nodes = store.nodes(args.execution)
    if execution is None and not nodes:
        raise ConfigError(f"No execution {args.execution!r} in store {store.url}.")
    if args.node is not None:
        # One node in full, as JSON either way: what `resolve --done` needs is in there.
        node = next((n for n in nodes if n.id == args.node), None)
        if node is None:
            raise ConfigError(f"No node {args.node!r} in execution {args.execution!r}; its "
                              f"nodes: {', '.join(n.id for n in nodes) or 'none'}.")
        print(as_json(node_detail(node)))
        return 0
    if args.full:
        print(as_json({"execution": execution.to_dict() if execution else None,
                       "nodes": [node_detail(n) for n in nodes]}))
        return 0
    head = (f"execution {safe(args.execution)}  {execution.status.value}  recoveries "
            f"{execution.attempts}  fence {execution.fence}"
            + (f"\n  reason: {safe(execution.reason)}" if execution.reason else "")
            if execution else f"execution {safe(args.execution)} (no summary record)")
    tokens = tokens_line(nodes)
    head += f"\n{safe(tokens)}" if tokens else ""
    data = {"execution": execution.to_dict() if execution else None,
            "nodes": [n.to_dict() for n in nodes], "tokens": token_totals(nodes)}
    hint = f"--app {app_named(args)} " if app_named(args) else "--app <module:app> "
    _emit(args, data, "\n".join([head, *render_tree(nodes, hint)]))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    store = named_store(args)
    store.migrate()
    version = getattr(store, "schema_version", lambda: None)()
    print(f"store {store.url}: schema created or upgraded"
          + (f" to version {version}" if version is not None else " (none needed)"))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    dry_run = args.dry_run or app_named(args) is None
    if dry_run:
        app = named_app(args, why="") if app_named(args) else None
        settings = runtime.get().settings if app is not None else Settings()
    else:
        app = named_app(args, why="recover publishes steps again")
        settings = runtime.get().settings
    store = named_store(args)
    report = recover_once(app, store, settings, owner=f"cli@{os.getpid()}", dry_run=dry_run)
    rows = [[p.execution_id, p.action.value, p.reason[:90]] for p in report.plans]
    verb = "would do" if dry_run else "did"
    note = ("" if args.dry_run or not dry_run else
            "\n(a dry run: no app was named with --app or LIVINGAI_APP, so nothing was "
            "published; name the app to act)")
    text = (table(rows, ["EXECUTION", "ACTION", "WHY"]) + f"\n{len(report.claimed)} claimed, "
            f"{len(report.published)} step(s) published" if rows
            else f"no orphaned executions: nothing {verb}") + note
    _emit(args, {**report.to_dict(), "dry_run": dry_run}, text)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    output = None
    if args.done is not None:
        output = json_argument(args.done, "--done (the step's output)", '{"charge_id": 17}')
    app = named_app(args, why="resolve publishes the step's continuation")
    node = resolve(app, named_store(args), args.execution, args.node, output=output,
                   done=args.done is not None, retry=args.retry, owner=f"cli@{os.getpid()}",
                   force=args.force)
    print(f"node {node.id} resolved ({'done' if args.done is not None else 'retry'}); "
          f"execution {args.execution} resumes")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    new_input = None
    if args.input is not None:
        try:
            new_input = json.loads(args.input)
        except ValueError as exc:
            raise ConfigError(f"--input takes JSON ({exc}): a list of arguments or "
                              '{"args": [...], "kwargs": {...}}.') from None
    app = named_app(args, why="replay publishes the replayed steps")
    store = named_store(args)
    session = ReplaySession(app, store)
    run = session.start(args.execution, args.mode, node_id=args.node, new_input=new_input,
                        allow_side_effects=args.allow_side_effects)
    deadline = time.monotonic() + args.wait
    done = {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.IN_DOUBT}
    while time.monotonic() < deadline:
        execution = store.get_execution(run.execution_id)
        if execution is not None and execution.status in done:
            break
        time.sleep(0.2)
    else:
        raise LivingAIError(f"replay {run.execution_id} did not finish within {args.wait:g} s; "
                            f"is a worker running for app {app.main!r} on "
                            f"{mask_url(str(app.conf.broker_url))}?")
    diffs = session.diff(args.execution, run.execution_id)
    rows = [[str(d.seq), d.task, d.status] for d in diffs]
    text = (f"replay {run.execution_id} ({args.mode.upper()}) of {args.execution}: "
            f"{execution.status.value}\n" + table(rows, ["SEQ", "STEP", "OUTPUT"]))
    _emit(args, {"replay_id": run.execution_id, "status": execution.status.value,
                 "diff": [d.to_dict() for d in diffs]}, text)
    return 0


def _count(store: Store, status: ExecutionStatus, skipped: list[SkippedRecord]) -> int:
    """Readable executions in `status` (up to 100,000); corrupt ones join `skipped`."""
    offset, readable, page = 0, 0, 1000
    while True:
        with collect_skipped() as left_out:
            got = len(store.list_executions(status=status, limit=page, offset=offset))
        skipped += left_out
        readable += got
        # The offset counts the corrupt rows too: a page they thinned out is not the last.
        offset += got + len(left_out)
        if got + len(left_out) < page or offset >= 100_000:
            return readable


def cmd_stats(args: argparse.Namespace) -> int:
    store = named_store(args)
    counts: dict[str, int] = {}
    skipped: list[SkippedRecord] = []
    for status in ExecutionStatus:
        counts[status.value] = _count(store, status, skipped)
    with collect_skipped() as left_out:
        expired = len(store.list_executions(status=ExecutionStatus.RUNNING,
                                            lease_expired_before=time.time(), limit=1000))
    skipped += left_out
    corrupt = len({s.key for s in skipped})
    due = waiting_due(store)
    fleet, fleet_text = _fleet_counters(store)
    data: dict[str, Any] = {"store": store.url, "executions": counts, "orphaned_now": expired,
            "waiting_due_now": due, "corrupt": corrupt,
            "corrupt_records": sorted({s.execution_id for s in skipped}), "fleet": fleet}
    text = (f"store {store.url}\n" + table([[k, str(v)] for k, v in counts.items()],
                                            ["STATUS", "EXECUTIONS"])
            + f"\nRUNNING with an expired lease (recovery picks these up): {expired}"
            + f"\nWAITING past their deadline (the next tick wakes these): {due}"
            + f"\ncorrupt records (unreadable, not counted above): {corrupt}\n\n"
            + fleet_text)
    if args.tokens:
        # One read of nodes per execution: only when asked, for the newest --tokens N.
        per = {e.id: token_totals(store.nodes(e.id))
               for e in store.list_executions(limit=args.tokens)}
        data["tokens"] = per
        text += "\n" + table([[eid, str(t["calls"]), str(t["input_tokens"]),
                               str(t["output_tokens"]), str(t["total_tokens"])]
                              for eid, t in per.items()],
                             ["EXECUTION", "CALLS", "INPUT", "OUTPUT", "TOTAL TOKENS"])
    _emit(args, data, text + _flag(args, _corrupt_note(skipped)))
    return 0


def _fleet_counters(store: Any) -> tuple[dict[str, Any], str]:
    """The counters of every worker, summed from their liveness records in the store."""
    if not isinstance(store, ListsWorkers):
        return ({"workers": 0, "counters": {}, "source": "none"},
                f"fleet counters: store {store.url} keeps no worker records")
    now = time.time()
    records = store.workers(limit=10_000)
    live = sum(1 for r in records if r.expires_at >= now)
    totals: dict[str, float] = {}
    for record in records:
        for name, value in record.counters.items():
            totals[name] = totals.get(name, 0) + value
    summed = (f"summed over the liveness records of {live} live worker(s)"
              + (f" and {len(records) - live} dead one(s) not yet recovered"
                 if len(records) > live else ""))
    note = ("Each worker beats its totals (all its processes, pool children that died "
            "included) every worker_beat_s. A worker's totals leave with its record: at a "
            "clean stop, or once recovery has resumed what a dead worker held (about "
            "worker_ttl_s after its last beat). For history, scrape each worker's /metrics "
            "(metrics_port; workers/README.md).")
    rows = [[name, f"{value:g}"] for name, value in sorted(totals.items())]
    text = (f"fleet counters: {summed}\n" + textwrap.fill(note, 92) + "\n"
            + (table(rows, ["COUNTER", "TOTAL"]) if rows else "(no counter above zero)"))
    source = f"{summed}. {note}"
    return {"workers": len(records), "live_workers": live, "counters": totals,
            "source": source}, text


def cmd_demo(args: argparse.Namespace) -> int:
    config = DemoConfig(executions=args.executions, workers=args.workers, broker=args.broker,
                        store=args.store, workdir=args.workdir, step_s=args.step_seconds,
                        timeout_s=args.timeout, json_out=args.json)
    return 0 if run_demo(config).ok else 1


def cmd_rejected(args: argparse.Namespace) -> int:
    store = named_store(args)
    if not isinstance(store, SetsAside):
        raise ConfigError(f"Store {store.url} keeps no rejected records (the engine logs them "
                          "at ERROR instead); stores that do: SQL (PostgreSQL, SQLite), "
                          "Redis, tiered, memory.")
    rows = store.rejected(args.limit)
    text = table([[time.strftime("%F %T", time.gmtime(r.rejected_at)), safe(r.kind),
                   safe(r.execution_id), safe(r.node_id or "-"), safe(r.reason)[:80]]
                  for r in rows], ["REJECTED (UTC)", "KIND", "EXECUTION", "NODE", "REASON"])
    data = [{"kind": r.kind, "execution_id": r.execution_id, "node_id": r.node_id,
             "reason": r.reason, "rejected_at": r.rejected_at,
             "record": r.payload.decode("utf-8", "backslashreplace")} for r in rows]
    _emit(args, data, text if rows else "no rejected records")
    return 0
