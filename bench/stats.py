"""Summaries of samples: the numbers every workload reports. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (p99 of 5 samples is the max)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    if n == 0:
        raise ValueError("no samples")
    middle = n // 2
    if n % 2:
        return sorted_values[middle]
    return (sorted_values[middle - 1] + sorted_values[middle]) / 2


def summarize_ms(samples_ns: Sequence[int]) -> dict[str, Any]:
    """{n, median_ms, p99_ms, min_ms, max_ms, mean_ms} of nanosecond samples;
    {n: 0} when there are none."""
    return summarize([s / 1e6 for s in samples_ns], unit="ms")


def summarize(values: Sequence[float], unit: str) -> dict[str, Any]:
    """{n, median_<unit>, p99_<unit>, min, max, mean}; {n: 0} when there are none."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        f"median_{unit}": round(median(ordered), 4),
        f"p99_{unit}": round(percentile(ordered, 0.99), 4),
        f"min_{unit}": round(ordered[0], 4),
        f"max_{unit}": round(ordered[-1], 4),
        f"mean_{unit}": round(sum(ordered) / len(ordered), 4),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)
