"""What a worker counts for its metrics: plain numbers, cheap to add to on the request path.

No Prometheus client object is touched per request: a labelled child's lookup and a histogram's
locked observe would cost more than the rest of the dispatch. A version's requests are counted in
the `RequestFigures` on the version itself (the event loop is one thread, so no lock); this
worker's deployments and drains in its `WorkerFigures` (_worker_figures.py). They become metric
families only when scraped (_metrics.py), from a snapshot: a plain dict, the same one that is
shared with the other workers of the host (_figures_share.py).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# prometheus_client's default buckets (seconds): requests.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# Deployments and drains take from milliseconds to minutes.
OPERATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bucket's bound is inclusive (`le`)
        self.total += value

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's counts (of the same bounds) and sum."""
        if len(counts) != len(self.counts):
            return  # another release's bounds (a file of an older worker): not comparable
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += total

    def buckets(self) -> list[tuple[str, float]]:
        """The exposition's cumulative buckets: (`le`, count), the last one "+Inf"."""
        found: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*(repr(float(b)) for b in self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            found.append((bound, cumulative))
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


class RequestFigures:
    """One loaded version's HTTP requests in this worker: counts by status class and durations
    (from dispatch until the app returned). `PackageVersion.serve` observes each request."""

    __slots__ = ("by_class", "durations")

    def __init__(self) -> None:
        self.by_class = [0, 0, 0, 0, 0]
        self.durations = Histogram(REQUEST_BUCKETS)

    def observe(self, status: int, seconds: float) -> None:
        index = status // 100 - 1
        self.by_class[index if 0 <= index <= 4 else 4] += 1
        durations = self.durations  # Histogram.observe, inlined: this runs for every request
        durations.counts[bisect_left(durations.bounds, seconds)] += 1
        durations.total += seconds

    def add(self, other: RequestFigures) -> None:
        self.by_class = [a + b for a, b in zip(self.by_class, other.by_class, strict=True)]
        self.durations.add(other.durations.counts, other.durations.total)

    @classmethod
    def sum(cls, *figures: RequestFigures) -> RequestFigures:
        total = cls()
        for other in figures:
            total.add(other)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"by_class": list(self.by_class), "durations": self.durations.to_dict()}
