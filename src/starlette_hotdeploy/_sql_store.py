"""SQLStore: the `Store` protocol in SQL, shared by the SQLite and the PostgreSQL stores.

The queries are written once, with `?` placeholders and the SQL both databases speak (upserts
with ON CONFLICT, no INSERT OR REPLACE). A subclass supplies the connection: `_transaction()`
yields a `Db` inside one transaction in which no other writer runs (SQLite's BEGIN IMMEDIATE,
PostgreSQL's advisory lock), `_query()` reads outside one, `_db_now()` is the clock that
heartbeats and liveness go by, and `save_archive` keeps the archive's bytes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Container, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from ._errors import IllegalTransition, StoreError
from ._operation import CANARY_SUFFIX, PHASE_TRANSITIONS, Member, Operation, OperationKind, Phase, Vote
from ._store import STALE_UPLOAD_AFTER, Desired, StoredArchive, Worker, finish_orphaned

_ACTIVE_PHASES = tuple(phase.value for phase in Phase if phase.active)
_FINISHED_PHASES = tuple(phase.value for phase in Phase if not phase.active)
COMMITTED_PHASES = (Phase.COMMIT, Phase.DONE)

OP_COLUMNS = "id, package, kind, version, sha256, lineage, phase, coordinator, created_at, members"
ARCHIVE_COLUMNS = "name, version, sha256, path, created_at, activated_at"


def sql_in(values: tuple[str, ...]) -> str:
    """`(?, ?, …)` for an `IN` over `values`."""
    return "(" + ", ".join("?" * len(values)) + ")"


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Db(Protocol):
    """What the queries need of a connection (sqlite3's, or psycopg's behind an adapter)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...


