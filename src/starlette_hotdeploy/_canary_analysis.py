"""A canary step's analysis: the canary against the stable version on the traffic of that step.

Each worker reports the request figures (_figures.py) of both versions, counted since they were
loaded there; the coordinator adds up every worker's and subtracts what they had at the start of
the step. The built-in analysis compares the 5xx share and a latency quantile against the plan's
thresholds; `hotdeploy_analyze_canary` implementations may fail a step too, or keep it waiting.

    fail           any analysis failed: the canary is aborted at once
    inconclusive   not enough requests yet, or an implementation abstained: stay and wait
    pass           the built-in analysis and every implementation that answered passed
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import pluggy

from ._canary_plan import CanaryStep, Thresholds
from ._figures import REQUEST_BUCKETS
from ._hooks import plugin_label
from ._loader import describe, is_cancellation


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class SideFigures:
    """One version's HTTP requests in a step, over every worker."""

    by_class: tuple[int, ...] = (0, 0, 0, 0, 0)  # 1xx..5xx
    durations: tuple[int, ...] = (0,) * (len(REQUEST_BUCKETS) + 1)  # per bucket, last +Inf

    @classmethod
    def from_report(cls, data: dict[str, Any] | None) -> SideFigures:
        """A RequestFigures.to_dict(), as a worker reported it."""
        if not data:
            return cls()
        counts = tuple(int(c) for c in data["durations"]["counts"])
        if len(counts) != len(REQUEST_BUCKETS) + 1:
            return cls()  # another release's buckets: not comparable
        return cls(tuple(int(c) for c in data["by_class"]), counts)

    def __add__(self, other: SideFigures) -> SideFigures:
        return SideFigures(
            tuple(a + b for a, b in zip(self.by_class, other.by_class, strict=True)),
            tuple(a + b for a, b in zip(self.durations, other.durations, strict=True)),
        )

    def since(self, earlier: SideFigures) -> SideFigures:
        """What was counted after `earlier`; all of it if the counts went down (restarted)."""
        if any(a < b for a, b in zip(self.by_class, earlier.by_class, strict=True)):
            return self
        return SideFigures(
            tuple(a - b for a, b in zip(self.by_class, earlier.by_class, strict=True)),
            tuple(max(0, a - b) for a, b in zip(self.durations, earlier.durations, strict=True)),
        )

    @property
    def requests(self) -> int:
        return sum(self.by_class)

    @property
    def errors(self) -> int:
        return self.by_class[4]

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """Seconds, interpolated inside the bucket (as Prometheus' histogram_quantile does)."""
        total = sum(self.durations)
        if total == 0:
            return None
        rank = q * total
        cumulative = 0
        lower = 0.0
        for bound, count in zip((*REQUEST_BUCKETS, None), self.durations, strict=True):
            if count and cumulative + count >= rank:
                if bound is None:
                    return REQUEST_BUCKETS[-1]  # beyond the last bound: that bound, at least
                return lower + (bound - lower) * (rank - cumulative) / count
            cumulative += count
            if bound is not None:
                lower = bound
        return REQUEST_BUCKETS[-1]

    def to_dict(self, q: float) -> dict[str, Any]:
        latency = self.quantile(q)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            f"p{q * 100:g}_ms": round(latency * 1000, 3) if latency is not None else None,
        }


@dataclass(frozen=True, slots=True)
class StepFigures:
    """Both versions' figures in a step: what an analysis decides on."""

    stable: SideFigures
    canary: SideFigures

    @classmethod
    def from_reports(cls, reports: Iterable[dict[str, Any]]) -> StepFigures:
        stable, canary = SideFigures(), SideFigures()
        for report in reports:
            stable += SideFigures.from_report(report.get("stable"))
            canary += SideFigures.from_report(report.get("canary"))
        return cls(stable, canary)

    def since(self, earlier: StepFigures) -> StepFigures:
        return StepFigures(self.stable.since(earlier.stable), self.canary.since(earlier.canary))

    def to_dict(self, q: float) -> dict[str, Any]:
        return {"stable": self.stable.to_dict(q), "canary": self.canary.to_dict(q)}


def builtin_analysis(figures: StepFigures, thresholds: Thresholds) -> tuple[Verdict, str]:
    canary, stable = figures.canary, figures.stable
    if canary.requests < thresholds.min_requests:
        return Verdict.INCONCLUSIVE, f"{canary.requests} of {thresholds.min_requests} canary requests needed"
    excess = canary.error_rate - stable.error_rate
    if excess > thresholds.max_error_rate:
        return Verdict.FAIL, (
            f"5xx share {canary.error_rate:.1%} on the canary against {stable.error_rate:.1%} on the "
            f"stable version (at most {thresholds.max_error_rate:.1%} more allowed)"
        )
    q = thresholds.quantile
    name = f"p{q * 100:g}"
    ours, theirs = canary.quantile(q), stable.quantile(q)
    if stable.requests >= thresholds.min_requests and ours is not None and theirs is not None:
        ratio = ours / theirs if theirs > 0 else 1.0
        if ratio > thresholds.max_latency_ratio:
            return Verdict.FAIL, (
                f"{name} latency {ours * 1000:.1f} ms on the canary, {ratio:.2f}x the stable version's "
                f"{theirs * 1000:.1f} ms (at most {thresholds.max_latency_ratio:g}x allowed)"
            )
    return (
        Verdict.PASS,
        f"5xx share {canary.error_rate:.1%} (stable {stable.error_rate:.1%}), {name} within bounds",
    )


async def analyze(
    managers: Sequence[pluggy.PluginManager],
    package: str,
    step: CanaryStep,
    figures: StepFigures,
    thresholds: Thresholds,
    *,
    timeout: float,
) -> tuple[Verdict, str]:
    """The built-in analysis, then every `hotdeploy_analyze_canary` implementation."""
    verdict, reason = builtin_analysis(figures, thresholds)
    if verdict is Verdict.FAIL:
        return verdict, reason
    reasons = [reason]
    kwargs = {"package": package, "stable": figures.stable, "canary": figures.canary, "step": step}
    for pm in managers:
        for impl in reversed(pm.hook.hotdeploy_analyze_canary.get_hookimpls()):
            label = f"{plugin_label(pm, impl)}.hotdeploy_analyze_canary"
            try:
                with anyio.fail_after(timeout):
                    result = impl.function(**{name: kwargs[name] for name in impl.argnames})
                    if inspect.isawaitable(result):
                        result = await result
            except TimeoutError:
                return Verdict.FAIL, f"analysis {label} did not answer within {timeout:g}s"
            except BaseException as exc:
                if is_cancellation(exc):
                    raise
                return Verdict.FAIL, f"analysis {label} raised {describe(exc)}"
            if result is None:
                verdict = Verdict.INCONCLUSIVE if verdict is Verdict.PASS else verdict
                reasons.append(f"{label} abstained")
            elif result is True or result == "pass":
                continue
            else:
                why = result if isinstance(result, str) and result != "fail" else "failed the canary"
                return Verdict.FAIL, f"analysis {label}: {why}"
    return verdict, "; ".join(reasons)
