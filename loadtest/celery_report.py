"""What the fleet and chaos workloads share with the suite runner: the context they are given
(or a stand-in when a module runs alone), messages, the results JSON and a plain-text table.

The runner's context (loadtest/context.py RunContext) is read with getattr only: `quick`,
`results_dir` (or `out`), `progress`, `stores`, `run_tag`; so these workloads run under the
suite and alone (`python -m loadtest.fleet`), with the same code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Ctx", "say", "out_dir", "write_json", "table", "median", "percentile", "main",
           "library_state"]

DEFAULT_OUT = Path("loadtest/results")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Ctx:
    """The stand-in context of a stand-alone run."""

    quick: bool = False
    results_dir: Path = DEFAULT_OUT
    progress: Any = None
    stores: list[str] | None = None  # None: the workload's own default
    run_tag: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # command-line overrides


def say(ctx: Any, text: str) -> None:
    progress = getattr(ctx, "progress", None)
    if progress is not None and hasattr(progress, "message"):
        progress.message(text)
    else:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def out_dir(ctx: Any) -> Path:
    """The suite runner's `results_dir`, or `out` of a stand-alone run."""
    out = Path(getattr(ctx, "results_dir", None) or getattr(ctx, "out", None) or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(ctx: Any, name: str, data: dict[str, Any]) -> Path:
    path = out_dir(ctx) / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def library_state() -> dict[str, Any]:
    """Which livingai_tasks was measured: the commit, and its files changed since (the
    library moves while benchmarks run, so figures must say what they measured)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "livingai_tasks")
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "changed_files": [line[3:] for line in changed.splitlines() if line]}


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): with few samples p99 is the maximum, which is
    the honest reading."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats drifting
    return ordered[int(rank) - 1]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return "-" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main(name: str, run: Callable[[Any], dict[str, Any]], argv: list[str] | None,
         add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """`python -m loadtest.<name> [--quick] [--out DIR] [...]`: run, print the table."""
    parser = argparse.ArgumentParser(prog=f"python -m loadtest.{name}")
    parser.add_argument("--quick", action="store_true", help="small counts, a minute or so")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--stores", help="comma-separated store kinds (redis,postgres,...)")
    if add_options is not None:
        add_options(parser)
    args = vars(parser.parse_args(argv))
    stores = args.pop("stores", None)
    ctx = Ctx(quick=args.pop("quick"), results_dir=args.pop("out"),
              stores=stores.split(",") if stores else None,
              options={k: v for k, v in args.items() if v is not None})
    result = run(ctx)
    print(result.get("table", json.dumps(result, indent=2, default=str)))
    print(f"\nresults: {out_dir(ctx) / (name + '.json')}")
    return 0
