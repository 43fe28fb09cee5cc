"""`livingai-tasks`: inspect, recover, resolve and replay executions; approve, deny, send
and cancel durable waits; migrate; run the demo.

Every failure is one line on stderr and a non-zero exit (2 for bad arguments, 1 for the
rest), never a traceback; --debug shows the traceback for a bug report. The line is escaped
like every stored string (render.safe): an error may quote what a step stored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import LivingAIError
from ..nodes import ExecutionStatus
from .commands import (
    cmd_demo,
    cmd_list,
    cmd_migrate,
    cmd_recover,
    cmd_rejected,
    cmd_replay,
    cmd_resolve,
    cmd_show,
    cmd_stats,
)
from .render import safe
from .wait_commands import cmd_approve, cmd_cancel, cmd_deny, cmd_send

__all__ = ["main", "build_parser"]


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


def _flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--json", action="store_true", default=default,
                        help="print JSON instead of a table")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="store URL (default: $LIVINGAI_STORE, else the store "
                                        "the app named by --app/$LIVINGAI_APP installs)")
    common.add_argument("--app", help="Celery app module:attr, as for `celery -A` (default: "
                                      "$LIVINGAI_APP); needed where a command publishes")
    # After the subcommand too; SUPPRESS keeps a flag given before it.
    _flags(common, argparse.SUPPRESS)
    # The demo runs its bundled agent on a fleet and store of its own: it takes no --app and
    # reads neither LIVINGAI_APP nor LIVINGAI_STORE, so it never writes into a store of yours
    # that the environment happens to name.
    demo_common = argparse.ArgumentParser(add_help=False)
    demo_common.add_argument("--store", help="store URL (default: a SQLite file in --workdir; "
                                             "$LIVINGAI_STORE is not read)")
    _flags(demo_common, argparse.SUPPRESS)

    parser = argparse.ArgumentParser(prog="livingai-tasks",
                                     description="Durable AI-agent steps on Celery.")
    _flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="executions, newest first")
    p.add_argument("--status", choices=[s.value for s in ExecutionStatus])
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="one execution's steps as a tree")
    p.add_argument("execution")
    p.add_argument("node", nargs="?", help="one node in full, as JSON (input, output, error, "
                                           "metadata): what `resolve --done` needs")
    p.add_argument("--full", action="store_true", help="every node in full, as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("replay", parents=[common], help="run an execution again")
    p.add_argument("execution")
    p.add_argument("--mode", required=True, type=str.upper,
                   choices=["FULL", "FROM_NODE", "MOCK_TOOLS", "COUNTERFACTUAL"])
    p.add_argument("--node", help="node id (FROM_NODE, COUNTERFACTUAL)")
    p.add_argument("--input", help="new input as JSON (COUNTERFACTUAL)")
    p.add_argument("--allow-side-effects", action="store_true",
                   help="let FULL/FROM_NODE run non-idempotent tools again")
    p.add_argument("--wait", type=_positive_float, default=60.0, help="seconds to wait")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("recover", parents=[common],
                       help="what the recovery task would do (--dry-run), or do it now")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("resolve", parents=[common],
                       help="decide an IN_DOUBT tool step, or journaled call")
    p.add_argument("execution")
    p.add_argument("node")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--done", metavar="OUTPUT_JSON", help="it happened; this was its output")
    how.add_argument("--retry", action="store_true", help="it did not happen; run it again")
    p.add_argument("--force", action="store_true",
                   help="retry even while its last attempt's worker may be alive")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("approve", parents=[common], help="approve a tool waiting for it")
    p.add_argument("execution")
    p.add_argument("node")
    p.add_argument("--by", help="who decides (default: $USER)")
    p.add_argument("--comment")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("deny", parents=[common], help="deny a tool waiting for approval")
    p.add_argument("execution")
    p.add_argument("node")
    p.add_argument("--by", help="who decides (default: $USER)")
    p.add_argument("--reason")
    p.set_defaults(func=cmd_deny)

    p = sub.add_parser("send", parents=[common], help="send an event to an execution")
    p.add_argument("execution")
    p.add_argument("name")
    p.add_argument("payload", nargs="?", help="the event's payload as JSON")
    p.add_argument("--key", help="deduplication key: a second send with it is not stored")
    p.add_argument("--by", help="who sends (default: $USER)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("cancel", parents=[common], help="cancel a WAITING execution")
    p.add_argument("execution")
    p.add_argument("--by", help="who cancels (default: $USER)")
    p.add_argument("--reason")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("rejected", parents=[common],
                       help="records the store refused for their content, newest first")
    p.add_argument("--limit", type=_positive_int, default=100)
    p.set_defaults(func=cmd_rejected)

    p = sub.add_parser("migrate", parents=[common], help="create or upgrade the store schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("stats", parents=[common],
                       help="executions by status, orphans now, the fleet's counters")
    p.add_argument("--tokens", type=_positive_int, metavar="N",
                   help="also the tokens of each of the N newest executions' recorded "
                        "model calls (each call once, replays not counted again)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("demo", parents=[demo_common],
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
        print(f"livingai-tasks: error: {safe(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if args.debug:
            raise
        print(f"livingai-tasks: error: {type(exc).__name__}: {safe(exc)} (run with --debug "
              "for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
