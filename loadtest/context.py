"""RunContext: everything a workload module gets, and the one helper most of them need.

A workload is a module of the loadtest package with

    NAME: str                  its name on the command line (--only NAME)
    DESCRIPTION: str           one line, shown by `python -m loadtest list`
    def run(ctx: RunContext) -> dict

and returns {"description": str, "params": {...}, "rows": {row label: row}}, where a row is
what `measure()` returns: {"store": kind, "ours": {figure: value}, "livingai": {...} or None,
"livingai_note" / "<impl>_error": why one is missing, "ratio": {figure: ours/livingai}}.
Rows in that shape appear in the results table and the chart; anything else a workload
returns goes into the JSON file as it is.
"""

from __future__ import annotations

import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import baseline, ours
from .figures import compute, compute_floor, percentile, ratios
from .plan import Plan
from .progress import Progress, Task
from .readback import read_back
from .runs import RunRecord
from .targets import LIVINGAI_KINDS, Servers, Target, provision

__all__ = ["RunContext"]


@dataclass
class RunContext:
    quick: bool  # shrink every count ~10x (CI smoke run): figures are not meaningful then
    stores: list[str]  # store kinds to run, in order; unreachable ones already removed
    results_dir: Path  # this run's folder: JSON, chart, SQLite files (removed after use)
    progress: Progress
    baseline: bool = True  # also run livingai 0.4.1 with the same inputs
    run_tag: str = "000000"  # makes every Redis prefix / schema / id of this run unique
    servers: Servers = field(default_factory=Servers)
    # Our engine's settings for the whole run (--unencoded-max-mib); a workload's own
    # ours_kwargs win over them.
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def log(self, text: str) -> None:
        self.progress.message(text)

    def namespace(self, workload: str, kind: str, impl: str, row: str = "") -> str:
        """A name unique to this run and target: Redis prefix, PostgreSQL schema, id prefix."""
        tail = f"_{row}" if row else ""
        return f"lt_{self.run_tag}_{workload}_{kind}_{impl}{tail}"

    def measure(
        self,
        workload: str,
        kind: str,
        plan: Plan,
        *,
        row: str = "",
        ours_kwargs: dict[str, Any] | None = None,
        livingai_kwargs: dict[str, Any] | None = None,
        hot_reads: int = 0,
    ) -> dict[str, Any]:
        """Run `plan` on a fresh `kind` store with our engine, then (with the baseline on)
        on another with livingai's, and read both back from one fresh process. A failure
        is recorded in the row as "<impl>_error" (and printed), so one broken store or
        engine does not lose the other figures."""
        out: dict[str, Any] = {"store": kind, "ours": None, "livingai": None}
        label = f"{workload} {kind}{' ' + row if row else ''}"
        impls = ["ours"]
        if not self.baseline:
            out["livingai_note"] = "baseline not run (--no-baseline)"
        elif kind not in LIVINGAI_KINDS:
            out["livingai_note"] = f"livingai 0.4.1 has no {kind} store"
        else:
            impls.append("livingai")
        records: dict[str, RunRecord] = {}
        try:
            with ExitStack() as stack:
                targets = {impl: stack.enter_context(provision(
                    self.servers, self.results_dir, kind, impl,
                    self.namespace(workload, kind, impl, row))) for impl in impls}
                for impl, target in targets.items():
                    try:
                        with self.progress.task(f"{label} {impl}", plan.total) as task:
                            records[impl] = self._run(impl, target, plan, task,
                                                      {**self.engine_kwargs,
                                                       **(ours_kwargs or {})},
                                                      livingai_kwargs, hot_reads)
                    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                        out[f"{impl}_error"] = self._failed(f"{label} {impl}", exc)
                if records:
                    with self.progress.task(f"{label} readback", 1) as task:
                        readbacks = read_back([(impl, targets[impl].spec,
                                                plan.job(targets[impl].ns)) for impl in records])
                        task.advance()
                    for impl, record in records.items():
                        out[impl] = compute(record, readbacks[impl])
        except Exception as exc:  # noqa: BLE001 - provisioning or cleanup failed
            out["ours_error" if "ours" not in records else "cleanup_error"] = self._failed(
                label, exc)
        if out["ours"] and out["livingai"]:
            out["ratio"] = ratios(out["ours"], out["livingai"])
        if plan.think_s <= 0 and plan.agents > 1 and "ours" in records:  # a burst
            out["floor"] = self._floor(label, plan, records["ours"], workload, kind, row)
        return out

    def _floor(self, label: str, plan: Plan, record: RunRecord, workload: str, kind: str,
               row: str) -> dict[str, Any] | None:
        """In a burst, the same threads with a save that only burns our save's median CPU
        time: the share of that held past the budget is the GIL's, not the engine's."""
        cpu = percentile([s.cpu_ms for s in record.samples if s.cpu_ms is not None], 50)
        if cpu is None:
            return None
        try:
            with self.progress.task(f"{label} cpu-only save", plan.total) as task:
                floor = ours.run_floor(plan, self.namespace(workload, kind, "floor", row), task,
                                       cpu)
            return {**compute_floor(floor), "cpu_ms": cpu}
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            self._failed(f"{label} cpu-only save", exc)
            return None

    @staticmethod
    def _run(impl: str, target: Target, plan: Plan, task: Task,
             ours_kwargs: dict[str, Any] | None, livingai_kwargs: dict[str, Any] | None,
             hot_reads: int) -> RunRecord:
        if impl == "ours":
            return ours.run_plan(target.url, plan, target.ns, task, engine_kwargs=ours_kwargs,
                                 hot_reads=hot_reads)
        return baseline.run_plan(target.spec, plan, target.ns, task, hot_reads=hot_reads,
                                 **(livingai_kwargs or {}))

    def _failed(self, what: str, exc: Exception) -> str:
        reason = f"{type(exc).__name__}: {exc}"
        self.log(f"!! {what} failed: {reason}")
        with (self.results_dir / "errors.log").open("a") as fh:
            fh.write(f"== {what}\n{traceback.format_exc()}\n")
        return reason
