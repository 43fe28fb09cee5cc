"""RunContext: what every workload is given, under `python -m loadtest all` and alone.

A workload is a module with

    NAME: str                  its name on the command line (--only NAME)
    DESCRIPTION: str           one line, shown by `python -m loadtest list`
    def run(ctx: RunContext) -> dict

and returns {"description": str, "params": {...}, "rows": {row label: row}, ...}; a row is
{"store": kind, "ours": {figure: value}, "livingai": {...} or None, "livingai_note" /
"<impl>_error": why one is missing, "ratio": {figure: ours/livingai}}. Rows in that shape
appear in the results table; a workload that brings its own "table" text is shown by it;
anything else goes into results.json as it is.

`main_alone()` is the command line of a workload that also runs by itself (`python -m
loadtest.fleet`, `python -m loadtest.chaos`): it builds the same context from its flags.
"""

from __future__ import annotations

import argparse
import secrets
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .progress import Progress
from .results import RESULTS_ROOT, write_json
from .servers import Servers
from .stores import STORE_KINDS

__all__ = ["RunContext", "main_alone"]


@dataclass
class RunContext:
    quick: bool = False  # shrink every count ~10x (a smoke run): figures are not meaningful
    # Store kinds to run, in order, unreachable ones already removed; None (a stand-alone
    # run without --stores): the workload's own default.
    stores: list[str] | None = None
    results_dir: Path = RESULTS_ROOT  # JSON, chart, logs, SQLite files (removed after use)
    progress: Progress = field(default_factory=Progress)
    baseline: bool = True  # the checkpoint tiers also run livingai 0.4.1 on the same inputs
    run_tag: str = field(default_factory=lambda: secrets.token_hex(3))  # in every name of the run
    servers: Servers = field(default_factory=Servers)
    # Our engine's settings for the whole run (--unencoded-max-mib); a row's own win.
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # a stand-alone run's own flags

    def log(self, text: str) -> None:
        self.progress.message(text)

    def namespace(self, workload: str, kind: str, impl: str, row: str = "") -> str:
        """A name unique to this run and target: Redis prefix, PostgreSQL schema, id prefix."""
        tail = f"_{row}" if row else ""
        return f"lt_{self.run_tag}_{workload}_{kind}_{impl}{tail}"

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        """`<results_dir>/<name>.json`."""
        return write_json(self.results_dir / f"{name}.json", data)

    def failed(self, what: str, exc: Exception) -> str:
        """Say that `what` failed, keep its traceback in errors.log; the reason, for the row."""
        reason = f"{type(exc).__name__}: {exc}"
        self.log(f"!! {what} failed: {reason}")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with (self.results_dir / "errors.log").open("a") as fh:
            fh.write(f"== {what}\n{traceback.format_exc()}\n")
        return reason


def main_alone(name: str, run: Callable[[RunContext], dict[str, Any]],
               add_options: Callable[[argparse.ArgumentParser], None],
               chart: Callable[[Path], Path | None], argv: list[str] | None = None) -> int:
    """`python -m loadtest.<name> [--quick] [--out DIR] [--stores ...] [its own flags]`:
    run the workload, print its table, write `<out>/<name>.json`, then `chart(out)`."""
    parser = argparse.ArgumentParser(prog=f"python -m loadtest.{name}")
    parser.add_argument("--quick", action="store_true", help="small counts, a minute or so")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT,
                        help="results directory (default: loadtest/results/)")
    parser.add_argument("--stores", help="comma-separated store kinds (redis,postgres,...)")
    add_options(parser)
    args = vars(parser.parse_args(argv))
    stores = [s.strip() for s in (args.pop("stores") or "").split(",") if s.strip()]
    unknown = [s for s in stores if s not in STORE_KINDS]
    if unknown:
        parser.error(f"unknown store {unknown[0]!r}; choose from {', '.join(STORE_KINDS)}")
    ctx = RunContext(quick=args.pop("quick"), results_dir=args.pop("out"),
                     stores=stores or None,
                     options={k: v for k, v in args.items() if v is not None})
    result = run(ctx)
    print(result["table"])
    drawn = chart(ctx.results_dir)
    print(f"\nresults: {ctx.results_dir / (name + '.json')}{f', {drawn}' if drawn else ''}")
    return 0
