"""zlib-6 (livingai 0.4.1's codec) against zstd-3 (ours) on the 0.77 MB agent state.

Medians of 20 runs each, timed one at a time in this thread with nothing else running, so
it measures the codecs, not contention. "zstd-3 (codec.encode)" is our full encode path:
zstd plus the CRC-32 of the raw bytes and the header.
"""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

import zstandard

from livingai_tasks import Codec, decode, encode

from ..core.state import MB, agent_state

__all__ = ["compare_codecs", "STATE_BYTES"]

STATE_BYTES = int(0.77 * MB)
RUNS = 20


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def compare_codecs(runs: int = RUNS) -> dict[str, Any]:
    state = agent_state(STATE_BYTES, agent=0, step=0)
    zl = zlib.compress(state, 6)
    zs = zstandard.ZstdCompressor(level=3).compress(state)
    ours = encode(state, Codec.ZSTD)
    zstd_c = zstandard.ZstdCompressor(level=3)
    zstd_d = zstandard.ZstdDecompressor()
    rows = {
        "zlib-6": {
            "encode_ms": _median_ms(lambda: zlib.compress(state, 6), runs),
            "decode_ms": _median_ms(lambda: zlib.decompress(zl), runs),
            "ratio": len(state) / len(zl), "bytes": len(zl)},
        "zstd-3": {
            "encode_ms": _median_ms(lambda: zstd_c.compress(state), runs),
            "decode_ms": _median_ms(lambda: zstd_d.decompress(zs), runs),
            "ratio": len(state) / len(zs), "bytes": len(zs)},
        "zstd-3 (codec.encode)": {
            "encode_ms": _median_ms(lambda: encode(state, Codec.ZSTD), runs),
            "decode_ms": _median_ms(lambda: decode(ours), runs),
            "ratio": len(state) / len(ours), "bytes": len(ours)},
    }
    speedup = rows["zlib-6"]["encode_ms"] / rows["zstd-3 (codec.encode)"]["encode_ms"]
    return {"state_bytes": len(state), "runs": runs, "codecs": rows,
            "encode_speedup_zstd_over_zlib": speedup}


def render(result: dict[str, Any]) -> str:
    lines = [f"Codecs on a {result['state_bytes'] / MB:.2f} MB agent state "
             f"(median of {result['runs']}):",
             f"  {'codec':<24}{'encode ms':>10}{'decode ms':>10}{'ratio':>8}{'bytes':>10}"]
    for name, row in result["codecs"].items():
        lines.append(f"  {name:<24}{row['encode_ms']:>10.2f}{row['decode_ms']:>10.2f}"
                     f"{row['ratio']:>8.2f}{row['bytes']:>10}")
    lines.append(f"  zstd-3 (our full encode) is {result['encode_speedup_zstd_over_zlib']:.1f}x "
                 "faster than zlib-6")
    return "\n".join(lines)
