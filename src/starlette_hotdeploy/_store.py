"""Store: what survives a restart, under the home directory, behind the `Store` protocol.

    home/
      state.db                  SQLite (WAL, schema versioned by PRAGMA user_version): desired
                                state, archives index, history, workers, cluster operations, votes
      archives/<name>/<version>-<sha12>.zip     every uploaded archive, written tmp+fsync+rename
      packages/<name>/<version>-<sha12>/        unpacked versions (a cache: rebuilt from archives)

The desired state says which version of each package is active, with a generation number that
grows by one on every change; it changes only when a deployment is confirmed, in one transaction,
so a crash at any point leaves either the old or the new confirmed state.

Retention goes by activation, not upload: an archive is saved when it is uploaded (before it is
prepared: the other workers fetch it from the store), but it counts as available, and toward
`keep_versions`, only once a commit made it active. One that never was (a failed upload) is
discarded by its deployment, or by `prune` once it is stale (a crash came in between).

`_sqlite_store.open_store` returns the SQLite implementation; any other implementation must
pass tests/test_store_conformance.py, and finishes a dead worker's records with `finish_orphaned`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ._operation import Operation, Phase, Vote

# A never-activated archive older than this is a failed upload that nobody discarded (the worker
# died between its save and its failure): a deployment's prepare is bounded by its timeouts
# (load, startup, checks, cluster: minutes), so an hour leaves a wide margin to one under way.
STALE_UPLOAD_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class StoredArchive:
    name: str
    version: str
    sha256: str
    path: Path
    created_at: float  # saved (again, while never activated: staleness counts from the last upload)
    activated_at: float | None = None  # last made active by a commit; None: never (a failed upload)


@dataclass(frozen=True, slots=True)
class Worker:
    id: str
    pid: int
    started_at: float
    heartbeat_at: float
    serving: dict[str, str]  # package -> version


@dataclass(frozen=True, slots=True)
class Desired:
    """The confirmed active version of a package, and the versions before it (for rollback)."""

    name: str
    version: str
    sha256: str
    lineage: list[tuple[str, str]]  # (version, sha256) in activation order, the active one last
    generation: int
    # The canary running beside it (see _canary_state): version, sha256, weight, step, plan...
    canary: dict[str, Any] | None = None


class Store(Protocol):
    """Durable state shared by every worker of a home. Thread-safe; every method is a short
    blocking call (run it in a worker thread from async code)."""

    def close(self) -> None:
        """Release the connection; the store object is not used afterwards."""

    def describe(self) -> str:
        """Where the state is, fit for an operator's eyes (a database URL without its password)."""

    def data_version(self) -> int:
        """A number that changes whenever another store object (another worker) committed."""

    # -- archives ---------------------------------------------------------------------------

    def save_archive(self, name: str, version: str, sha256: str, data: bytes) -> Path:
        """Keep an uploaded archive durably and index it, not yet activated. Saving the same one
        again keeps the file and the activation; a never-activated one gets a new created_at."""

    def archive(self, name: str, version: str, sha256: str | None = None) -> StoredArchive | None:
        """The newest archive of that version (of that sha256, if given), or None. Activated or
        not: the workers preparing an upload fetch it here before it is committed."""

    def archives(self, name: str) -> list[StoredArchive]:
        """A package's activated archives (what can be activated again), by last activation,
        oldest first. Never-activated ones (uploads not committed, failed ones) are not listed."""

    def prune(
        self,
        name: str,
        keep: int,
        protect: set[tuple[str, str]],
        *,
        stale_after: float = STALE_UPLOAD_AFTER,
    ) -> list[StoredArchive]:
        """Keep `keep` activated archives, the protected (version, sha256) first, then the most
        recently activated; delete the others, and the never-activated ones saved more than
        `stale_after` seconds ago. Never a protected one, nor one that an operation under way
        (PREPARE, COMMIT) activates. Returns the deleted ones (files gone too)."""

    def discard_archive(self, name: str, version: str, sha256: str) -> bool:
        """Delete a failed upload: the archive only if it was never activated and no operation
        under way activates it (abort yours first). True if it was deleted (file gone too)."""

    # -- desired state ----------------------------------------------------------------------

    def desired(self) -> dict[str, Desired]:
        """The confirmed active version of every package, by name."""

    def generation(self) -> int:
        """The generation of the desired state: 0 at first, one more on every change."""

    def set_desired(self, name: str, version: str, sha256: str, lineage: list[tuple[str, str]]) -> int:
        """Confirm `version` as the active one, durably, and mark its archive activated (now), in
        one transaction; returns the new generation."""

    def set_canary(self, name: str, canary: dict[str, Any] | None) -> int:
        """Set (None: end) the package's canary beside its desired version, durably; returns the
        new generation. StoreError if the package has no desired version. Activating a version
        (set_desired, an ACTIVATE commit) ends the canary too."""

    def remove_desired(self, name: str) -> int:
        """Forget the package's desired version, durably; returns the new generation."""

    # -- history ----------------------------------------------------------------------------

    def record(self, record: dict[str, Any]) -> None:
        """Insert or replace a deployment record (a JSON-able dict with at least id, package, started_at)."""

    def history(self, limit: int = 100, package: str | None = None) -> list[dict[str, Any]]:
        """Deployment records, newest first, at most `limit`, of one package if given."""

    def deployment(self, deployment_id: str) -> dict[str, Any] | None:
        """One deployment record by id, or None."""

    def finish_orphaned_records(self, live: set[str]) -> int:
        """Finish the unfinished records of coordinators not in `live`; returns how many."""

    # -- workers ----------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, serving: dict[str, str]) -> None:
        """Register the worker, or refresh its heartbeat and what it serves."""

    def remove_worker(self, worker_id: str) -> None:
        """Unregister a worker (a graceful stop)."""

    def workers(self, max_age: float | None = None) -> list[Worker]:
        """Workers whose last heartbeat is at most `max_age` seconds old (all if None), oldest first."""

    def forget_workers(self, older_than: float) -> None:
        """Unregister the workers silent for more than `older_than` seconds."""

    # -- cluster operations -----------------------------------------------------------------

    def begin_operation(self, operation: Operation, live: Container[str]) -> Operation | None:
        """Record it, or return the package's operation led by a live worker (a dead one's: abandoned).
        `live` may raise when first used (it is read only then): let it propagate, the call is
        made again with the live workers read."""

    def abandon(self, operation: Operation) -> None:
        """End a dead coordinator's operation: ABORT before its commit, DONE after; finish its
        record. A CANARY's canary ends with it (nobody drives it any more)."""

    def operations(self, since: float = 0.0) -> list[Operation]:
        """Every operation created at or after `since`, oldest first."""

    def active_operations(self) -> list[Operation]:
        """Operations still under way (PREPARE or COMMIT), oldest first."""

    def operation(self, op_id: str) -> Operation | None:
        """One operation by id, or None."""

    def vote(self, op_id: str, worker_id: str, vote: Vote, detail: str | None = None) -> None:
        """Record (or replace) a worker's vote on an operation."""

    def votes(self, op_id: str) -> dict[str, tuple[Vote, str | None]]:
        """The votes on an operation: worker id -> (vote, detail)."""

    def set_phase(self, op_id: str, phase: Phase) -> None:
        """Move an operation to `phase` (IllegalTransition unless PHASE_TRANSITIONS allows; same: no-op)."""

    def commit(self, operation: Operation, canary: dict[str, Any] | None = None) -> int:
        """PREPARE -> COMMIT and the new desired state in one durable transaction (an ACTIVATE also
        marks its archive activated, now; a CANARY sets `canary` beside the desired version);
        returns the generation."""

    def prune_operations(self, older_than: float) -> None:
        """Delete finished (DONE, ABORT) operations older than `older_than` seconds, with their votes."""


