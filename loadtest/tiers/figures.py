"""Turn a RunRecord and its readback into the figures the tables, JSON and chart show.

Every figure is a plain number (or None when it does not apply), named with its unit.
FIGURES lists them in display order with a label and what each one means; README.md's
"figures" section is generated from the same meanings.
"""

from __future__ import annotations

from typing import Any

from ..core.stats import percentile
from .runs import RunRecord

__all__ = ["FIGURES", "compute", "compute_floor", "ratios", "BUDGET_MS"]

BUDGET_MS = 50.0

# name -> (label, meaning). Shares are 0..1; "_ms" milliseconds, "_s" seconds.
FIGURES: dict[str, tuple[str, str]] = {
    "saves": ("saves", "checkpoints saved"),
    "held_p50_ms": ("hold p50 ms", "time the agent was held by save(), median (encoding included)"),
    "held_p95_ms": ("hold p95 ms", "95th percentile of the hold"),
    "held_p99_ms": ("hold p99 ms", "99th percentile of the hold"),
    "held_avg_ms": ("hold avg ms", "mean hold"),
    "held_max_ms": ("hold max ms", "longest hold"),
    "save_cpu_p99_ms": ("save cpu p99 ms",
                        "CPU time of the agent's own thread inside save(), 99th percentile "
                        "(ours only): the hold minus it is time spent waiting for the GIL, a "
                        "lock or the store"),
    "within_budget": ("within budget", "share of saves that held the agent <= 50 ms"),
    "durable_at_return": ("durable at return", "share of saves the store had when save() returned"),
    "ack_p50_ms": ("to durable p50 ms", "from the save() call to the store's acknowledgement"),
    "ack_p99_ms": ("to durable p99 ms", "99th percentile of the same"),
    "never_acked": ("never acked", "saves whose write the store never acknowledged"),
    "drain_ms": ("drain ms", "from the last save() returning until every write landed"),
    "total_s": ("total s", "from releasing the agents until every write landed"),
    "cpu_s": ("process CPU s", "CPU time of the whole process over total_s (all threads)"),
    "encode_s": ("encode s", "time spent encoding (compressing) states, summed"),
    "encode_avg_ms": ("encode avg ms", "mean time of one encode"),
    "encode_p50_ms": ("encode p50 ms", "one encode, median (ours: engine histogram estimate)"),
    "encode_p99_ms": ("encode p99 ms", "one encode, 99th percentile (same)"),
    "store_write_p50_ms": ("store write p50 ms", "one store write call (a batch for ours), median"),
    "store_write_p99_ms": ("store write p99 ms", "99th percentile of the same"),
    "batch_avg": ("batch avg", "checkpoints per store write call"),
    "compression": ("compression x", "state bytes / stored blob bytes"),
    "durable": ("durable", "share of checkpoints a fresh process reads back byte-exact"),
    "recovered": ("recovered",
                  "share of agents whose latest() in a fresh process is their last save"),
    "cold_first_ms": ("cold first ms",
                      "fresh process: open store + connect + first latest() + decode"),
    "cold_read_p50_ms": ("cold read p50 ms",
                         "fresh process: load() of a checkpoint (read + decode)"),
    "cold_read_p99_ms": ("cold read p99 ms", "99th percentile of the same"),
    "hot_read_p50_ms": ("hot read p50 ms", "engine.load() of a cached node, decode included"),
    "hot_read_p99_ms": ("hot read p99 ms", "99th percentile of the same"),
    "cache_evictions": ("cache evictions", "hot-cache entries evicted during the run (ours)"),
    "missed": ("missed/dropped", "ours: writes dropped; livingai: save() returned False"),
    "save_errors": ("save errors", "save() raised"),
}


def _share(n: int, total: int) -> float | None:
    return n / total if total else None


def compute_floor(record: RunRecord) -> dict[str, Any]:
    """The hold figures of a cpu-only save's run (ours.run_floor): the rest do not apply."""
    held = [s.held_ms for s in record.samples]
    return {"saves": len(held), "held_p50_ms": percentile(held, 50),
            "held_p95_ms": percentile(held, 95), "held_p99_ms": percentile(held, 99),
            "held_avg_ms": sum(held) / len(held) if held else None,
            "held_max_ms": max(held) if held else None,
            "within_budget": _share(sum(h <= BUDGET_MS for h in held), len(held))}


