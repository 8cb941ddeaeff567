"""Downsampling a metric series for charts (`GET /jobs/{id}/metrics?max_points=`).

Min/max buckets rather than LTTB: the first and last points are kept, the points between are cut
into equal-count buckets and each bucket keeps its lowest and highest point. Every extreme of the
series (a loss spike, the best mAP) survives exactly, which LTTB (it keeps the visually largest
triangles) does not promise; the result is deterministic, linear in the series' length, and the
kept points are real points in their original order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

# First + last + one bucket's min and max: fewer could not keep the extremes.
MIN_POINTS = 4


def min_max(points: Sequence[T], max_points: int, value: Callable[[T], float]) -> list[T]:
    """At most `max_points` of `points` (at least `MIN_POINTS`): the first, the last, and the
    lowest and highest of each bucket between them, in their original order."""
    if max_points < MIN_POINTS:
        raise ValueError(f"max_points must be at least {MIN_POINTS}")
    if len(points) <= max_points:
        return list(points)
    inner = len(points) - 2
    buckets = (max_points - 2) // 2
    kept = [0]
    for b in range(buckets):
        start = 1 + b * inner // buckets
        end = 1 + (b + 1) * inner // buckets
        # NaN compares false both ways: a NaN point is never picked over a number (and a bucket of
        # only NaNs keeps its first one).
        low = min(range(start, end), key=lambda i: (value(points[i]) != value(points[i]), value(points[i])))
        high = max(range(start, end), key=lambda i: (value(points[i]) == value(points[i]), value(points[i])))
        kept.extend(sorted({low, high}))
    kept.append(len(points) - 1)
    return [points[i] for i in kept]
