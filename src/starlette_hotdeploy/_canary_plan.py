"""A canary's plan: its steps (weights with pauses), how users are kept on one side, and the
thresholds its automatic analysis decides by. Parsed from the manifest's `[canary]` table, the
admin API's `canary=` parameter or the CLI's `--canary`; stored as plain JSON in the desired state.

    "5%:30s, 25%:1m, 100%"      5% of new users for 30 s, 25% for a minute, then promoted
    "0%, 10%:2m"                a preview (pinned requests only) until promoted by hand, then 10%

A weight is kept in basis points (1/100 of a percent, 0..10000): the same integer every worker
compares a user's hash bucket with. A step without a pause waits for `promote`. The last step is
always 100% (added if missing): reaching it promotes the canary to the active version.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ._errors import CanaryError

FULL = 10_000  # basis points: 100%
DEFAULT_STEPS = "10%:30s, 50%:30s, 100%"

_STEP = re.compile(
    r"\s*(?P<weight>\d+(?:\.\d+)?)\s*%\s*(?:(?::|\s+for\s+|\s+)(?P<pause>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h))?\s*"
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# How a user is kept on one side: a header's value, a cookie's, the client address, the cookie
# the middleware sets itself (`cookie`), or nothing (`random`: each request on its own).
_KEYS = re.compile(r"(?:cookie|client|random|(?:header|cookie):[A-Za-z0-9!#$%&'*+.^_`|~-]+)")


@dataclass(frozen=True, slots=True)
class CanaryStep:
    weight: int  # basis points of new users sent to the canary
    pause: float | None  # seconds at this weight before the analysis may promote; None: by hand

    def describe(self) -> str:
        weight = f"{self.weight / 100:g}%"
        if self.weight == FULL:
            return weight
        return f"{weight}:{self.pause:g}s" if self.pause is not None else f"{weight} (until promoted)"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When the analysis fails a step: the canary's 5xx share exceeds the stable version's by more
    than `max_error_rate`, or its latency quantile is more than `max_latency_ratio` times the
    stable one's. Neither is judged before the canary served `min_requests` in the step."""

    max_error_rate: float = 0.02
    max_latency_ratio: float = 1.5
    quantile: float = 0.95
    min_requests: int = 50

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_error_rate": self.max_error_rate,
            "max_latency_ratio": self.max_latency_ratio,
            "quantile": self.quantile,
            "min_requests": self.min_requests,
        }


@dataclass(frozen=True, slots=True)
class CanaryPlan:
    steps: tuple[CanaryStep, ...]
    key: str = "cookie"
    thresholds: Thresholds = field(default_factory=Thresholds)

    def describe(self) -> str:
        return ", ".join(step.describe() for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [[step.weight, step.pause] for step in self.steps],
            "key": self.key,
            "thresholds": self.thresholds.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanaryPlan:
        return cls(
            steps=tuple(CanaryStep(int(w), None if p is None else float(p)) for w, p in data["steps"]),
            key=str(data.get("key", "cookie")),
            thresholds=Thresholds(**data.get("thresholds", {})),
        )


def parse_steps(text: str | list[str], *, where: str = "canary.steps") -> tuple[CanaryStep, ...]:
    """`"5%:30s, 25%:1m, 100%"` (or a list of such steps) as steps, 100% last."""
    parts = text if isinstance(text, list) else [p for p in text.split(",") if p.strip()]
    steps: list[CanaryStep] = []
    for part in parts:
        match = _STEP.fullmatch(part) if isinstance(part, str) else None
        if match is None:
            raise CanaryError(f"{where}: {part!r} is not a step such as '5%:30s', '25%:1m' or '100%'")
        percent = float(match["weight"])
        if not 0 <= percent <= 100:
            raise CanaryError(f"{where}: {part.strip()!r}: a weight is between 0% and 100%")
        weight = round(percent * 100)
        pause = None if match["pause"] is None else float(match["pause"]) * _UNITS[match["unit"]]
        if steps and weight <= steps[-1].weight:
            raise CanaryError(
                f"{where}: weights must grow from step to step ({steps[-1].weight / 100:g}% then {percent:g}%)"
            )
        steps.append(CanaryStep(weight, pause if weight < FULL else None))
    if not steps:
        raise CanaryError(f"{where}: no steps; give at least one, such as '10%:1m'")
    if steps[-1].weight != FULL:
        steps.append(CanaryStep(FULL, None))
    return tuple(steps)


def check_key(key: Any, *, where: str = "canary.key") -> str:
    if not isinstance(key, str) or not _KEYS.fullmatch(key):
        raise CanaryError(
            f"{where}: {key!r} must be 'cookie', 'cookie:NAME', 'header:NAME', 'client' or 'random'"
        )
    return key.lower() if key.startswith("header:") else key


def plan_from_table(raw: Any, *, package: str | None = None) -> CanaryPlan:
    """The manifest's `[canary]` table (every key optional)."""
    if not isinstance(raw, dict):
        raise CanaryError("canary: must be a table such as [canary] steps = '10%:1m, 100%'", package=package)
    known = {"steps", "key", "max_error_rate", "max_latency_ratio", "quantile", "min_requests"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CanaryError(
            f"canary.{unknown[0]}: unknown key (allowed: {', '.join(sorted(known))})", package=package
        )
    steps_raw = raw.get("steps", DEFAULT_STEPS)
    if not isinstance(steps_raw, str | list):
        raise CanaryError("canary.steps: must be a string or a list of steps", package=package)
    defaults = Thresholds()
    thresholds = Thresholds(
        max_error_rate=_fraction(raw, "max_error_rate", defaults.max_error_rate, package),
        max_latency_ratio=_positive(raw, "max_latency_ratio", defaults.max_latency_ratio, package),
        quantile=_quantile(raw.get("quantile", defaults.quantile), package),
        min_requests=_count(raw.get("min_requests", defaults.min_requests), package),
    )
    return CanaryPlan(parse_steps(steps_raw), check_key(raw.get("key", "cookie")), thresholds)


def _number(raw: dict[str, Any], key: str, default: float) -> float | None:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _fraction(raw: dict[str, Any], key: str, default: float, package: str | None) -> float:
    value = _number(raw, key, default)
    if value is None or not 0 <= value <= 1:
        raise CanaryError(
            f"canary.{key}: must be a share between 0 and 1, got {raw.get(key)!r}", package=package
        )
    return value


def _positive(raw: dict[str, Any], key: str, default: float, package: str | None) -> float:
    value = _number(raw, key, default)
    if value is None or value <= 0:
        raise CanaryError(f"canary.{key}: must be a positive number, got {raw.get(key)!r}", package=package)
    return value


def _quantile(value: Any, package: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise CanaryError(
            f"canary.quantile: must be between 0 and 1 (0.95, 0.99), got {value!r}", package=package
        )
    return float(value)


def _count(value: Any, package: str | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CanaryError(
            f"canary.min_requests: must be a whole number of at least 1, got {value!r}", package=package
        )
    return value
