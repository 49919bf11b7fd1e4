"""A canary run: the coordinator's side of a canary deploy, from its first step to its end.

    deploy --canary ─▶ prepare everywhere ─▶ commit (store: the canary beside the desired
    version) ─▶ every worker splits ─▶ per step: set the weight everywhere, analyse once a
    second on that step's traffic ─▶ pass at the pause's end: next step ─▶ 100%: promote
    (an ACTIVATE of the warm canary, as any deploy: switch everywhere, bake, drain the old one)
                  └─▶ fail, or abort: weight 0 everywhere, the canary drains and is unloaded

The canary's state lives in the store (`Desired.canary`, a `CanaryState`): every worker reads
its weight from there, and a `promote` or `abort` that reaches another worker's admin API is
written there as a command for this run to carry out. The run holds the engine's claim on the
package throughout: no other operation on it starts in this process, and its cluster operation
(kind CANARY, open until the end) keeps the other workers from starting one.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._canary_analysis import StepFigures, Verdict, analyze
from ._canary_plan import FULL, CanaryPlan
from ._deployment import Deployment, Outcome
from ._errors import CanaryRefused, DeploymentError
from ._operation import Operation
from ._thread_hop import thread_hop
from ._version import VersionState

if TYPE_CHECKING:
    from ._archive import Unpacked
    from ._cluster import Cluster
    from ._engine import Engine
    from ._package import Package
    from ._records import RecordLog
    from ._version import PackageVersion

logger = logging.getLogger("starlette_hotdeploy")

ANALYSIS_INTERVAL = 1.0  # seconds between two looks at a step's figures
PROMOTE, PROMOTE_ALL, ABORT = "promote", "promote_all", "abort"


@dataclass(frozen=True, slots=True)
class CanaryState:
    """A running canary, as the store keeps it beside the package's desired version."""

    operation: str  # the CANARY cluster operation (its coordinator runs the canary)
    coordinator: str
    deployment: str  # the record
    version: str
    sha256: str
    plan: CanaryPlan
    step: int = 0
    weight: int = 0  # basis points of new users on the canary, on every worker
    step_started_at: float = field(default_factory=time.time)
    command: str | None = None  # promote, promote_all or abort, asked through another worker
    command_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "coordinator": self.coordinator,
            "deployment": self.deployment,
            "version": self.version,
            "sha256": self.sha256,
            "plan": self.plan.to_dict(),
            "step": self.step,
            "weight": self.weight,
            "step_started_at": self.step_started_at,
            "command": self.command,
            "command_id": self.command_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanaryState:
        return cls(
            operation=data["operation"],
            coordinator=data["coordinator"],
            deployment=data["deployment"],
            version=data["version"],
            sha256=data["sha256"],
            plan=CanaryPlan.from_dict(data["plan"]),
            step=int(data.get("step", 0)),
            weight=int(data.get("weight", 0)),
            step_started_at=float(data.get("step_started_at", 0.0)),
            command=data.get("command"),
            command_id=data.get("command_id"),
        )

    def status(self) -> dict[str, Any]:
        """What status, the admin API and the CLI show of it."""
        step = self.plan.steps[self.step]
        return {
            "version": self.version,
            "weight_percent": self.weight / 100,
            "step": self.step + 1,
            "step_count": len(self.plan.steps),
            "steps": self.plan.describe(),
            "current_step": step.describe(),
            "step_started_at": self.step_started_at,
            "key": self.plan.key,
            "deployment": self.deployment,
            "coordinator": self.coordinator,
        }


class Coordinator(Protocol):
    """What a canary run needs of the coordinator (_coordinator.py) that started it."""

    engine: Engine
    cluster: Cluster
    records: RecordLog

    async def _done(self, operation: Operation) -> None: ...

    async def _install(
        self,
        record: Deployment,
        package: Package,
        unpacked: Unpacked | None,
        *,
        warm: PackageVersion | None = None,
    ) -> Deployment: ...

    def canary_ended(self, run: CanaryRun) -> None: ...


def with_command(state: CanaryState, command: str) -> CanaryState:
    return replace(state, command=command, command_id=uuid.uuid4().hex[:12])


