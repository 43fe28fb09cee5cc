"""Celery settings of the worker fleet (`app.config_from_object("celeryconfig")`).

Every value that differs between deployments comes from the environment, so this file holds
no host names that matter and never a password:

    LIVINGAI_BROKER              broker URL          (default: the local Redis, db 0)
    LIVINGAI_BACKEND             result backend URL  (default: the local Redis, db 1)
    LIVINGAI_QUEUE               the queue steps and recovery ticks go to (default "celery")
    LIVINGAI_VISIBILITY_TIMEOUT_S  Redis broker's redelivery timeout (default 7200)
    LIVINGAI_SOFT_SHUTDOWN_S     time running steps get on shutdown (default 60)
    LIVINGAI_MAX_MEMORY_KB       resident memory that retires a pool child (default 1000000)

The store and the livingai_* timings are read by livingai_tasks.install() itself
(LIVINGAI_STORE, LIVINGAI_LEASE_S, ...: see livingai_tasks/settings.py).
"""

from __future__ import annotations

import os

broker_url = os.environ.get("LIVINGAI_BROKER", "redis://127.0.0.1:6379/0")
result_backend = os.environ.get("LIVINGAI_BACKEND", "redis://127.0.0.1:6379/1")
# Fleets that share a broker stay apart by queue. Workers, beat and every process that
# calls livingai_tasks.start() must agree on it: a step published elsewhere waits forever.
task_default_queue = os.environ.get("LIVINGAI_QUEUE", "celery")
# A worker that starts before Redis is reachable keeps retrying instead of exiting, so a
# fleet can start in any order (compose also waits for the health checks).
broker_connection_retry_on_startup = True

# -- delivery: when a message leaves the broker for good ----------------------------------

# Ack after the step, not before: if the whole worker dies (OOM of the container, node loss)
# the message is still the broker's and comes back, with the rest of the chain inside it.
# Every livingai step sets this itself (StepTask.acks_late); set here, it also covers any
# plain task of this app. The recovery task opts out on purpose: a lost tick is replaced by
# the next one.
task_acks_late = True

# False (Celery's default), said out loud because True looks tempting: when a pool child
# is killed (OOM, SIGKILL) True puts the message straight back on the queue, and a step that
# always kills its child (a poison input) is then re-run forever. With False, Celery acks it
# and livingai marks the node CRASHED; the recovery task resumes it at most
# LIVINGAI_MAX_ATTEMPTS times, and a non-idempotent tool goes IN_DOUBT instead of re-running.
task_reject_on_worker_lost = False

# Redis only (RabbitMQ ignores it): an unacked message is handed out again once this many
# seconds have passed since its delivery, whether or not the step is still running. Below the
# longest step runtime (plus the longest countdown/ETA, which also waits unacked) every long
# step would run twice or more at once. Above it, costs little here: after a worker crash
# livingai's recovery resumes the step when its lease expires (seconds), and the late Redis
# copy finds a newer fence and stands down.
broker_transport_options = {
    "visibility_timeout": int(os.environ.get("LIVINGAI_VISIBILITY_TIMEOUT_S", "7200")),
}

# One message reserved per pool process: a prefetched step waits unacked behind a running
# one, and on Redis its visibility timeout runs while it waits (a duplicate without any
# crash). livingai.install() sets it too; it is here so a reader of this file sees it.
worker_prefetch_multiplier = 1

# A broker connection lost while a step runs: keep the step running (False). A copy that
# the broker hands out meanwhile (RabbitMQ requeues at once, Redis on reconnect) finds the
# step RUNNING under a live lease and stands down, or its recorded output once it is done.
# True SIGTERMs the step mid-way: livingai records that as a crash (a tool is reconciled or
# held IN_DOUBT, not re-run), but the step's work so far is lost. (Celery 6 makes True the
# default and warns on each connection loss: keep this line.)
worker_cancel_long_running_tasks_on_connection_loss = False

# -- shutdown and memory -----------------------------------------------------------------

# On a cold shutdown (SIGQUIT, or SIGTERM when REMAP_SIGTERM=SIGQUIT, as compose sets it)
# running steps get this many seconds to finish; then they are cancelled and their unacked
# messages go back to the broker. The worker then exits cleanly, which flushes livingai's
# write-behind queue (a SIGKILL would lose it). The orchestrator's grace period
# (compose: stop_grace_period) must be longer than this, or it kills the worker first.
worker_soft_shutdown_timeout = float(os.environ.get("LIVINGAI_SOFT_SHUTDOWN_S", "60"))

# A pool child past this resident size (KiB) is replaced after its current step, so a leak
# ends between steps instead of as an OOM kill in the middle of one.
worker_max_memory_per_child = int(os.environ.get("LIVINGAI_MAX_MEMORY_KB", "1000000"))

# -- what Flower and the operators see ---------------------------------------------------

# Task events are what Flower is built from: without them it shows no steps at all. The
# sent event adds the steps still waiting in the queue.
worker_send_task_events = True
task_send_sent_event = True
# Left off: task_track_started (a second result-backend write per step) and result_extended
# (each step's arguments stored again with its result). Flower's task page already says
# where a step runs, from the events; the store keeps every step's input and output.

# -- serialization: a message must never be able to run code ----------------------------

# JSON only, both ways (livingai.install() refuses pickle outright).
accept_content = ["json"]
result_accept_content = ["json"]
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