def compute(record: RunRecord, readback: dict[str, Any]) -> dict[str, Any]:
    samples = record.samples
    held = [s.held_ms for s in samples]
    acked = [(record.acks.times[s.node_id] - s.t_call) * 1000.0
             for s in samples if s.node_id in record.acks.times]
    blob_bytes = sum(s.blob_bytes for s in samples)
    counters = record.engine_metrics.get("counters", {})
    histograms = record.engine_metrics.get("histograms", {})
    encode_hist = histograms.get("checkpoint_encode_ms", {})
    encode_n = encode_hist.get("count") or len(record.encode_ms)
    writes = record.acks.write_ms
    out: dict[str, Any] = {
        "saves": len(samples),
        "held_p50_ms": percentile(held, 50),
        "held_p95_ms": percentile(held, 95),
        "held_p99_ms": percentile(held, 99),
        "held_avg_ms": sum(held) / len(held) if held else None,
        "held_max_ms": max(held) if held else None,
        "save_cpu_p99_ms": percentile([s.cpu_ms for s in samples if s.cpu_ms is not None],
                                      99),
        "within_budget": _share(sum(h <= BUDGET_MS for h in held), len(held)),
        "durable_at_return": _share(sum(s.durable for s in samples), len(samples)),
        "ack_p50_ms": percentile(acked, 50),
        "ack_p99_ms": percentile(acked, 99),
        "never_acked": len(samples) - len(acked),
        "drain_ms": (record.settled - record.saves_done) * 1000.0,
        "total_s": record.settled - record.started,
        "cpu_s": record.cpu_s,
        "encode_s": record.encode_ms_sum / 1000.0 if record.encode_ms_sum is not None else None,
        "encode_avg_ms": (record.encode_ms_sum / encode_n
                          if record.encode_ms_sum is not None and encode_n else None),
        "encode_p50_ms": encode_hist.get("p50", percentile(record.encode_ms, 50)),
        "encode_p99_ms": encode_hist.get("p99", percentile(record.encode_ms, 99)),
        "store_write_p50_ms": percentile(writes, 50),
        "store_write_p99_ms": percentile(writes, 99),
        "batch_avg": (sum(record.acks.batch_sizes) / len(record.acks.batch_sizes)
                      if record.acks.batch_sizes else None),
        "compression": sum(s.state_bytes for s in samples) / blob_bytes if blob_bytes else None,
        "hot_read_p50_ms": percentile(record.hot_read_ms, 50),
        "hot_read_p99_ms": percentile(record.hot_read_ms, 99),
        "cache_evictions": counters.get("checkpoint_cache_evictions"),
        "missed": (counters.get("checkpoint_dropped", 0) if record.impl == "ours"
                   else sum(s.dropped for s in samples)),
        "save_errors": record.save_errors,
    }
    if "error" in readback:
        out.update(durable=None, recovered=None, readback_error=readback["error"])
    else:
        out.update(
            durable=_share(readback["exact"], readback["total"]),
            recovered=_share(readback["latest_ok"], readback["agents"]),
            cold_first_ms=readback["first_ms"],
            cold_read_p50_ms=percentile(readback["read_ms"], 50),
            cold_read_p99_ms=percentile(readback["read_ms"], 99),
            readback_found=readback["found"],
            readback_failures=readback["failures"],
        )
    if not record.settled_ok:
        out["drain_timed_out"] = True
    if record.first_error:
        out["first_error"] = record.first_error
    if record.notes:
        out["notes"] = record.notes
    out["wall_p99_ms"] = percentile([s.wall_ms for s in samples], 99)
    out["engine_counters"] = counters
    out["engine_histograms"] = histograms
    return out


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """ours / livingai for every figure both have as a number (None where livingai is 0)."""
    out: dict[str, float | None] = {}
    for name in FIGURES:
        a, b = ours.get(name), theirs.get(name)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out[name] = a / b if b else None
    return out
