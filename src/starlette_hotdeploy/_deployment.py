"""Deployment records: one per attempt to change what a mount points at."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

Operation = Literal["deploy", "rollback", "activate", "undeploy"]
Outcome = Literal["pending", "succeeded", "failed", "rolled_back"]


@dataclass(slots=True)
class Step:
    """One timed step of a deployment."""

    name: str
    started_at: float
    duration_ms: float | None = None
    ok: bool | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "ok": self.ok,
            "detail": self.detail,
        }


@dataclass(slots=True)
class Deployment:
    """What one operation did: its steps with timings, and how it ended."""

    operation: Operation
    package: str | None
    from_version: str | None = None
    to_version: str | None = None
    sha256: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    outcome: Outcome = "pending"
    error: str | None = None
    error_step: str | None = None
    steps: list[Step] = field(default_factory=list)
    # Called with (record, step) when a step starts or ends, and with (record, None) when the
    # deployment finishes: how progress reaches the event stream.
    on_change: Callable[[Deployment, Step | None], None] | None = field(
        default=None, repr=False, compare=False
    )

    def _changed(self, step: Step | None) -> None:
        if self.on_change is not None:
            self.on_change(self, step)

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time a step; an exception marks it failed (with the message) and propagates."""
        step = Step(name=name, started_at=time.time())
        self.steps.append(step)
        self._changed(step)
        start = time.perf_counter()
        try:
            yield step
        except BaseException as exc:
            step.ok = False
            step.detail = step.detail or str(exc) or type(exc).__name__
            raise
        else:
            step.ok = True if step.ok is None else step.ok
        finally:
            step.duration_ms = round((time.perf_counter() - start) * 1000, 3)
            self._changed(step)

    def finish(self, outcome: Outcome, error: BaseException | None = None, step: str | None = None) -> None:
        self.outcome = outcome
        self.finished_at = time.time()
        if error is not None:
            self.error = str(error)
            self.error_step = step or getattr(error, "step", None)
        self._changed(None)

    @property
    def duration_ms(self) -> float | None:
        if self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at) * 1000, 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "operation": self.operation,
            "package": self.package,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "sha256": self.sha256,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_ms": self.duration_ms,
            "outcome": self.outcome,
            "error": self.error,
            "error_step": self.error_step,
            "steps": [s.to_dict() for s in self.steps],
        }
