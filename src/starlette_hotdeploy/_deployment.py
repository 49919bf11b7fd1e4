"""Deployment records: one per attempt to change what a mount points at.

A record is stored when the deployment is accepted, updated as its steps complete, *decided*
once (its outcome: what the caller waits for) and *finished* once, after its last step, which
for a successful switch is the previous version's drain and shutdown. Deciding or finishing
twice is a bug and raises AssertionError (not IllegalTransition: _errors.py imports this
module's type, and this module imports nothing of ours).
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ._detail import shorten


class Action(enum.StrEnum):
    """What a deployment was asked to do."""

    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    ACTIVATE = "activate"
    UNDEPLOY = "undeploy"


class Outcome(enum.StrEnum):
    """How a deployment ended (decided once)."""

    PENDING = "pending"  # not decided yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # nothing changed
    ROLLED_BACK = "rolled_back"  # switched, then a post-activation check switched back
    INTERRUPTED = "interrupted"  # its worker stopped before the change was committed: nothing changed
    ABORTED = "aborted"  # a canary stopped before its promotion: the active version never changed


@dataclass(slots=True)
class Step:
    """One timed step of a deployment."""

    name: str
    started_at: float
    duration_ms: float | None = None
    ok: bool | None = None
    detail: str | None = None
    _start: float = field(default=0.0, repr=False, compare=False)  # perf_counter at begin_step

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "ok": self.ok,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        return cls(
            data["name"], data["started_at"], data.get("duration_ms"), data.get("ok"), data.get("detail")
        )


@dataclass(slots=True)
class Deployment:
    """What one operation did: its steps with timings, and how it ended."""

    operation: Action
    package: str | None
    from_version: str | None = None
    to_version: str | None = None
    sha256: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    worker: str | None = None  # the worker that coordinates it
    signer: str | None = None  # who signed the archive, when trusted keys are configured
    downgrade: bool = False  # a deploy to a lower version than the active one
    forced: bool = False  # replaced a different archive under the same version number
    started_at: float = field(default_factory=time.time)
    decided_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome = Outcome.PENDING
    error: str | None = None
    error_step: str | None = None
    steps: list[Step] = field(default_factory=list)
    # What each worker of a cluster operation did, as its coordinator saw it: worker id ->
    # {"host", "prepared_ms" | "switched_ms" | "checked_ms" | "failed_ms" (after started_at), "error"}.
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A canary deploy's plan, its current state and the analyses that decided its steps.
    canary: dict[str, Any] = field(default_factory=dict)
    # The dependents that moved with the package in the same switch ("orders 1.0"): loaded
    # again, bound to the new version of what they import.
    moved: list[str] = field(default_factory=list)
    # A set deployed together: every package of it ("inventory 2.0"), in the order it was prepared.
    bundle: list[str] = field(default_factory=list)
    # Called with (record, step) when a step starts or ends, and with (record, None) when the
    # outcome is decided or the record finished: how progress reaches the event stream and store.
    on_change: Callable[[Deployment, Step | None], None] | None = field(
        default=None, repr=False, compare=False
    )
    # What error text may say (bounded, no absolute server paths): set by whoever makes records.
    tidy: Callable[[str], str] = field(default=shorten, repr=False, compare=False)

    def _changed(self, step: Step | None) -> None:
        if self.on_change is not None:
            self.on_change(self, step)

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time a step; an exception marks it failed (with the message) and propagates."""
        step = self.begin_step(name)
        try:
            yield step
        except BaseException as exc:
            self.end_step(step, ok=False, detail=self.tidy(step.detail or str(exc) or type(exc).__name__))
            raise
        else:
            self.end_step(step)

    def begin_step(self, name: str) -> Step:
        """A step that `end_step` ends (for one that spans several blocks, like a drain)."""
        if self.finished_at is not None:
            raise AssertionError(f"deployment {self.id} is finished: no step {name!r} after it")
        step = Step(name=name, started_at=time.time())
        step._start = time.perf_counter()
        self.steps.append(step)
        self._changed(step)
        return step

    def end_step(self, step: Step, *, ok: bool | None = None, detail: str | None = None) -> None:
        if step.duration_ms is not None:
            return  # ended already
        step.duration_ms = round((time.perf_counter() - step._start) * 1000, 3)
        if detail is not None:
            step.detail = detail
        step.ok = ok if ok is not None else (True if step.ok is None else step.ok)
        self._changed(step)

    def decide(self, outcome: Outcome, error: BaseException | None = None, step: str | None = None) -> None:
        """The outcome, once: what `deploy()` and the admin API answer with."""
        if self.outcome is not Outcome.PENDING or outcome is Outcome.PENDING:
            raise AssertionError(f"deployment {self.id} is already {self.outcome.value}, not {outcome.value}")
        self.outcome = outcome
        self.decided_at = time.time()
        if error is not None:
            self.error = self.tidy(str(error))
            self.error_step = step or getattr(error, "step", None)
        self._changed(None)

    def finish(self) -> None:
        """After the last step (a replaced version's drain and shutdown included), once."""
        if self.outcome is Outcome.PENDING or self.finished_at is not None:
            raise AssertionError(
                f"deployment {self.id} cannot finish: {self.outcome.value}, finished_at={self.finished_at}"
            )
        self.finished_at = time.time()
        self._changed(None)

    def conclude(self, outcome: Outcome, error: BaseException | None = None, step: str | None = None) -> None:
        """Decide and finish at once: nothing is left to do after the outcome."""
        self.decide(outcome, error, step)
        self.finish()

    def saw_vote(self, worker: str, vote: str, detail: str | None = None) -> None:
        """A worker's vote ("prepared", "switched", "failed"), first seen now."""
        entry = self.workers.setdefault(worker, {"host": worker.partition(":")[0]})
        entry.setdefault(f"{vote}_ms", round((time.time() - self.started_at) * 1000, 3))
        if detail and vote == "failed":
            entry["error"] = self.tidy(detail)
        # No event of its own: the step that waits for the votes ends next, and carries it.

    @property
    def decided(self) -> bool:
        return self.outcome is not Outcome.PENDING

    @property
    def duration_ms(self) -> float | None:
        """From acceptance to the outcome: what the caller waited."""
        if self.decided_at is None:
            return None
        return round((self.decided_at - self.started_at) * 1000, 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "operation": self.operation.value,
            "package": self.package,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "sha256": self.sha256,
            "worker": self.worker,
            "signer": self.signer,
            "downgrade": self.downgrade,
            "forced": self.forced,
            "started_at": self.started_at,
            "decided_at": self.decided_at,
            "finished_at": self.finished_at,
            "duration_ms": self.duration_ms,
            "outcome": self.outcome.value,
            "error": self.error,
            "error_step": self.error_step,
            "steps": [s.to_dict() for s in self.steps],
            "workers": {worker: dict(entry) for worker, entry in self.workers.items()},
            "canary": dict(self.canary) or None,
            "moved": list(self.moved),
            "bundle": list(self.bundle),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Deployment:
        """A stored record (any worker's), as this type."""
        return cls(
            operation=Action(data["operation"]),
            package=data.get("package"),
            from_version=data.get("from_version"),
            to_version=data.get("to_version"),
            sha256=data.get("sha256"),
            id=data["id"],
            worker=data.get("worker"),
            signer=data.get("signer"),
            downgrade=bool(data.get("downgrade", False)),
            forced=bool(data.get("forced", False)),
            started_at=data["started_at"],
            # Records written before `decided_at` existed were decided when they finished.
            decided_at=data.get("decided_at", data.get("finished_at")),
            finished_at=data.get("finished_at"),
            outcome=Outcome(data.get("outcome", "pending")),
            error=data.get("error"),
            error_step=data.get("error_step"),
            steps=[Step.from_dict(s) for s in data.get("steps", [])],
            workers={worker: dict(entry) for worker, entry in (data.get("workers") or {}).items()},
            canary=dict(data.get("canary") or {}),
            moved=list(data.get("moved") or []),
            bundle=list(data.get("bundle") or []),
        )
