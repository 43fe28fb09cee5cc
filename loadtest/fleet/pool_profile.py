"""`python -m loadtest.fleet.pool_profile`: where the fleet's pool children spend their
Python CPU, part by part, in ms per step, for the tuned and the livingai variants side by
side (issue 22's profile, repeatable).

It runs one fleet batch of each variant (`python -m loadtest.fleet ... --rounds 1`) and
meanwhile samples the pool children of whichever variant is busy with py-spy, `record
--gil`: only the thread holding the GIL, so Python's CPU and not its waits (a wall-clock
sample counts a step waiting on a busy server as the step's own time). Each sample counts
for the first part whose marker its stack holds (PARTS); a part's share of a variant's
samples times the variant's pool CPU per step (the batch's own /proc figures) gives its ms
per step. The raw samples stay in `--out` for a closer look.

Read the parts within a variant, not across: a sample sees only the thread holding the GIL,
and a variant whose children spend more CPU without it (system calls, zlib and zstd on large
buffers) has every part scaled up by that share. A second table gives the same windows' CPU
by thread from /proc (main thread and other threads, user and system time), which counts it.

    python -m loadtest.fleet.pool_profile [--store redis] [--work noop] [--chains 2500]
                                          [--seconds 6] [--windows 2] [--out DIR]

Needs py-spy (`pip install py-spy`) and leave to ptrace the pool children (root, or
kernel.yama.ptrace_scope = 0). Run it on a quiet machine: the figures are shares of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..core.process_cpu import cpu_seconds, thread_seconds
from .processes import children_of

__all__ = ["PARTS", "part_of", "count_parts", "main"]

# (part, a marker of its frames), first match wins: a step's entry, body and publish all run
# inside Celery's trace_task, so the specific parts come before the general ones.
PARTS = (
    ("writer thread", "Writer._supervised_loop"),
    ("other threads", "Thread._bootstrap_inner"),
    ("entry (task_prerun)", "_on_prerun"),
    ("outcome", "StepTask._recorded"),
    ("body", "loadtest/fleet/app.py"),
    ("publishing the next step", "_dispatch_callbacks_and_chain"),
    ("Celery's result", "mark_as_done"),
    ("rest of Celery's trace", "trace_task"),
    ("pool loop", "workloop"),
)
OTHER = "other"
# The variants compared, by their workers' LT_MODE, and their key in the fleet's results.
_VARIANTS = {"plain-tuned": "tuned_parts_ms", "lai": "lai_parts_ms"}


def part_of(stack: str) -> str:
    """The part a py-spy stack (frames joined by ';') counts for."""
    return next((name for name, marker in PARTS if marker in stack), OTHER)


def count_parts(lines: Iterable[str]) -> Counter[str]:
    """Samples per part from py-spy's raw format: one 'stack count' per line."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            counts[part_of(stack)] += int(count)
    return counts


