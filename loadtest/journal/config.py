"""The journal benchmark's settings: agents, counts, stores and the workers' settings; full
and --quick. The library's defaults are read from `livingai_tasks.Settings()`, never copied."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import livingai_tasks as lai

from ..cli import positive_int
from ..core.context import RunContext
from ..core.stores import STORE_KINDS
from .agents import AGENT_KINDS, pydantic_available

__all__ = ["Config", "config_of", "add_options", "STORE_ORDER", "QUICK_SETTINGS"]

STORE_ORDER = ("redis", "postgres", "tiered", "sqlite")
# --quick only: a short lease and tick, so a kill is noticed in seconds and the run fits in
# a minute. A full run keeps the library's defaults unless --lease-s / --recovery-interval-s.
QUICK_SETTINGS = {"lease_s": 3.0, "recovery_interval_s": 1.0, "stuck_after_s": 10.0}


@dataclass(frozen=True)
class Config:
    stores: tuple[str, ...]
    agents: tuple[str, ...]  # agent kinds (agents.py): core and, with Pydantic AI, pydantic
    calls: int  # model calls per agent run, in the overhead runs
    rounds: int  # overhead rounds: each runs every agent journaled and plain (order alternates)
    resumes: int  # kill-and-resume runs per agent kind and store
    resume_calls: int = 15  # model calls of the agent that is killed
    kill_after: int = 10  # killed once this many model calls are recorded
    workers: int = 2  # step workers, -c 1 each: one is killed, the other resumes
    settings: dict[str, float] = dataclasses.field(default_factory=dict)  # set for workers
    run_timeout_s: float = 120.0  # bound on one agent run, and on one resume

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def in_force(self) -> dict[str, float]:
        """The settings the workers run with: the defaults, with this run's on top (as the
        library resolves them: heartbeat_s follows lease_s)."""
        overrides: dict[str, Any] = dict(self.settings)
        resolved = dataclasses.asdict(lai.Settings(**overrides))
        return {k: float(resolved[k]) for k in ("lease_s", "heartbeat_s", "recovery_interval_s",
                                                "worker_beat_s", "worker_ttl_s", "stuck_after_s")}

    def env(self) -> dict[str, str]:
        return {f"LIVINGAI_{k.upper()}": str(v) for k, v in self.settings.items()}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _agents(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in AGENT_KINDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown agent {unknown[0] if unknown else text!r}; choose from "
            f"{', '.join(AGENT_KINDS)}")
    return names


def add_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m loadtest.journal`, on top of --quick, --out and --stores."""
    parser.add_argument("--agents", type=_agents,
                        help=f"comma-separated, from {','.join(AGENT_KINDS)} (default: both; "
                             "pydantic needs the pydantic-ai extra)")
    parser.add_argument("--calls", type=positive_int,
                        help="model calls per agent run in the overhead rounds (default 50)")
    parser.add_argument("--rounds", type=positive_int, help="overhead rounds (default 20, quick 2)")
    parser.add_argument("--resumes", type=positive_int,
                        help="kill-and-resume runs per agent and store (default 5, quick 1)")
    parser.add_argument("--lease-s", dest="lease_s", type=_seconds,
                        help="the workers' lease (default: the library's)")
    parser.add_argument("--recovery-interval-s", dest="recovery_interval_s", type=_seconds,
                        help="the recovery tick's interval (default: the library's)")


def config_of(ctx: RunContext) -> Config:
    """The run's Config from its context (quick, stores) and its own flags."""
    opts = ctx.options
    quick = ctx.quick
    wanted = ctx.stores or (["redis"] if quick else ["redis", "postgres"])
    unknown = [s for s in wanted if s not in STORE_KINDS]
    if unknown:
        raise ValueError(f"unknown store {unknown[0]!r}; choose from {', '.join(STORE_KINDS)}")
    agents = opts.get("agents") or tuple(
        k for k in AGENT_KINDS if k != "pydantic" or pydantic_available())
    if "pydantic" in agents and not pydantic_available():
        raise ValueError("agent 'pydantic' needs Pydantic AI: pip install "
                         "'livingai-tasks[pydantic-ai]', or pass --agents core")
    settings = dict(QUICK_SETTINGS) if quick else {}
    for key in ("lease_s", "recovery_interval_s"):
        if opts.get(key) is not None:
            settings[key] = float(opts[key])
    return Config(stores=tuple(k for k in STORE_ORDER if k in wanted), agents=tuple(agents),
                  calls=opts.get("calls") or (20 if quick else 50),
                  rounds=opts.get("rounds") or (2 if quick else 20),
                  resumes=opts.get("resumes") or (1 if quick else 5),
                  settings=settings, run_timeout_s=60.0 if quick else 120.0)
