"""The waits benchmark's settings: counts, fleet shape, time bounds; full and --quick."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

from ..cli import positive_int
from ..core.context import RunContext
from ..core.stores import STORE_KINDS

__all__ = ["Config", "config_of", "add_options", "STORE_ORDER"]

# Redis first (the store most deployments of waits would use), while the machine is freshest.
STORE_ORDER = ("redis", "postgres", "tiered", "sqlite")


@dataclass(frozen=True)
class Config:
    executions: int  # executions waiting at once
    stores: tuple[str, ...]
    workers: int = 2  # step workers (prefork), plus one for the recovery tick, plus beat
    concurrency: int = 2  # pool processes per step worker: the slots a wait must not hold
    start_threads: int = 4  # driver threads calling lai.start / lai.send in parallel
    timeout_s: float = 3600.0  # every wait's timeout (its deadline sits in the lease index)
    latency_samples: int = 200  # sends timed one by one, `send_gap_s` apart
    send_gap_s: float = 0.05
    timers: int = 50  # waits with a short timeout nobody ends: the tick wakes them
    timer_s: float = 5.0  # their timeout
    fresh: int = 20  # fresh executions started to probe for free slots, before and during
    ticks: int = 9  # recovery ticks timed in each state
    create_timeout_s: float = 900.0  # bound on starting them all and seeing them WAITING
    drain_timeout_s: float = 900.0  # bound on resuming them all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def add_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m loadtest.waits`, on top of --quick, --out and --stores."""
    parser.add_argument("--executions", type=positive_int,
                        help="executions waiting at once (default 10000, quick 300)")
    parser.add_argument("--workers", type=positive_int, help="step workers (default 2)")
    parser.add_argument("--concurrency", type=positive_int,
                        help="pool processes per worker (default 2)")
    parser.add_argument("--timeout-s", dest="timeout_s", type=_seconds,
                        help="each wait's timeout, 0 for none (default 3600)")
    parser.add_argument("--latency-samples", dest="latency_samples", type=positive_int,
                        help="sends timed one at a time (default 200, quick 30)")
    parser.add_argument("--ticks", type=positive_int,
                        help="recovery ticks timed per state (default 9)")


def config_of(ctx: RunContext) -> Config:
    """The run's Config from its context (quick, stores) and its own flags."""
    opts = ctx.options
    quick = ctx.quick
    wanted = ctx.stores or (["redis"] if quick else ["redis", "postgres", "tiered"])
    unknown = [s for s in wanted if s not in STORE_KINDS]
    if unknown:
        raise ValueError(f"unknown store {unknown[0]!r}; choose from {', '.join(STORE_KINDS)}")
    cfg: dict[str, Any] = {
        "executions": 300 if quick else 10_000,
        "stores": tuple(k for k in STORE_ORDER if k in wanted),
        "latency_samples": 30 if quick else 200,
        "fresh": 8 if quick else 20,
        "timers": 10 if quick else 50,
        "ticks": 5 if quick else 9,
        "create_timeout_s": 180.0 if quick else 900.0,
        "drain_timeout_s": 180.0 if quick else 900.0,
    }
    for key in ("executions", "workers", "concurrency", "timeout_s", "latency_samples",
                "ticks"):
        if opts.get(key) is not None:
            cfg[key] = opts[key]
    cfg["latency_samples"] = min(cfg["latency_samples"], cfg["executions"])
    return Config(**cfg)