class CanaryRun:
    """Drives one canary on its coordinator: steps, analyses, promotion or abort."""

    def __init__(
        self,
        coordinator: Coordinator,
        package: Package,
        canary: PackageVersion,
        stable: PackageVersion,
        operation: Operation,
        record: Deployment,
        state: CanaryState,
    ) -> None:
        self.coordinator = coordinator
        self.engine = coordinator.engine
        self.cluster = coordinator.cluster
        self.package = package
        self.canary = canary
        self.stable = stable
        self.operation = operation
        self.record = record
        self.state = state
        self.latest: dict[str, Any] | None = None  # the last analysis: verdict, reason, figures
        self._command: tuple[str, str] | None = None  # (command, who asked)
        self._seen_commands: set[str] = set()
        self._wake = anyio.Event()
        self._finished = anyio.Event()
        self.ending: str | None = None  # "promoted" or "aborted", once it has reached its end

    # -- commands ---------------------------------------------------------------------------

    def command(self, command: str, who: str) -> None:
        """`promote`, `promote_all` or `abort`, carried out at once (the run wakes up)."""
        self._command = (command, who)
        self._wake.set()

    def noticed(self, stored: dict[str, Any]) -> None:
        """The store's canary changed (the follower saw it): a command from another worker?"""
        command, command_id = stored.get("command"), stored.get("command_id")
        if command and command_id and command_id not in self._seen_commands:
            self._seen_commands.add(command_id)
            self.command(command, "another worker's admin API")

    async def finished(self) -> None:
        await self._finished.wait()

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> None:
        name = self.package.name
        try:
            # Not shielded: a server that stops ends the run (its canary with it: the store's
            # canary ends when its operation is abandoned, the active version serves on).
            await self._steps()
        except Exception as exc:
            logger.exception("%s: the canary of %s failed", name, self.canary.version)
            if self.engine.canary(self.package) is self.canary:
                await self._abort(f"the canary run failed: {type(exc).__name__}: {exc}")
        finally:
            self.engine.release_claim(name)
            self.coordinator.canary_ended(self)
            self._finished.set()

    async def _steps(self) -> None:
        steps = self.state.plan.steps
        index = self.state.step
        while True:
            step = steps[index]
            if step.weight == FULL:
                await self._promote()
                return
            if index != self.state.step or self.state.weight != step.weight:
                await self._set_step(index)
            record_step = self.record.begin_step(f"canary {step.describe()}")
            baseline = await self._figures()
            started = time.monotonic()
            next_index: int | None = None
            while next_index is None:
                with anyio.move_on_after(ANALYSIS_INTERVAL):
                    await self._wake.wait()
                self._wake = anyio.Event()
                if self._command is not None:
                    command, who = self._command
                    self._command = None
                    if command == ABORT:
                        self.record.end_step(record_step, ok=False, detail=f"aborted by {who}")
                        await self._abort(f"aborted by {who}")
                        return
                    self.record.end_step(record_step, detail=f"promoted by {who}, analysis skipped")
                    next_index = len(steps) - 1 if command == PROMOTE_ALL else index + 1
                    break
                figures = (await self._figures()).since(baseline)
                verdict, reason = await analyze(
                    self.engine.managers(self.canary),
                    self.package.name,
                    step,
                    figures,
                    self.state.plan.thresholds,
                    timeout=self.engine.check_timeout,
                )
                elapsed = time.monotonic() - started
                if self.engine.figures is not None:  # metrics on
                    self.engine.figures.canary_analysed(self.package.name, self.canary.version, verdict.value)
                self.latest = {
                    "step": index + 1,
                    "verdict": verdict.value,
                    "reason": reason,
                    "seconds": round(elapsed, 3),
                    "figures": figures.to_dict(self.state.plan.thresholds.quantile),
                }
                if verdict is Verdict.FAIL:
                    self._decision(record_step, ok=False)
                    await self._abort(f"analysis failed: {reason}")
                    return
                if step.pause is not None and elapsed >= step.pause and verdict is Verdict.PASS:
                    self._decision(record_step, ok=True)
                    next_index = index + 1
            index = next_index

    def _decision(self, record_step: Any, *, ok: bool) -> None:
        """The analysis that decided a step, with its figures, in the record."""
        latest = self.latest
        assert latest is not None
        analyses = self.record.canary.setdefault("analyses", [])
        analyses.append({**latest, "at": time.time()})
        detail = f"{latest['verdict']}: {latest['reason']}; " + json.dumps(
            latest["figures"], separators=(",", ":")
        )
        self.record.end_step(record_step, ok=ok, detail=detail)

    async def _set_step(self, index: int) -> None:
        step = self.state.plan.steps[index]
        self.state = replace(
            self.state,
            step=index,
            weight=step.weight,
            step_started_at=time.time(),
            command=None,
            command_id=None,
        )
        self.record.canary["state"] = self.state.status()
        await self.cluster.set_canary(self.package.name, self.state.to_dict())
        self.engine.set_canary_weight(self.package, step.weight)
        await self.coordinator.records.save(self.record)

    async def _figures(self) -> StepFigures:
        """Both versions' request figures over every live worker: this one's as they are, the
        others' as they last reported them (once a second, in their vote on the operation)."""
        op_id, me = self.operation.id, self.cluster.worker_id

        def look() -> list[dict[str, Any]]:
            live = self.cluster._live_ids()
            reports = []
            for worker, (_vote, detail) in self.cluster.store.votes(op_id).items():
                if worker != me and worker in live and detail and detail.startswith("{"):
                    try:
                        reports.append(json.loads(detail))
                    except ValueError:
                        continue
            return reports

        reports = await thread_hop(look)
        reports.append(figures_report(self.stable, self.canary))
        return StepFigures.from_reports(reports)

    # -- the ends ---------------------------------------------------------------------------

    async def _promote(self) -> None:
        """100%: the canary becomes the active version, as any deploy does (everywhere at once,
        then the bake and the old version's drain); the record is that deploy's."""
        with anyio.CancelScope(shield=True):
            await self._promote_now()

    async def _promote_now(self) -> None:
        self.ending = "being promoted"
        with self.record.step("promote") as step:
            step.detail = f"{self.canary.version} becomes the active version"
            await self.coordinator._done(self.operation)
        try:
            with self.coordinator.engine.operation():  # a switch, as a deploy's
                await self.coordinator._install(self.record, self.package, None, warm=self.canary)
        except DeploymentError:
            # Refused or failed (before its commit, or the commit itself, whose switch back has
            # ended the split here already): the stable version still serves, and the canary goes
            # from the store too, or the workers would split for a canary nobody runs.
            ended = "the promotion failed: every worker serves the stable version only"
            try:
                await self.cluster.set_canary(self.package.name, None)
            except Exception:  # the store may be why it failed
                ended = (
                    "the promotion failed, and the canary could not be cleared from the store: the "
                    "workers split for it until the package's next deployment"
                )
                logger.exception("%s: %s", self.package.name, ended)
            if self.engine.canary(self.package) is self.canary:
                self.engine.end_canary(self.package, None)
            self.record.canary["ended"] = ended
            await self.coordinator.records.save(self.record)

    async def _abort(self, reason: str) -> None:
        """Weight 0 everywhere; the canary drains and is unloaded; the stable version was never
        touched. The record is decided `aborted` with the reason (and the figures, if any)."""
        with anyio.CancelScope(shield=True):
            await self._abort_now(reason)

    async def _abort_now(self, reason: str) -> None:
        self.ending = "aborted"
        name = self.package.name
        with self.record.step("abort") as step:
            step.detail = reason
            await self.cluster.set_canary(name, None)
        self.record.canary.pop("state", None)
        self.record.decide(Outcome.ABORTED, CanaryRefused(reason, package=name, version=self.canary.version))
        await self.coordinator.records.save(self.record)
        self.engine.end_canary(self.package, self.record)  # finishes the record once it drained
        await self.coordinator._done(self.operation)
        logger.warning("%s: canary %s aborted: %s", name, self.canary.version, reason)


def canary_gauges(package: Package, run: CanaryRun | None) -> dict[str, Any] | None:
    """The package's canary as the metrics show it: the weight this worker splits with; its step
    and last verdict only where its run is (the coordinator). Safe from another thread: each
    attribute is read once, and the run replaces its state and analysis, never changes them."""
    mount = package.mount
    split = mount.split if mount is not None else None
    if split is None or split.leader is not None:  # none, or a dependent following another's
        return None
    found: dict[str, Any] = {"package": package.name, "version": split.canary.version, "weight": split.weight}
    if run is not None and run.canary is split.canary:
        state, latest = run.state, run.latest
        found.update(step=state.step + 1, step_count=len(state.plan.steps))
        if latest is not None:
            found["verdict"] = latest["verdict"]
    return found


def figures_report(stable: PackageVersion, canary: PackageVersion) -> dict[str, Any]:
    """This worker's figures of a canary's two versions, as it reports them."""
    return {
        "stable": stable.figures.to_dict() if stable.figures is not None else None,
        "canary": canary.figures.to_dict() if canary.figures is not None else None,
        "canary_state": canary.state.value if canary.state is not VersionState.READY else None,
    }
