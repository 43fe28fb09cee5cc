"""What one chaos run does: the fault kinds, the settings variants, and the counts and times
of each, quick or full. The library's defaults are read from `livingai_tasks.Settings()`,
never copied here, so the run follows them when they change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import livingai_tasks as lai

from ..core.context import RunContext
from .faults import FAULT_KINDS, parse_faults

__all__ = ["Config", "Variant", "config_of", "CHAOS_KINDS", "TUNED", "BROKERS"]

CHAOS_KINDS = ("redis", "tiered", "postgres", "sqlite")
BROKERS = ("redis", "rabbitmq")
# The "tuned" variant: the settings the chaos run used before it ran at the defaults.
TUNED = {"lease_s": 4.0, "recovery_interval_s": 1.0, "stuck_after_s": 10.0}
# Targets at the library's defaults (issue 18): a whole worker SIGKILLed resumes within 15 s
# (p99), a pool child within 10 s. The other kinds are reported, not judged, on resume time.
DEFAULT_TARGETS_S = {"sigkill-worker": 15.0, "sigkill-child": 10.0}


@dataclass(frozen=True)
class Variant:
    """The settings the workers run with: "defaults" sets no LIVINGAI_* variable at all."""

    name: str
    settings: dict[str, Any]  # the values in force (read from Settings())
    env: dict[str, str]  # what the workers' environment sets

    def setting(self, name: str, fallback: float = 0.0) -> float:
        return float(self.settings.get(name, fallback))

    @property
    def pause_s(self) -> float:
        """How long a SIGSTOP lasts: past the lease and the worker TTL (when the library has
        one), plus two recovery ticks, so recovery has given the work away before SIGCONT."""
        return (max(self.setting("lease_s"), self.setting("worker_ttl_s"))
                + 2 * self.setting("recovery_interval_s") + 1.0)

    @property
    def drain_s(self) -> float:
        """How long stragglers get after the last start: the slowest recovery path (a step
        re-published and lost again waits out stuck_after_s) plus a margin."""
        return self.setting("stuck_after_s") + self.setting("lease_s") + 30.0

    def target_s(self, fault: str) -> float | None:
        if self.name == "defaults":
            return DEFAULT_TARGETS_S.get(fault)
        if fault.startswith("sigkill"):  # tuned: the old target, 2 x (lease + tick)
            return 2 * (self.setting("lease_s") + self.setting("recovery_interval_s"))
        return None


def _variants(ctx: RunContext) -> tuple[Variant, ...]:
    defaults = dataclasses.asdict(lai.Settings())
    defaults.pop("store", None)
    found = [Variant("defaults", defaults, {})]
    if ctx.options.get("tuned"):
        tuned = {**TUNED}
        if ctx.options.get("lease_s") is not None:
            tuned["lease_s"] = float(ctx.options["lease_s"])
        settings = {**defaults, **tuned}
        # heartbeat_s 0 means lease_s / 3: follow the tuned lease as the library would.
        settings["heartbeat_s"] = tuned["lease_s"] / 3
        found.append(Variant("tuned", settings,
                             {f"LIVINGAI_{k.upper()}": str(v) for k, v in tuned.items()}))
    return tuple(found)


@dataclass(frozen=True)
class Config:
    faults: tuple[str, ...]
    variants: tuple[Variant, ...]
    stores: tuple[str, ...]
    executions: dict[str, int]  # per fault kind
    window: int  # executions in flight at once
    workers: int
    concurrency: int  # pool children per step worker: agents = workers x concurrency
    step_ms: tuple[float, float]
    checkpoints: int  # lai.checkpoint() calls in each of research and draft
    kill_every_s: tuple[float, float]
    kill_limit: int  # per run
    stop_gap_s: tuple[float, float]  # between a SIGCONT and the next SIGSTOP
    stop_limit: int
    outage_after_s: float  # from the first start to the cut
    store_outage_s: float
    broker_outage_s: float
    deadline_s: float  # one run, faults and drain included
    alone_executions: int  # Celery-alone comparison
    alone_kills: int
    alone_drain_s: float
    seed: int
    broker: str = "redis"  # or "rabbitmq" (BROKERS)
    # False: the recovery tick has a queue and a worker of its own (recommended). True: beat
    # sends it to the step queue, where the step workers pick it up between steps.
    recovery_on_step_queue: bool = False


def config_of(ctx: RunContext) -> Config:
    quick = ctx.quick
    opts = ctx.options
    wanted = ctx.stores or ["redis"]
    stores = tuple(k for k in CHAOS_KINDS if k in wanted) or ("redis",)
    faults = opts.get("faults") or FAULT_KINDS
    if isinstance(faults, str):
        faults = parse_faults(faults)
    n = opts.get("executions")
    concurrency = int(opts.get("concurrency", 1))
    # Enough executions that the load outlasts the faults (~1-2 executions/s here): a kill
    # every 4-8 s, three pauses of ~20 s, an outage from 10 s to 70 s; quick: a few faults.
    per_fault = {"sigkill-child": 24 if quick else 100, "sigkill-worker": 24 if quick else 100,
                 "sigstop": 16 if quick else 80, "store-outage": 30 if quick else 80,
                 "broker-outage": 30 if quick else 60}
    return Config(
        faults=tuple(faults),
        variants=_variants(ctx),
        stores=stores if not quick else stores[:1],
        executions={k: int(n) if n is not None else v for k, v in per_fault.items()},
        # At least one execution in flight per agent, so every pool child has work.
        window=max(6 if quick else 9, 3 * concurrency),
        workers=3,
        concurrency=concurrency,
        step_ms=(100.0, 500.0) if quick else (200.0, 1000.0),
        checkpoints=2,
        kill_every_s=(2.0, 4.0) if quick else (4.0, 8.0),
        kill_limit=4 if quick else 30,
        stop_gap_s=(2.0, 4.0) if quick else (5.0, 10.0),
        stop_limit=1 if quick else 3,
        outage_after_s=4.0 if quick else 10.0,
        store_outage_s=float(opts.get("store_outage_s", 8.0 if quick else 60.0)),
        broker_outage_s=float(opts.get("broker_outage_s", 8.0 if quick else 30.0)),
        deadline_s=float(opts.get("deadline_s", 300 if quick else 1200)),
        alone_executions=8 if quick else 30,
        alone_kills=2 if quick else 3,
        alone_drain_s=6.0 if quick else 45.0,
        seed=int(opts.get("seed", 20240601)),
        recovery_on_step_queue=bool(opts.get("recovery_on_step_queue", False)),
        broker=str(opts.get("broker", "redis")),
    )