def _mode(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [item[len(b"LT_MODE="):].decode() for item in environ if item.startswith(b"LT_MODE=")]
    return found[0] if found else None


def _pool_children() -> dict[str, list[int]]:
    """The pool children of each variant's running workers, by LT_MODE."""
    out: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        mode = _mode(int(entry.name)) if b"celery" in cmdline and b"worker" in cmdline else None
        if mode in _VARIANTS:
            out.setdefault(mode, []).extend(children_of(int(entry.name)))
    return out


def _busiest() -> tuple[str, list[int]] | None:
    """The variant whose pool children used the most CPU over the next second, if they
    used at least a fifth of a core."""
    before = _pool_children()
    spent = {mode: sum(cpu_seconds(pid) or 0.0 for pid in pids) for mode, pids in before.items()}
    time.sleep(1.0)
    used = {mode: sum(cpu_seconds(pid) or 0.0 for pid in pids) - spent[mode]
            for mode, pids in before.items()}
    mode = max(used, key=lambda m: used[m], default=None)
    return (mode, before[mode]) if mode is not None and used[mode] >= 0.2 else None


def _threads(pids: list[int]) -> Counter[str]:
    total: Counter[str] = Counter()
    for pid in pids:
        total.update(thread_seconds(pid))
    return total


def _sample(fleet: subprocess.Popen[bytes], out: Path, seconds: float,
            windows: int) -> dict[str, Counter[str]]:
    """While the fleet runs: `windows` py-spy windows of `seconds` on each variant's pool
    children, once that variant is busy. Returns the CPU seconds each variant's children
    spent meanwhile, by thread kind (thread_seconds): real CPU, where py-spy's samples only
    see who holds the GIL."""
    taken: Counter[str] = Counter()
    spent: dict[str, Counter[str]] = {mode: Counter() for mode in _VARIANTS}
    while fleet.poll() is None and any(taken[m] < windows for m in _VARIANTS):
        busy = _busiest()
        if busy is None or taken[busy[0]] >= windows:
            continue
        mode, pids = busy
        before = _threads(pids)
        spies = [subprocess.Popen(
            ["py-spy", "record", "--gil", "--nonblocking", "--format", "raw", "-r", "200",
             "-d", f"{seconds:g}", "-p", str(pid),
             "-o", str(out / f"{mode}-{taken[mode]}-{pid}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]
        for spy in spies:
            spy.wait()
        after = _threads(pids)
        spent[mode].update({kind: after[kind] - before[kind] for kind in after})
        taken[mode] += 1
        print(f"[pool_profile] sampled {mode} window {taken[mode]} ({len(pids)} children)",
              flush=True)
    return spent


def threads_table(spent: dict[str, Counter[str]], pool_ms: dict[str, float]) -> str:
    """Each thread kind's share of a variant's pool CPU in the sampled windows, in ms per
    step (the share times the batch's pool CPU per step)."""
    rows = [f"{'thread':28} {'tuned':>8} {'livingai':>9} {'added':>8}   (ms of CPU per step)"]
    for kind in ("main user", "main sys", "threads user", "threads sys"):
        ms = {mode: spent[mode][kind] / total * pool_ms[mode]
              if (total := sum(spent[mode].values())) else 0.0 for mode in _VARIANTS}
        rows.append(f"{kind:28} {ms['plain-tuned']:8.3f} {ms['lai']:9.3f} "
                    f"{ms['lai'] - ms['plain-tuned']:+8.3f}")
    return "\n".join(rows)


def _table(out: Path, pool_ms: dict[str, float]) -> str:
    counts = {mode: count_parts(line for path in out.glob(f"{mode}-*.txt")
                                for line in path.read_text().splitlines())
              for mode in _VARIANTS}
    totals = {mode: sum(c.values()) for mode, c in counts.items()}
    rows = [f"{'part':28} {'tuned':>8} {'livingai':>9} {'added':>8}   (ms of Python CPU per step)"]
    for name in [*(n for n, _ in PARTS), OTHER]:
        ms = {mode: counts[mode][name] / totals[mode] * pool_ms[mode] if totals[mode] else 0.0
              for mode in _VARIANTS}
        rows.append(f"{name:28} {ms['plain-tuned']:8.3f} {ms['lai']:9.3f} "
                    f"{ms['lai'] - ms['plain-tuned']:+8.3f}")
    rows.append(f"{'samples':28} {totals['plain-tuned']:8d} {totals['lai']:9d}")
    rows.append(f"{'pool CPU ms per step':28} {pool_ms['plain-tuned']:8.3f} {pool_ms['lai']:9.3f}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="redis", help="one store kind (default redis)")
    parser.add_argument("--work", default="noop", help="one fleet work (default noop)")
    parser.add_argument("--chains", type=int, default=2500,
                        help="chains per batch (default 2500: long enough to sample)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of a window")
    parser.add_argument("--windows", type=int, default=2, help="windows per variant")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the samples and the fleet's results go (default: a "
                             "new temporary folder, kept)")
    args = parser.parse_args()
    if args.chains < 1 or args.seconds <= 0 or args.windows < 1:
        parser.error("--chains and --windows take a number >= 1, --seconds one > 0")
    if shutil.which("py-spy") is None:
        parser.error("py-spy is not on PATH: pip install py-spy")
    out = args.out or Path(tempfile.mkdtemp(prefix="lt-pool-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    fleet = subprocess.Popen(
        [sys.executable, "-m", "loadtest.fleet", "--stores", args.store, "--works", args.work,
         "--chains", str(args.chains), "--rounds", "1", "--out", str(out)],
        env={**os.environ})
    try:
        spent = _sample(fleet, out, args.seconds, args.windows)
    finally:
        if fleet.wait() != 0:
            sys.exit(f"the fleet run failed (exit {fleet.returncode}); samples in {out}")
    row = json.loads((out / "fleet.json").read_text())["rows"][f"{args.store} {args.work}"]
    pool_ms = {mode: float(row["ours"][key]["pool"]) for mode, key in _VARIANTS.items()}
    print(f"\npool children of `--stores {args.store} --works {args.work} --chains "
          f"{args.chains}`, py-spy --gil, {args.windows} x {args.seconds:g} s per variant:")
    print(_table(out, pool_ms))
    print("\nthe same windows' CPU by thread (/proc: what the samples cannot see, time "
          "outside the GIL, counts here):")
    print(threads_table(spent, pool_ms))
    print(f"\nsamples and the fleet's results: {out}")


if __name__ == "__main__":
    main()
