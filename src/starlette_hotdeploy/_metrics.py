"""Prometheus metrics: a prometheus_client collector over the figures of every worker of the host.

Served by the admin API at `<prefix>/metrics`, and registrable in the host's own registry
(`REGISTRY.register(deployer.metrics)`). Each scrape merges this worker's live figures with the
other workers' shared files (_figures_share.py says which count): one host, one set of series.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._canary_plan import FULL
from ._figures import OPERATION_BUCKETS, REQUEST_BUCKETS, STATUS_CLASSES, Histogram
from ._figures_share import SharedFigures

__all__ = ["HotDeployMetrics"]

Snapshot = dict[str, Any]


class HotDeployMetrics(Collector):
    """The `hotdeploy_*` metrics of every worker of this host (see docs/operations.md, "Metrics")."""

    def __init__(
        self, own: Callable[[], Snapshot | None], shared: Callable[[], SharedFigures | None]
    ) -> None:
        self._own = own
        self._shared = shared

    def snapshots(self) -> list[tuple[Snapshot, bool]]:
        """This worker's snapshot (live) and the other workers' (blocking: reads their files)."""
        found: list[tuple[Snapshot, bool]] = []
        own = self._own()
        if own is not None:
            found.append((own, True))
        shared = self._shared()
        if shared is not None:
            found += shared.others()
        return found

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.snapshots()))


def families(snapshots: list[tuple[Snapshot, bool]]) -> list[Metric]:
    """The metric families of a host, from its workers' snapshots (with whether each is live)."""
    requests = CounterMetricFamily(
        "hotdeploy_requests",
        "HTTP requests served by a package version, by status class.",
        labels=["package", "version", "status"],
    )
    durations = HistogramMetricFamily(
        "hotdeploy_request_duration_seconds",
        "Time from dispatch until the app returned (its response sent), by package version.",
        labels=["package", "version"],
    )
    in_flight = GaugeMetricFamily(
        "hotdeploy_requests_in_flight",
        "Requests, streams and websockets open in a package version (what a drain waits for).",
        labels=["package", "version"],
    )
    info = GaugeMetricFamily(
        "hotdeploy_version_info",
        "A loaded package version, its state and archive digest (always 1).",
        labels=["package", "version", "state", "sha256"],
    )
    workers_in_state = GaugeMetricFamily(
        "hotdeploy_version_workers",
        "How many workers have a package version loaded in that state.",
        labels=["package", "version", "state"],
    )
    deployments = CounterMetricFamily(
        "hotdeploy_deployments",
        "Operations (deploy, rollback, activate, undeploy) by package and outcome.",
        labels=["package", "operation", "outcome"],
    )
    deployment_durations = HistogramMetricFamily(
        "hotdeploy_deployment_duration_seconds",
        "Time from an operation's start to its outcome.",
        labels=["package", "operation"],
    )
    drain_durations = HistogramMetricFamily(
        "hotdeploy_drain_duration_seconds",
        "Time a replaced version took to drain (up to its drain timeout).",
        labels=["package"],
    )
    terminated = CounterMetricFamily(
        "hotdeploy_requests_terminated",
        "Requests, streams and websockets ended by a drain timeout.",
        labels=["package"],
    )
    workers = GaugeMetricFamily("hotdeploy_workers", "Live workers reporting for this host.")
    canary_weight = GaugeMetricFamily(
        "hotdeploy_canary_weight_ratio",
        "The share of users a running canary gets (0..1), on every live worker of the host "
        "(while a step spreads, the lowest).",
        labels=["package", "version"],
    )
    canary_step = GaugeMetricFamily(
        "hotdeploy_canary_step",
        "The step a running canary is at (1 is the first), on the host whose worker runs it.",
        labels=["package", "version"],
    )
    canary_steps = GaugeMetricFamily(
        "hotdeploy_canary_steps",
        "How many steps a running canary's plan has (the last one, 100%, is its promotion).",
        labels=["package", "version"],
    )
    canary_verdict = GaugeMetricFamily(
        "hotdeploy_canary_last_verdict",
        "A running canary's last analysis: 1 for its verdict (pass, fail, inconclusive).",
        labels=["package", "version", "verdict"],
    )
    canary_analyses = CounterMetricFamily(
        "hotdeploy_canary_analyses",
        "Analyses of canaries (about one a second while one runs), by verdict.",
        labels=["package", "version", "verdict"],
    )

    by_class: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(STATUS_CLASSES))
    request_histograms: dict[tuple[str, str], Histogram] = defaultdict(lambda: Histogram(REQUEST_BUCKETS))
    open_: dict[tuple[str, str], int] = defaultdict(int)
    states: dict[tuple[str, str, str], int] = defaultdict(int)
    digests: dict[tuple[str, str, str], str] = {}
    operations: dict[tuple[str, str, str], int] = defaultdict(int)
    operation_histograms: dict[tuple[str, str], Histogram] = defaultdict(lambda: Histogram(OPERATION_BUCKETS))
    drain_histograms: dict[str, Histogram] = defaultdict(lambda: Histogram(OPERATION_BUCKETS))
    ended: dict[str, int] = defaultdict(int)
    weights: dict[tuple[str, str], int] = {}
    steps: dict[tuple[str, str], tuple[int, int]] = {}
    verdicts: dict[tuple[str, str], str] = {}
    analyses: dict[tuple[str, str, str], int] = defaultdict(int)
    live_workers = 0

    for snapshot, live in snapshots:
        live_workers += live
        for r in snapshot.get("requests", ()):
            key = (r["package"], r["version"])
            counts = by_class[key]
            for i, n in enumerate(r["by_class"][: len(counts)]):
                counts[i] += n
            _add(request_histograms[key], r["durations"])
        if live:
            for v in snapshot.get("versions", ()):
                key = (v["package"], v["version"])
                open_[key] += v.get("in_flight", 0)
                states[(*key, v["state"])] += 1
                digests[(*key, v["state"])] = v.get("sha256", "")
            for c in snapshot.get("canaries", ()):
                key = (c["package"], c["version"])
                weights[key] = min(c["weight"], weights.get(key, FULL))
                if "step" in c:  # the worker that runs it
                    steps[key] = (c["step"], c["step_count"])
                    if "verdict" in c:
                        verdicts[key] = c["verdict"]
        for package, operation, outcome, count in snapshot.get("deployments", ()):
            operations[(package, operation, outcome)] += count
        for package, operation, histogram in snapshot.get("deployment_seconds", ()):
            _add(operation_histograms[(package, operation)], histogram)
        for package, histogram in snapshot.get("drain_seconds", ()):
            _add(drain_histograms[package], histogram)
        for package, count in snapshot.get("terminated", {}).items():
            ended[package] += count
        for package, version, verdict, count in snapshot.get("canary_analyses", ()):
            analyses[(package, version, verdict)] += count

    for key, counts in sorted(by_class.items()):
        for status, count in zip(STATUS_CLASSES, counts, strict=True):
            if count:
                requests.add_metric([*key, status], count)
    for key, histogram in sorted(request_histograms.items()):
        durations.add_metric(list(key), histogram.buckets(), histogram.total)
    for key, count in sorted(open_.items()):
        in_flight.add_metric(list(key), count)
    for (package, version, state), count in sorted(states.items()):
        info.add_metric([package, version, state, digests[(package, version, state)]], 1)
        workers_in_state.add_metric([package, version, state], count)
    for operation_key, count in sorted(operations.items()):
        deployments.add_metric(list(operation_key), count)
    for key, histogram in sorted(operation_histograms.items()):
        deployment_durations.add_metric(list(key), histogram.buckets(), histogram.total)
    for package, histogram in sorted(drain_histograms.items()):
        drain_durations.add_metric([package], histogram.buckets(), histogram.total)
    for package, count in sorted(ended.items()):
        terminated.add_metric([package], count)
    workers.add_metric([], live_workers)
    for key, weight in sorted(weights.items()):
        canary_weight.add_metric(list(key), weight / FULL)
    for key, (step, step_count) in sorted(steps.items()):
        canary_step.add_metric(list(key), step)
        canary_steps.add_metric(list(key), step_count)
    for key, verdict in sorted(verdicts.items()):
        canary_verdict.add_metric([*key, verdict], 1)
    for analysis_key, count in sorted(analyses.items()):
        canary_analyses.add_metric(list(analysis_key), count)
    return [
        requests,
        durations,
        in_flight,
        info,
        workers_in_state,
        deployments,
        deployment_durations,
        drain_durations,
        terminated,
        workers,
        canary_weight,
        canary_step,
        canary_steps,
        canary_verdict,
        canary_analyses,
    ]


def _add(histogram: Histogram, shared: dict[str, Any]) -> None:
    """A histogram of a snapshot (`Histogram.to_dict()`), added to `histogram`."""
    histogram.add(list(shared.get("counts", ())), float(shared.get("sum", 0.0)))