class SQLStore:
    """The queries of every `Store` method; the subclass owns the connection and the files."""

    home: Path
    archives_dir: Path  # home/archives
    _serving_written: dict[str, dict[str, str]]  # worker id -> its last heartbeat's map

    def _transaction(self, *, durable: bool = False, serialized: bool = True) -> AbstractContextManager[Db]:
        """One transaction; `serialized`: no other serialized one runs meanwhile (its reads see
        every earlier commit), `durable`: its commit survives a power loss."""
        raise NotImplementedError

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _db_now(self, db: Db) -> float:
        """The clock of heartbeats and liveness: the database's, where hosts share one (their
        own clocks may disagree)."""
        return time.time()

    def _clock_offset(self) -> float:
        """This process's clock minus the database's: added to stored heartbeat times."""
        return 0.0

    # -- archives ---------------------------------------------------------------------------

    def _archive_path(self, name: str, version: str, sha256: str) -> Path:
        """Where the archive's file is in the home (the store's own, or a database's cache)."""
        return self.archives_dir / name / f"{version}-{sha256[:12]}.zip"

    def _index_archive(self, db: Db, name: str, version: str, sha256: str, path: Path) -> None:
        """Index an upload, not yet activated. Uploaded again while never activated: a
        deployment under way again, not stale (a new created_at); an activated one stays."""
        db.execute(
            f"INSERT INTO archives ({ARCHIVE_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL) "
            "ON CONFLICT (name, version, sha256) DO UPDATE SET created_at = excluded.created_at "
            "WHERE archives.activated_at IS NULL",
            (name, version, sha256, str(path.relative_to(self.home)), time.time()),
        )

    def archive(self, name: str, version: str, sha256: str | None = None) -> StoredArchive | None:
        rows = self._query(
            f"SELECT {ARCHIVE_COLUMNS} FROM archives WHERE name = ? AND version = ?"
            + (" AND sha256 = ?" if sha256 else "")
            + " ORDER BY created_at DESC LIMIT 1",
            *((name, version, sha256) if sha256 else (name, version)),
        )
        return self._archive_row(rows[0]) if rows else None

    def archives(self, name: str) -> list[StoredArchive]:
        rows = self._query(
            f"SELECT {ARCHIVE_COLUMNS} FROM archives WHERE name = ? AND activated_at IS NOT NULL "
            "ORDER BY activated_at, created_at",
            name,
        )
        return [self._archive_row(row) for row in rows]

    def _archive_row(self, row: tuple[Any, ...]) -> StoredArchive:
        return StoredArchive(row[0], row[1], row[2], self.home / row[3], row[4], row[5])

    def prune(
        self,
        name: str,
        keep: int,
        protect: set[tuple[str, str]],
        *,
        stale_after: float = STALE_UPLOAD_AFTER,
    ) -> list[StoredArchive]:
        """The protected archives count toward `keep`: the package never lists more than `keep`
        (as long as it protects no more), even when a rollback target was activated long ago."""
        cutoff = time.time() - stale_after
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {ARCHIVE_COLUMNS} FROM archives WHERE name = ? ORDER BY activated_at, created_at",
                (name,),
            ).fetchall()
            stored = [self._archive_row(row) for row in rows]
            spared = protect | self._activating(db, name)
            activated = [a for a in stored if a.activated_at is not None]
            kept = {(a.version, a.sha256) for a in activated if (a.version, a.sha256) in spared}
            for archive in reversed(activated):  # the most recently activated first
                if len(kept) >= keep:
                    break
                kept.add((archive.version, archive.sha256))
            surplus = [a for a in activated if (a.version, a.sha256) not in kept]
            stale = [
                a
                for a in stored
                if a.activated_at is None and a.created_at < cutoff and (a.version, a.sha256) not in spared
            ]
            for archive in surplus + stale:
                self._delete_archive(db, archive)
        for archive in surplus + stale:  # after the commit: an indexed archive always has its file
            archive.path.unlink(missing_ok=True)
        return surplus + stale

    def discard_archive(self, name: str, version: str, sha256: str) -> bool:
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {ARCHIVE_COLUMNS} FROM archives "
                "WHERE name = ? AND version = ? AND sha256 = ? AND activated_at IS NULL",
                (name, version, sha256),
            ).fetchone()
            # An identical upload on another worker may be what its operation prepares.
            if row is None or (version, sha256) in self._activating(db, name):
                return False
            archive = self._archive_row(row)
            self._delete_archive(db, archive)
        archive.path.unlink(missing_ok=True)  # after the commit, as in prune
        return True

    def _delete_archive(self, db: Db, archive: StoredArchive) -> None:
        db.execute(
            "DELETE FROM archives WHERE name = ? AND version = ? AND sha256 = ?",
            (archive.name, archive.version, archive.sha256),
        )

    @staticmethod
    def _activating(db: Db, name: str) -> set[tuple[str, str]]:
        """The (version, sha256) that operations under way on the package activate: the workers
        may still fetch those archives."""
        rows = db.execute(
            f"SELECT {OP_COLUMNS} FROM operations WHERE kind = ? AND phase IN {sql_in(_ACTIVE_PHASES)}",
            (OperationKind.ACTIVATE.value, *_ACTIVE_PHASES),
        ).fetchall()
        found: set[tuple[str, str]] = set()
        for operation in map(operation_from_row, rows):
            changes = [(operation.package, operation.version, operation.sha256)]
            changes += [(m.package, m.version, m.sha256) for m in operation.members]
            found.update((v, s) for p, v, s in changes if p == name and v is not None and s is not None)
        return found

    @staticmethod
    def _mark_activated(db: Db, name: str, version: str, sha256: str) -> None:
        """Now, but always after the package's previous activation (should the clock step
        back): retention keeps the most recently activated, so this order must hold."""
        latest = db.execute("SELECT MAX(activated_at) FROM archives WHERE name = ?", (name,)).fetchone()[0]
        now = time.time() if latest is None else max(time.time(), latest + 0.001)
        db.execute(
            "UPDATE archives SET activated_at = ? WHERE name = ? AND version = ? AND sha256 = ?",
            (now, name, version, sha256),
        )

    # -- desired state ----------------------------------------------------------------------

    def desired(self) -> dict[str, Desired]:
        rows = self._query(
            "SELECT name, version, sha256, lineage, generation, canary FROM desired ORDER BY name"
        )
        return {
            row[0]: Desired(
                row[0],
                row[1],
                row[2],
                [(v, s) for v, s in json.loads(row[3])],
                row[4],
                json.loads(row[5]) if row[5] else None,
            )
            for row in rows
        }

    def generation(self) -> int:
        rows = self._query("SELECT value FROM meta WHERE key = 'generation'")
        return int(rows[0][0]) if rows else 0

    def set_desired(self, name: str, version: str, sha256: str, lineage: list[tuple[str, str]]) -> int:
        with self._transaction(durable=True) as db:
            generation = self._bump(db)
            self._write_desired(db, name, version, sha256, lineage, generation)
            self._mark_activated(db, name, version, sha256)
        return generation

    def set_canary(self, name: str, canary: dict[str, Any] | None) -> int:
        with self._transaction(durable=True) as db:
            if db.execute("SELECT 1 FROM desired WHERE name = ?", (name,)).fetchone() is None:
                raise StoreError(f"{name} has no desired version: a canary needs one beside it", package=name)
            generation = self._bump(db)
            db.execute(
                "UPDATE desired SET canary = ?, generation = ?, updated_at = ? WHERE name = ?",
                (json.dumps(canary) if canary is not None else None, generation, time.time(), name),
            )
        return generation

    def remove_desired(self, name: str) -> int:
        with self._transaction(durable=True) as db:
            generation = self._bump(db)
            db.execute("DELETE FROM desired WHERE name = ?", (name,))
        return generation

    @staticmethod
    def _bump(db: Db) -> int:
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', 1) ON CONFLICT (key) DO UPDATE SET value = meta.value + 1"
        )
        return int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    @staticmethod
    def _write_desired(
        db: Db,
        name: str,
        version: str | None,
        sha256: str | None,
        lineage: list[tuple[str, str]],
        generation: int,
    ) -> None:
        # A new active version ends any canary (promoted, or replaced): `canary` back to NULL.
        db.execute(
            "INSERT INTO desired (name, version, sha256, lineage, generation, updated_at, canary) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
            "sha256 = excluded.sha256, lineage = excluded.lineage, generation = excluded.generation, "
            "updated_at = excluded.updated_at, canary = NULL",
            (name, version, sha256, json.dumps(lineage), generation, time.time()),
        )

    # -- history ----------------------------------------------------------------------------

    def record(self, record: dict[str, Any]) -> None:
        # One upsert of one row: nothing to serialize with (nobody waits for history).
        with self._transaction(serialized=False) as db:
            self._write_record(db, record)

    @staticmethod
    def _write_record(db: Db, record: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO history (id, package, started_at, record, worker, finished_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET package = excluded.package, "
            "started_at = excluded.started_at, record = excluded.record, worker = excluded.worker, "
            "finished_at = excluded.finished_at",
            (
                record["id"],
                record["package"],
                record["started_at"],
                json.dumps(record),
                record.get("worker"),
                record.get("finished_at"),
            ),
        )

    def history(self, limit: int = 100, package: str | None = None) -> list[dict[str, Any]]:
        if package:
            rows = self._query(
                "SELECT record FROM history WHERE package = ? ORDER BY started_at DESC LIMIT ?",
                package,
                limit,
            )
        else:
            rows = self._query("SELECT record FROM history ORDER BY started_at DESC LIMIT ?", limit)
        return [json.loads(row[0]) for row in rows]

    def deployment(self, deployment_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT record FROM history WHERE id = ?", deployment_id)
        return json.loads(rows[0][0]) if rows else None

    def finish_orphaned_records(self, live: set[str]) -> int:
        """A record is orphaned when it is unfinished and its worker is not live: it is finished
        as "succeeded" if its operation was committed (the change stands), else "interrupted".
        Its operation, if still under way, is abandoned too, so the two tell the same story (and
        a coordinator thought dead cannot commit what its record calls interrupted)."""
        finished = 0
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, worker FROM history WHERE finished_at IS NULL AND worker IS NOT NULL"
            ).fetchall()
            for record_id, worker in rows:
                if worker in live:
                    continue
                operation = self._operationsql_in(db, record_id)
                if operation is not None and operation.phase.active and operation.coordinator not in live:
                    self._abandon(db, operation)
                else:
                    committed = operation is not None and operation.phase in COMMITTED_PHASES
                    self._finish_record(db, record_id, worker, committed=committed)
                finished += 1
        return finished

    def _finish_record(self, db: Db, record_id: str, worker: str, *, committed: bool) -> None:
        row = db.execute(
            "SELECT record FROM history WHERE id = ? AND finished_at IS NULL", (record_id,)
        ).fetchone()
        if row is not None:
            self._write_record(db, finish_orphaned(json.loads(row[0]), worker, committed=committed))

    # -- workers ----------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, serving: dict[str, str]) -> None:
        written = self._serving_written
        try:
            # Not serialized with the other writers: one row of its own, written in one statement.
            with self._transaction(serialized=False) as db:
                now = self._db_now(db)
                # What it serves rarely changes: then only the time is written (with 1000
                # packages, rewriting the map on every beat costs an idle worker more CPU).
                if written.get(worker_id) == serving:
                    updated = db.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, worker_id))
                    if updated.rowcount == 1:
                        return
                db.execute(
                    "INSERT INTO workers (id, pid, started_at, heartbeat_at, serving) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, serving = excluded.serving",
                    (worker_id, os.getpid(), now, now, json.dumps(serving)),
                )
                written[worker_id] = dict(serving)  # under the lock: concurrent beats stay in order
        except BaseException:
            written.pop(worker_id, None)  # not known to be written: write it in full next time
            raise

    def remove_worker(self, worker_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self, max_age: float | None = None) -> list[Worker]:
        """Times in this process's clock: the ages are the database clock's (see `_clock_offset`)."""
        rows = self._query(
            "SELECT id, pid, started_at, heartbeat_at, serving FROM workers ORDER BY started_at"
        )
        offset = self._clock_offset()
        now = time.time()
        return [
            Worker(row[0], row[1], row[2] + offset, row[3] + offset, json.loads(row[4]))
            for row in rows
            if max_age is None or now - (row[3] + offset) <= max_age
        ]

    def forget_workers(self, older_than: float) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM workers WHERE heartbeat_at < ?", (self._db_now(db) - older_than,))

    # -- cluster operations -----------------------------------------------------------------

    def begin_operation(self, operation: Operation, live: Container[str]) -> Operation | None:
        if Phase(operation.phase) is not Phase.PREPARE:
            raise IllegalTransition(
                f"operation {operation.id} must begin in phase {Phase.PREPARE}, not {operation.phase}",
                package=operation.package,
            )
        with self._transaction() as db:
            # Few are ever under way: those changing one of its packages are found here.
            under_way = db.execute(
                f"SELECT {OP_COLUMNS} FROM operations WHERE phase IN {sql_in(_ACTIVE_PHASES)} ORDER BY created_at",
                _ACTIVE_PHASES,
            ).fetchall()
            for row in under_way:
                other = operation_from_row(row)
                if not other.packages & operation.packages:
                    continue
                if other.coordinator in live:
                    return other
                self._abandon(db, other)
            db.execute(
                f"INSERT INTO operations ({OP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    operation.id,
                    operation.package,
                    OperationKind(operation.kind).value,
                    operation.version,
                    operation.sha256,
                    json.dumps(operation.lineage),
                    Phase.PREPARE.value,
                    operation.coordinator,
                    operation.created_at,
                    json.dumps([m.to_json() for m in operation.members]) if operation.members else None,
                ),
            )
        return None

    def abandon(self, operation: Operation) -> None:
        with self._transaction() as db:
            stored = self._operationsql_in(db, operation.id)
            if stored is not None:
                self._abandon(db, stored)

    def _abandon(self, db: Db, operation: Operation) -> None:
        """A dead coordinator's operation: before its commit nothing changed (ABORT, its record
        interrupted); after it the change stands (DONE, its record succeeded), only its last
        steps were not seen. `operation` as stored, read in this transaction."""
        if not operation.phase.active:
            return
        committed = operation.phase is Phase.COMMIT
        self._move(db, operation, Phase.DONE if committed else Phase.ABORT)
        record_id = operation.id
        if operation.kind is OperationKind.CANARY:
            # Nobody drives its canary any more: it ends, and the active version alone serves.
            self._end_canary_of(db, operation)
            committed = False
            record_id = operation.id.removesuffix(CANARY_SUFFIX)
        self._finish_record(db, record_id, operation.coordinator, committed=committed)

    def _end_canary_of(self, db: Db, operation: Operation) -> None:
        row = db.execute("SELECT canary FROM desired WHERE name = ?", (operation.package,)).fetchone()
        if row is not None and row[0] and json.loads(row[0]).get("operation") == operation.id:
            generation = self._bump(db)
            db.execute(
                "UPDATE desired SET canary = NULL, generation = ?, updated_at = ? WHERE name = ?",
                (generation, time.time(), operation.package),
            )

    def operations(self, since: float = 0.0) -> list[Operation]:
        rows = self._query(
            f"SELECT {OP_COLUMNS} FROM operations WHERE created_at >= ? ORDER BY created_at", since
        )
        return [operation_from_row(row) for row in rows]

    def active_operations(self) -> list[Operation]:
        rows = self._query(
            f"SELECT {OP_COLUMNS} FROM operations WHERE phase IN {sql_in(_ACTIVE_PHASES)} ORDER BY created_at",
            *_ACTIVE_PHASES,
        )
        return [operation_from_row(row) for row in rows]

    def operation(self, op_id: str) -> Operation | None:
        rows = self._query(f"SELECT {OP_COLUMNS} FROM operations WHERE id = ?", op_id)
        return operation_from_row(rows[0]) if rows else None

    @staticmethod
    def _operationsql_in(db: Db, op_id: str) -> Operation | None:
        row = db.execute(f"SELECT {OP_COLUMNS} FROM operations WHERE id = ?", (op_id,)).fetchone()
        return operation_from_row(row) if row is not None else None

    def vote(self, op_id: str, worker_id: str, vote: Vote, detail: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO votes (operation, worker, vote, detail) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (operation, worker) DO UPDATE SET vote = excluded.vote, detail = excluded.detail",
                (op_id, worker_id, Vote(vote).value, detail),
            )

    def votes(self, op_id: str) -> dict[str, tuple[Vote, str | None]]:
        rows = self._query("SELECT worker, vote, detail FROM votes WHERE operation = ?", op_id)
        return {row[0]: (Vote(row[1]), row[2]) for row in rows}

    def set_phase(self, op_id: str, phase: Phase) -> None:
        with self._transaction() as db:
            operation = self._operationsql_in(db, op_id)
            if operation is None:
                raise IllegalTransition(f"operation {op_id} does not exist: it cannot move to phase {phase}")
            self._move(db, operation, Phase(phase))

    @staticmethod
    def _move(db: Db, operation: Operation, phase: Phase) -> None:
        """The one place a phase changes: checked against PHASE_TRANSITIONS in the transaction
        that changes it, so two workers cannot both move an operation from the same phase."""
        if operation.phase is phase:
            return
        if phase not in PHASE_TRANSITIONS[operation.phase]:
            raise IllegalTransition(
                f"operation {operation.id} is in phase {operation.phase}: it cannot move to phase {phase}",
                package=operation.package,
            )
        db.execute("UPDATE operations SET phase = ? WHERE id = ?", (phase.value, operation.id))

    def commit(self, operation: Operation, canary: dict[str, Any] | None = None) -> int:
        """The stored operation's change is what is committed: what every worker prepared."""
        with self._transaction(durable=True) as db:
            stored = self._operationsql_in(db, operation.id)
            if stored is None or stored.phase is not Phase.PREPARE:
                found = f"is in phase {stored.phase}" if stored is not None else "does not exist"
                raise IllegalTransition(
                    f"operation {operation.id} {found}: only one in phase {Phase.PREPARE} can be committed",
                    package=operation.package,
                )
            if stored.kind is OperationKind.CANARY and (
                canary is None
                or db.execute("SELECT 1 FROM desired WHERE name = ?", (stored.package,)).fetchone() is None
            ):
                raise StoreError(
                    f"operation {operation.id}: a canary is committed with its state, beside a desired version",
                    package=operation.package,
                )
            generation = self._bump(db)
            if stored.kind is OperationKind.REMOVE:
                db.execute("DELETE FROM desired WHERE name = ?", (stored.package,))
            elif stored.kind is OperationKind.CANARY:
                db.execute(
                    "UPDATE desired SET canary = ?, generation = ?, updated_at = ? WHERE name = ?",
                    (json.dumps(canary), generation, time.time(), stored.package),
                )
            else:
                self._write_desired(
                    db, stored.package, stored.version, stored.sha256, stored.lineage, generation
                )
                if stored.version is not None and stored.sha256 is not None:
                    self._mark_activated(db, stored.package, stored.version, stored.sha256)
            # A set: every package of it in this transaction (a canary's members are its
            # dependents, which follow it: their desired state does not change).
            for member in stored.members if stored.kind is not OperationKind.CANARY else ():
                if member.version is None or member.sha256 is None:
                    db.execute("DELETE FROM desired WHERE name = ?", (member.package,))
                    continue
                self._write_desired(
                    db, member.package, member.version, member.sha256, member.lineage, generation
                )
                self._mark_activated(db, member.package, member.version, member.sha256)
            self._move(db, stored, Phase.COMMIT)
        return generation

    def prune_operations(self, older_than: float) -> None:
        cutoff = time.time() - older_than
        finished = f"created_at < ? AND phase IN {sql_in(_FINISHED_PHASES)}"
        with self._transaction() as db:
            db.execute(
                f"DELETE FROM votes WHERE operation IN (SELECT id FROM operations WHERE {finished})",
                (cutoff, *_FINISHED_PHASES),
            )
            db.execute(f"DELETE FROM operations WHERE {finished}", (cutoff, *_FINISHED_PHASES))


def operation_from_row(row: tuple[Any, ...]) -> Operation:
    return Operation(
        id=row[0],
        package=row[1],
        kind=OperationKind(row[2]),
        version=row[3],
        sha256=row[4],
        lineage=[(v, s) for v, s in json.loads(row[5] or "[]")],
        phase=Phase(row[6]),
        coordinator=row[7],
        created_at=row[8],
        members=tuple(Member.from_json(m) for m in json.loads(row[9] or "[]")),
    )
