"""`livingai-tasks`: inspect, recover, resolve and replay executions; migrate; run the demo.

Every failure is one line on stderr and a non-zero exit (2 for bad arguments, 1 for the
rest), never a traceback; --debug shows the traceback for a bug report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .celery_wing import runtime
from .celery_wing.install import install
from .celery_wing.recover import recover_once, resolve
from .celery_wing.replay import ReplaySession
from .errors import ConfigError, LivingAIError
from .nodes import ExecutionNode, ExecutionStatus, Meta
from .settings import DEFAULT_STORE
from .stores import Store, mask_url, open_store

__all__ = ["main"]

DEFAULT_APP = "livingai_tasks.demo.app:app"


def _store(args: argparse.Namespace) -> Store:
    return open_store(args.store or os.environ.get("LIVINGAI_STORE") or DEFAULT_STORE)


def _app(args: argparse.Namespace) -> Any:
    """The Celery app to publish on: --app module:attr, LIVINGAI_APP, else the example app.
    Its install() runs on import; the CLI's --store then wins for this process."""
    spec = args.app or os.environ.get("LIVINGAI_APP") or DEFAULT_APP
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # like `celery -A`, find the user's module here
    try:
        app = getattr(importlib.import_module(module_name), attr or "app")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"Cannot load the Celery app {spec!r} ({exc}). Pass --app "
                          "module:attribute as for `celery -A`, from the folder the module "
                          "is in (e.g. in workers/: --app agent_app:app).") from None
    if args.store:
        install(app, store=args.store)
    return app


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(row: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _ms(value: int | None) -> str:
    return "-" if value is None else f"{value} ms"


# -- commands ---------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    status = ExecutionStatus(args.status) if args.status else None
    rows = _store(args).list_executions(status=status, limit=args.limit, offset=args.offset)
    text = _table([[e.id, e.status.value, str(e.attempts), e.updated_at.strftime("%F %T"),
                    (e.reason or "")[:60]] for e in rows],
                  ["EXECUTION", "STATUS", "RECOVERIES", "UPDATED (UTC)", "REASON"])
    _emit(args, [e.to_dict() for e in rows], text if rows else "no executions")
    return 0


def render_tree(nodes: list[ExecutionNode]) -> list[str]:
    """Nodes as a tree by parent_id, siblings in seq order."""
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
            lines.append(f"{indent}{'└─' if last else '├─'} #{n.seq} {n.type.value:<6} "
                         f"{n.metadata.get(Meta.TASK, '?')}  {n.status.value}  "
                         f"{_ms(n.latency_ms)}  tokens {n.cost_tokens or '-'}  "
                         f"attempt {n.metadata.get(Meta.ATTEMPT, '-')}  [{n.id}]{error}")
            walk(n.id, indent + ("   " if last else "│  "))

    walk(None, "")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    execution = store.get_execution(args.execution)
    nodes = store.nodes(args.execution)
    if execution is None and not nodes:
        raise ConfigError(f"No execution {args.execution!r} in store {store.url}.")
    head = (f"execution {args.execution}  {execution.status.value}  recoveries "
            f"{execution.attempts}  fence {execution.fence}"
            + (f"\n  reason: {execution.reason}" if execution.reason else "")
            if execution else f"execution {args.execution} (no summary record)")
    data = {"execution": execution.to_dict() if execution else None,
            "nodes": [n.to_dict() for n in nodes]}
    _emit(args, data, "\n".join([head, *render_tree(nodes)]))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    store = _store(args)
    store.migrate()
    version = getattr(store, "schema_version", lambda: None)()
    print(f"store {store.url}: schema created or upgraded"
          + (f" to version {version}" if version is not None else " (none needed)"))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    app = _app(args)
    store = _store(args)
    report = recover_once(app, store, runtime.get().settings, owner=f"cli@{os.getpid()}",
                          dry_run=args.dry_run)
    rows = [[p.execution_id, p.action.value, p.reason[:90]] for p in report.plans]
    verb = "would do" if args.dry_run else "did"
    text = (_table(rows, ["EXECUTION", "ACTION", "WHY"]) + f"\n{len(report.claimed)} claimed, "
            f"{len(report.published)} step(s) published" if rows
            else f"no orphaned executions: nothing {verb}")
    _emit(args, report.to_dict(), text)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    output = None
    if args.done is not None:
        try:
            output = json.loads(args.done)
        except ValueError as exc:
            raise ConfigError(f"--done takes the step's output as JSON, e.g. "
                              f"'{{\"charge_id\": 17}}'; got {args.done!r} ({exc}).") from None
    node = resolve(_app(args), _store(args), args.execution, args.node, output=output,
                   done=args.done is not None, retry=args.retry, owner=f"cli@{os.getpid()}")
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
    app = _app(args)
    store = _store(args)
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
            f"{execution.status.value}\n" + _table(rows, ["SEQ", "STEP", "OUTPUT"]))
    _emit(args, {"replay_id": run.execution_id, "status": execution.status.value,
                 "diff": [d.to_dict() for d in diffs]}, text)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = _store(args)
    counts: dict[str, int] = {}
    for status in ExecutionStatus:
        n, page = 0, 1000
        while True:
            got = len(store.list_executions(status=status, limit=page, offset=n))
            n += got
            if got < page or n >= 100_000:
                break
        counts[status.value] = n
    expired = len(store.list_executions(status=ExecutionStatus.RUNNING,
                                        lease_expired_before=time.time(), limit=1000))
    data = {"store": store.url, "executions": counts, "orphaned_now": expired}
    text = (f"store {store.url}\n" + _table([[k, str(v)] for k, v in counts.items()],
                                            ["STATUS", "EXECUTIONS"])
            + f"\nRUNNING with an expired lease (recovery picks these up): {expired}")
    _emit(args, data, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import DemoConfig, run_demo

    config = DemoConfig(executions=args.executions, workers=args.workers, broker=args.broker,
                        store=args.store, workdir=args.workdir, step_s=args.step_seconds,
                        timeout_s=args.timeout, json_out=args.json)
    return 0 if run_demo(config).ok else 1


# -- parser -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help=f"store URL (default: $LIVINGAI_STORE or {DEFAULT_STORE})")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    with_app = argparse.ArgumentParser(add_help=False)
    with_app.add_argument("--app", help=f"Celery app module:attr (default: $LIVINGAI_APP or "
                                        f"{DEFAULT_APP})")

    parser = argparse.ArgumentParser(prog="livingai-tasks",
                                     description="Durable AI-agent steps on Celery.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="executions, newest first")
    p.add_argument("--status", choices=[s.value for s in ExecutionStatus])
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="one execution's steps as a tree")
    p.add_argument("execution")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("replay", parents=[common, with_app], help="run an execution again")
    p.add_argument("execution")
    p.add_argument("--mode", required=True, type=str.upper,
                   choices=["FULL", "FROM_NODE", "MOCK_TOOLS", "COUNTERFACTUAL"])
    p.add_argument("--node", help="node id (FROM_NODE, COUNTERFACTUAL)")
    p.add_argument("--input", help="new input as JSON (COUNTERFACTUAL)")
    p.add_argument("--allow-side-effects", action="store_true",
                   help="let FULL/FROM_NODE run non-idempotent tools again")
    p.add_argument("--wait", type=_positive_float, default=60.0, help="seconds to wait")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("recover", parents=[common, with_app],
                       help="what the recovery task would do (--dry-run), or do it now")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("resolve", parents=[common, with_app],
                       help="decide an IN_DOUBT tool step")
    p.add_argument("execution")
    p.add_argument("node")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--done", metavar="OUTPUT_JSON", help="it happened; this was its output")
    how.add_argument("--retry", action="store_true", help="it did not happen; run it again")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("migrate", parents=[common], help="create or upgrade the store schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("stats", parents=[common], help="executions by status, orphans now")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("demo", parents=[common],
                       help="run the example agent on a local fleet, crash it, watch it resume")
    p.add_argument("--broker", help="broker URL (default: an embedded SQLite broker)")
    p.add_argument("--executions", type=_positive_int, default=6)
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--workdir", help="folder for the demo's files (default: ./livingai-demo)")
    p.add_argument("--step-seconds", type=_positive_float, default=0.6)
    p.add_argument("--timeout", type=_positive_float, default=180.0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("livingai-tasks: interrupted", file=sys.stderr)
        return 130
    except LivingAIError as exc:
        if args.debug:
            raise
        print(f"livingai-tasks: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if args.debug:
            raise
        print(f"livingai-tasks: error: {type(exc).__name__}: {exc} (run with --debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
