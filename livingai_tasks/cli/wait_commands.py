"""The `livingai-tasks` commands of durable waits: approve, deny, send, cancel.

approve, deny and send publish the woken step, so they need the app (--app/LIVINGAI_APP),
as resolve does; cancel only writes the record.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..celery_wing import runtime
from ..celery_wing.wake import cancel_waiting, decide_approval, send_event
from ..errors import ConfigError
from ..nodes import ExecutionStatus
from .render import safe
from .targets import json_argument, named_app, named_store

__all__ = ["cmd_approve", "cmd_deny", "cmd_send", "cmd_cancel", "waiting_due"]


def _who(args: argparse.Namespace) -> str:
    return str(args.by or os.environ.get("USER") or f"cli@{os.getpid()}")


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[Any]:
    """The named store, closed after the command (it reconnects if used again)."""
    store = named_store(args)
    try:
        yield store
    finally:
        store.close()


def cmd_approve(args: argparse.Namespace) -> int:
    app = named_app(args, why="approve publishes the approved step")
    with _store(args) as store:
        decide_approval(app, store, runtime.get().settings, args.execution, args.node,
                        approved=True, by=_who(args), comment=args.comment)
    print(f"node {safe(args.node)} approved by {safe(_who(args))}; execution "
          f"{safe(args.execution)} resumes")
    return 0


def cmd_deny(args: argparse.Namespace) -> int:
    app = named_app(args, why="deny publishes the step, which then fails")
    with _store(args) as store:
        decide_approval(app, store, runtime.get().settings, args.execution, args.node,
                        approved=False, by=_who(args), reason=args.reason)
    print(f"node {safe(args.node)} denied by {safe(_who(args))}; the step fails with "
          "ApprovalDenied")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    payload: Any = None
    if args.payload is not None:
        payload = json_argument(args.payload, "the payload", '{"ok": true}')
    app = named_app(args, why="send publishes the step the event wakes")
    with _store(args) as store:
        stored = send_event(app, store, runtime.get().settings, args.execution, args.name,
                            payload, key=args.key, by=_who(args))
    print(f"event {safe(args.name)!r} " + ("stored" if stored else
                                           "already stored under this key (not stored twice)")
          + f" for execution {safe(args.execution)}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _store(args) as store:
        cancelled = cancel_waiting(store, args.execution, by=_who(args),
                                   reason=args.reason or "")
    if not cancelled:
        raise ConfigError(f"execution {args.execution} changed while cancelling; try again")
    print(f"execution {safe(args.execution)} cancelled")
    return 0


def waiting_due(store: Any) -> int:
    """WAITING executions whose deadline has passed (the next tick wakes them): for stats."""
    return len(store.list_executions(status=ExecutionStatus.WAITING,
                                     lease_expired_before=time.time(), limit=1000))
