"""Command line: `python -m loadtest all|list|codecs|markdown`. Bad arguments: one line,
exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import WORKLOADS, load_workload
from .charts import write_charts
from .core.context import RunContext
from .core.machine import describe, load_average
from .core.results import RESULTS_ROOT, write_json
from .core.servers import Servers
from .core.stores import STORE_KINDS, unreachable
from .tiers.codecs import compare_codecs, render
from .tiers.markdown import render_markdown
from .tiers.report import render_targets, render_workload
from .tiers.verdict import check_targets

__all__ = ["main", "positive_int"]


def _names(choices: Sequence[str], what: str) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given; choose from {', '.join(choices)}")
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(names))  # keep order, drop repeats

    return parse


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (counts, sizes), else a clear error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest",
                                     description="Benchmarks of livingai_tasks' CheckpointEngine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{all,list,codecs,markdown}")
    run = sub.add_parser("all", help="run the workloads in order")
    run.add_argument("--quick", action="store_true",
                     help="~10x fewer checkpoints (a smoke run: its figures mean little)")
    run.add_argument("--stores", type=_names(STORE_KINDS, "store"), default=list(STORE_KINDS),
                     help=f"comma-separated, from {','.join(STORE_KINDS)} (default: all)")
    run.add_argument("--only", type=_names(list(WORKLOADS), "workload"), default=list(WORKLOADS),
                     help=f"comma-separated workloads, from {','.join(WORKLOADS)} (default: all)")
    run.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                     help="also run livingai 0.4.1 on the same inputs (default: yes)")
    run.add_argument("--out", type=Path, default=None,
                     help="results folder (default: loadtest/results/<timestamp>/)")
    run.add_argument("--unencoded-max-mib", type=positive_int, default=None, metavar="MIB",
                     help="our engine's unencoded_max_bytes, in MiB (default: the library's, "
                          "256): memory for raw states before a save compresses its own")
    sub.add_parser("list", help="list the workloads and whether each exists yet")
    sub.add_parser("codecs", help="zlib-6 against zstd-3 on the 0.77 MB state")
    md = sub.add_parser("markdown", help="print a results.json as markdown tables")
    md.add_argument("results", type=Path, help="a run's results.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for name in WORKLOADS:
            module = load_workload(name)
            print(f"{name:<12}{module.DESCRIPTION if module else '(not written yet)'}")
        return 0
    if args.command == "codecs":
        print(render(compare_codecs()))
        return 0
    if args.command == "markdown":
        try:
            report = json.loads(args.results.read_text())
        except (OSError, ValueError) as exc:
            print(f"python -m loadtest markdown: cannot read {args.results}: {exc}",
                  file=sys.stderr)
            return 2
        print(render_markdown(report))
        return 0
    return _run_all(args)


def _run_all(args: argparse.Namespace) -> int:
    started = datetime.now(timezone.utc)
    out_dir: Path = args.out or RESULTS_ROOT / started.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    print(f"loadtest: results in {out_dir}; load average {load_start} on "
          f"{describe()['cpu_count']} CPUs{' (quick run)' if args.quick else ''}")
    servers = Servers()
    status = servers.check()
    stores, skipped = [], {}
    for kind in args.stores:
        reason = unreachable(kind, status)
        if reason:
            skipped[kind] = reason
            print(f"skip store {kind}: {reason}")
        else:
            stores.append(kind)
    engine_kwargs = ({} if args.unencoded_max_mib is None
                     else {"unencoded_max_bytes": args.unencoded_max_mib * 2**20})
    if engine_kwargs:
        print(f"loadtest: our engine with {engine_kwargs} (not the library's defaults)")
    ctx = RunContext(quick=args.quick, stores=stores, results_dir=out_dir,
                     baseline=args.baseline, servers=servers, engine_kwargs=engine_kwargs)
    codecs = compare_codecs()
    print(render(codecs))
    results: dict[str, Any] = {}
    skipped_workloads: dict[str, str] = {}
    failed = False
    for name in args.only:
        module = load_workload(name)
        if module is None:
            skipped_workloads[name] = f"{WORKLOADS[name]} does not exist yet"
            print(f"skip workload {name}: {WORKLOADS[name]} does not exist yet")
            continue
        begun = time.monotonic()
        try:
            results[name] = module.run(ctx)
        except Exception as exc:  # noqa: BLE001 - the other workloads still run
            failed = True
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()}
            print(f"!! workload {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        results[name]["elapsed_s"] = time.monotonic() - begun
        failed |= _any_ours_error(results[name])
        print(render_workload(name, results[name]))
    targets = check_targets(results)
    load_end = load_average()
    report: dict[str, Any] = {
        "run": {"started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
                "quick": args.quick, "baseline": args.baseline, "stores": stores,
                "skipped_stores": skipped, "skipped_workloads": skipped_workloads,
                "workloads": list(args.only), "run_tag": ctx.run_tag,
                "engine_kwargs": engine_kwargs,
                "load_average_start": load_start, "load_average_end": load_end,
                "command": " ".join(["python -m loadtest", *(sys.argv[1:] or ["all"])])},
        "machine": describe() | {"servers": servers.versions(status)},
        "codecs": codecs,
        "workloads": results,
        "targets": targets,
    }
    write_json(out_dir / "results.json", report)
    tables = [render_workload(n, r) for n, r in results.items() if "error" not in r]
    summary = "\n\n".join([render(codecs), *tables, render_targets(targets)])
    (out_dir / "summary.txt").write_text(summary + "\n")
    charts = write_charts(out_dir, results,
                          f"{'quick' if args.quick else 'full'} run, load {load_start}")
    print(render_targets(targets) + (" (quick run: not meaningful)" if args.quick else ""))
    print(f"load average: start {load_start}, end {load_end}")
    written = [out_dir / "results.json", out_dir / "summary.txt", *charts]
    print(f"wrote {', '.join(map(str, written))}"
          f"{'' if charts else ' (no chart: pip install -e .[bench])'}")
    return 1 if failed else 0


def _any_ours_error(result: dict[str, Any]) -> bool:
    rows = result.get("rows")
    return isinstance(rows, dict) and any("ours_error" in r for r in rows.values())
