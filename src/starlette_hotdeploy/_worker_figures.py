"""This worker's figures beyond a loaded version's requests: its operations, drains, canary
analyses, and the request counts of the versions it unloaded; and the snapshot of them all
(_figures.py says why plain numbers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._figures import OPERATION_BUCKETS, Histogram, RequestFigures

if TYPE_CHECKING:
    from ._deployment import Deployment
    from ._version import PackageVersion


class WorkerFigures:
    """This worker's deployments (the operations it coordinated) and drains, and the request
    figures of its unloaded versions: a version's counters go on from there if it is loaded
    again, and its last requests are still reported after it was unloaded."""

    RETIRED_PER_PACKAGE = 10  # unloaded versions whose counts are kept, per package

    def __init__(self) -> None:
        # package -> version -> its counts, oldest first
        self.retired: dict[str, dict[str, RequestFigures]] = {}
        self.deployments: Counter[tuple[str, str, str]] = Counter()  # (package, operation, outcome)
        self.deployment_seconds: dict[tuple[str, str], Histogram] = {}  # (package, operation)
        self.drain_seconds: dict[str, Histogram] = {}
        self.terminated: Counter[str] = Counter()  # requests ended by a drain timeout, per package
        # The analyses of the canaries this worker ran (it coordinated them): (package, version, verdict)
        self.canary_analyses: Counter[tuple[str, str, str]] = Counter()

    def deployment_decided(self, record: Deployment) -> None:
        package = record.package or ""
        operation = record.operation.value
        self.deployments[(package, operation, record.outcome.value)] += 1
        if record.duration_ms is not None:
            histogram = self.deployment_seconds.get((package, operation))
            if histogram is None:
                histogram = self.deployment_seconds[(package, operation)] = Histogram(OPERATION_BUCKETS)
            histogram.observe(record.duration_ms / 1000)

    def drained(self, package: str, seconds: float, terminated: int) -> None:
        histogram = self.drain_seconds.get(package)
        if histogram is None:
            histogram = self.drain_seconds[package] = Histogram(OPERATION_BUCKETS)
        histogram.observe(seconds)
        if terminated:
            self.terminated[package] += terminated

    def canary_analysed(self, package: str, version: str, verdict: str) -> None:
        self.canary_analyses[(package, version, verdict)] += 1

    def unloaded(self, version: PackageVersion) -> None:
        """Keep the counts of a version that is being unloaded."""
        figures, version.figures = version.figures, None  # kept here now, and only once
        if figures is None:
            return
        kept = self.retired.setdefault(version.name, {})
        earlier = kept.pop(version.version, None)
        if earlier is not None:
            figures.add(earlier)
        kept[version.version] = figures  # now the newest
        if len(kept) > self.RETIRED_PER_PACKAGE:
            del kept[next(iter(kept))]

    def snapshot(
        self, worker: str, loaded: Iterable[PackageVersion], canaries: Iterable[dict[str, Any]] = ()
    ) -> dict[str, Any]:
        """Everything this worker would report, as plain JSON-able data. Safe to take from
        another thread when `loaded` is a copy: the rest is copied in one step (under the GIL)
        before it is read.

        `versions`: the loaded versions (the gauges); `requests`: the request counts of every
        version, loaded or kept after its unload (the counters); `canaries`: the running
        canaries as this worker splits them (_canary.canary_gauges), gauges too."""
        versions = []
        counts = {
            (package, version): figures
            for package, kept in list(self.retired.items())
            for version, figures in list(kept.items())
        }
        for version in loaded:
            versions.append(
                {
                    "package": version.name,
                    "version": version.version,
                    "state": version.state.value,
                    "sha256": version.sha256,
                    "in_flight": version.in_flight,
                }
            )
            figures = version.figures
            if figures is not None:
                key = (version.name, version.version)
                kept = counts.get(key)
                if kept is not None:  # loaded again after an unload: its counts go on
                    figures = RequestFigures.sum(kept, figures)
                counts[key] = figures
        return {
            "worker": worker,
            "stopped": False,
            "versions": versions,
            "requests": [{"package": p, "version": v, **c.to_dict()} for (p, v), c in counts.items()],
            "deployments": [[*key, count] for key, count in list(self.deployments.items())],
            "deployment_seconds": [[*key, h.to_dict()] for key, h in list(self.deployment_seconds.items())],
            "drain_seconds": [[key, h.to_dict()] for key, h in list(self.drain_seconds.items())],
            "terminated": dict(self.terminated),
            "canaries": list(canaries),
            "canary_analyses": [[*key, count] for key, count in list(self.canary_analyses.items())],
        }
