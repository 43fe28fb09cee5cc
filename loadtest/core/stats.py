"""Percentiles, medians and the spread of a few repetitions, for every workload."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["percentile", "median", "spread"]


def percentile(values: Sequence[float], q: float, *, nearest_rank: bool = False
               ) -> float | None:
    """The q-th percentile (q in 0..100) of exact samples; None if there are none.

    By default interpolated linearly between the two nearest samples: the checkpoint tiers
    have hundreds to thousands of saves per row. `nearest_rank=True` returns a sample that
    was measured (the smallest with at least q % of the samples at or below it): the chaos
    run has tens of resumes, and there its p99 is the slowest one, which is the honest
    reading.
    """
    if not values:
        return None
    data = sorted(values)
    if nearest_rank:
        rank = max(1, -(-len(data) * q // 100))  # ceil without floats drifting
        return data[int(rank) - 1]
    position = q / 100.0 * (len(data) - 1)
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def spread(values: list[float]) -> dict[str, Any]:
    """Median, p10/p90, min, max: the spread of a few repetitions."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": median(values), "min": min(values),
            "max": max(values), "p10": percentile(values, 10, nearest_rank=True),
            "p90": percentile(values, 90, nearest_rank=True)}