@runtime_checkable
class Notifying(Protocol):
    """A store whose writes reach every host's workers (PostgreSQL's LISTEN/NOTIFY): they need
    not poll for the workers of other hosts."""

    def subscribe(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call `on_change` (from any thread) after the writes others wait for; returns the
        function that stops it."""


def finish_orphaned(record: dict[str, Any], worker: str, *, committed: bool) -> dict[str, Any]:
    """The rule every implementation applies to an unfinished record whose worker stopped: a
    "pending" outcome becomes "succeeded" if its operation was committed (the change stands),
    else "interrupted" (nothing changed); the error, unless it has one, says who stopped where."""
    finished = dict(record, finished_at=time.time())
    if finished.get("outcome") == "pending":
        finished["outcome"] = "succeeded" if committed else "interrupted"
    if not finished.get("error"):
        consequence = "the change had been committed" if committed else "nothing changed"
        finished["error"] = f"worker {worker} stopped {_where_it_stopped(finished)}; {consequence}"
    return finished


def _where_it_stopped(record: dict[str, Any]) -> str:
    """The step that was running (the last one not ended: "ok" is None), else the last one."""
    steps = record.get("steps") or []
    if not steps:
        return "before its first step"
    running = [step for step in steps if step.get("ok") is None]
    return f"during step {(running or steps)[-1].get('name')}"
