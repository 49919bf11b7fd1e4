"""SQLiteStore: the `Store` protocol in one SQLite database (stdlib, WAL mode) plus archive files.

The schema is the list `_MIGRATIONS`, applied in order; `PRAGMA user_version` counts the ones a
database has had. Opening a store applies the missing ones inside `BEGIN IMMEDIATE`, so when
several workers open a new home at once, one migrates and the others then find nothing to do.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._errors import HotDeployError, IllegalTransition
from ._operation import PHASE_TRANSITIONS, Operation, OperationKind, Phase, Vote
from ._store import STALE_UPLOAD_AFTER, Desired, Store, StoredArchive, Worker, finish_orphaned

_ACTIVE_PHASES = tuple(phase.value for phase in Phase if phase.active)
_FINISHED_PHASES = tuple(phase.value for phase in Phase if not phase.active)
_COMMITTED_PHASES = (Phase.COMMIT, Phase.DONE)


def _in(values: tuple[str, ...]) -> str:
    """`(?, ?, …)` for an `IN` over `values`."""
    return "(" + ", ".join("?" * len(values)) + ")"


# -- schema migrations --------------------------------------------------------------------------


def _create_tables(db: sqlite3.Connection) -> None:
    """1: the original schema. IF NOT EXISTS: homes made before user_version was kept have it."""
    for statement in (
        """CREATE TABLE IF NOT EXISTS archives (
            name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
            path TEXT NOT NULL, created_at REAL NOT NULL,
            PRIMARY KEY (name, version, sha256))""",
        """CREATE TABLE IF NOT EXISTS desired (
            name TEXT PRIMARY KEY, version TEXT NOT NULL, sha256 TEXT NOT NULL,
            lineage TEXT NOT NULL, generation INTEGER NOT NULL, updated_at REAL NOT NULL)""",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        """CREATE TABLE IF NOT EXISTS history (
            id TEXT PRIMARY KEY, package TEXT, started_at REAL NOT NULL, record TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS history_started ON history (started_at)",
        """CREATE TABLE IF NOT EXISTS workers (
            id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL, serving TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS operations (
            id TEXT PRIMARY KEY, package TEXT NOT NULL, kind TEXT NOT NULL,
            version TEXT, sha256 TEXT, lineage TEXT, phase TEXT NOT NULL,
            coordinator TEXT NOT NULL, created_at REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS operations_phase ON operations (phase)",
        """CREATE TABLE IF NOT EXISTS votes (
            operation TEXT NOT NULL, worker TEXT NOT NULL, vote TEXT NOT NULL, detail TEXT,
            PRIMARY KEY (operation, worker))""",
    ):
        db.execute(statement)


def _add_history_worker_and_finished_at(db: sqlite3.Connection) -> None:
    """2: who coordinates a record and whether it finished, as columns: unfinished records of a
    dead worker are then one query away."""
    db.execute("ALTER TABLE history ADD COLUMN worker TEXT")
    db.execute("ALTER TABLE history ADD COLUMN finished_at REAL")
    for record_id, text in db.execute("SELECT id, record FROM history").fetchall():
        record = json.loads(text)
        db.execute(
            "UPDATE history SET worker = ?, finished_at = ? WHERE id = ?",
            (record.get("worker"), record.get("finished_at"), record_id),
        )
    db.execute("CREATE INDEX history_unfinished ON history (worker) WHERE finished_at IS NULL")


def _add_archive_activated_at(db: sqlite3.Connection) -> None:
    """3: when each archive was last made active (NULL: never, a failed upload); retention and
    what is offered for activation go by it.

    Backfilled only where a row proves an activation (a commit): the versions of a desired
    lineage (the active one at its desired row's update, the others at least at their upload),
    committed ACTIVATE operations, and records that succeeded or were rolled back after their
    commit; each at its latest such time. Every other archive stays never-activated: mostly failed
    uploads, which the old listing offered as available (the bug this fixes). They are no longer
    listed, and the next prune deletes them as stale; a version activated so long ago that no row
    remembers it is lost to rollback, which is the price of never offering a failed one."""
    db.execute("ALTER TABLE archives ADD COLUMN activated_at REAL")
    activated: dict[tuple[str, str, str], float] = {}

    def saw(name: str, version: str | None, sha256: str | None, at: float) -> None:
        if version is not None and sha256 is not None:
            key = (name, version, sha256)
            activated[key] = max(activated.get(key, at), at)

    for name, lineage, updated_at in db.execute("SELECT name, lineage, updated_at FROM desired").fetchall():
        pairs = json.loads(lineage)
        for index, (version, sha256) in enumerate(pairs):
            saw(name, version, sha256, updated_at if index == len(pairs) - 1 else 0.0)
    committed = _in(tuple(phase.value for phase in _COMMITTED_PHASES))
    for row in db.execute(
        f"SELECT package, version, sha256, created_at FROM operations WHERE kind = ? AND phase IN {committed}",
        (OperationKind.ACTIVATE.value, *(phase.value for phase in _COMMITTED_PHASES)),
    ).fetchall():
        saw(*row)
    for started_at, text in db.execute("SELECT started_at, record FROM history").fetchall():
        record = json.loads(text)
        if record.get("outcome") in ("succeeded", "rolled_back") and record.get("package"):
            saw(record["package"], record.get("to_version"), record.get("sha256"), started_at)
    for (name, version, sha256), at in activated.items():
        db.execute(  # never before its upload: 0.0 (a lineage entry without a time) means that
            "UPDATE archives SET activated_at = MAX(created_at, ?) WHERE name = ? AND version = ? AND sha256 = ?",
            (at, name, version, sha256),
        )


_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _create_tables,
    _add_history_worker_and_finished_at,
    _add_archive_activated_at,
]


def _schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _migrate(db: sqlite3.Connection) -> None:
    if _schema_version(db) == len(_MIGRATIONS):
        return  # the usual case, without taking the write lock
    db.execute("BEGIN IMMEDIATE")
    try:
        applied = _schema_version(db)  # again: another process may have migrated meanwhile
        if applied > len(_MIGRATIONS):
            raise HotDeployError(
                f"{_db_path(db)}: schema version {applied} is newer than this starlette-hotdeploy "
                f"knows ({len(_MIGRATIONS)}); upgrade starlette-hotdeploy"
            )
        if applied < len(_MIGRATIONS):
            for migration in _MIGRATIONS[applied:]:
                migration(db)
            db.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _db_path(db: sqlite3.Connection) -> str:
    row = db.execute("PRAGMA database_list").fetchone()
    return str(row[2]) if row else "state.db"


# -- the store ----------------------------------------------------------------------------------

_OP_COLUMNS = "id, package, kind, version, sha256, lineage, phase, coordinator, created_at"
_ARCHIVE_COLUMNS = "name, version, sha256, path, created_at, activated_at"


class SQLiteStore:
    """The store of one home directory: `home/state.db` and `home/archives/`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.archives_dir = home / "archives"
        self.archives_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection = self._connect()
        self._serving_written: dict[str, dict[str, str]] = {}  # worker id -> its last heartbeat's

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.home / "state.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        _enter_wal(db)
        # WAL + NORMAL survives a crash of the process; the transactions that confirm a state
        # (`durable=True`) switch to FULL so that they also survive a power loss.
        db.execute("PRAGMA synchronous=NORMAL")
        _migrate(db)
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        # A connection must not cross a fork (gunicorn --preload builds the app in the master).
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._connection = self._connect()
        return self._connection

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    @contextmanager
    def _transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        db = self._db  # first: after a fork this replaces the lock too
        with self._lock:
            if durable:
                db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                if durable:
                    db.execute("PRAGMA synchronous=NORMAL")

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = self._db
        with self._lock:
            return db.execute(sql, args).fetchall()

    def data_version(self) -> int:
        # SQLite's own counter: it changes when another connection committed, a cheap poll.
        return int(self._query("PRAGMA data_version")[0][0])

    # -- archives ---------------------------------------------------------------------------

    def save_archive(self, name: str, version: str, sha256: str, data: bytes) -> Path:
        """Written to a temporary file, fsynced, renamed (never overwritten in place), then
        indexed, not yet activated."""
        directory = self.archives_dir / name
        path = directory / f"{version}-{sha256[:12]}.zip"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            temporary = directory / f".{path.name}.{os.getpid()}.tmp"
            with open(temporary, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
            _fsync_directory(directory)
        with self._transaction(durable=True) as db:
            # Uploaded again while never activated: a deployment under way again, not stale.
            db.execute(
                f"INSERT INTO archives ({_ARCHIVE_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL) "
                "ON CONFLICT (name, version, sha256) DO UPDATE SET created_at = excluded.created_at "
                "WHERE activated_at IS NULL",
                (name, version, sha256, str(path.relative_to(self.home)), time.time()),
            )
        return path

    def archive(self, name: str, version: str, sha256: str | None = None) -> StoredArchive | None:
        rows = self._query(
            f"SELECT {_ARCHIVE_COLUMNS} FROM archives WHERE name = ? AND version = ?"
            + (" AND sha256 = ?" if sha256 else "")
            + " ORDER BY created_at DESC LIMIT 1",
            *((name, version, sha256) if sha256 else (name, version)),
        )
        return self._archive_row(rows[0]) if rows else None

    def archives(self, name: str) -> list[StoredArchive]:
        rows = self._query(
            f"SELECT {_ARCHIVE_COLUMNS} FROM archives WHERE name = ? AND activated_at IS NOT NULL "
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
                f"SELECT {_ARCHIVE_COLUMNS} FROM archives WHERE name = ? ORDER BY activated_at, created_at",
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
                f"SELECT {_ARCHIVE_COLUMNS} FROM archives "
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

    @staticmethod
    def _delete_archive(db: sqlite3.Connection, archive: StoredArchive) -> None:
        db.execute(
            "DELETE FROM archives WHERE name = ? AND version = ? AND sha256 = ?",
            (archive.name, archive.version, archive.sha256),
        )

    @staticmethod
    def _activating(db: sqlite3.Connection, name: str) -> set[tuple[str, str]]:
        """The (version, sha256) that operations under way on the package activate: the workers
        may still fetch those archives."""
        rows = db.execute(
            f"SELECT version, sha256 FROM operations WHERE package = ? AND kind = ? AND phase IN {_in(_ACTIVE_PHASES)}",
            (name, OperationKind.ACTIVATE.value, *_ACTIVE_PHASES),
        ).fetchall()
        return {(version, sha256) for version, sha256 in rows}

    @staticmethod
    def _mark_activated(db: sqlite3.Connection, name: str, version: str, sha256: str) -> None:
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
        rows = self._query("SELECT name, version, sha256, lineage, generation FROM desired ORDER BY name")
        return {
            row[0]: Desired(row[0], row[1], row[2], [(v, s) for v, s in json.loads(row[3])], row[4])
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

    def remove_desired(self, name: str) -> int:
        with self._transaction(durable=True) as db:
            generation = self._bump(db)
            db.execute("DELETE FROM desired WHERE name = ?", (name,))
        return generation

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        db.execute(
            "INSERT INTO meta VALUES ('generation', 1) ON CONFLICT(key) DO UPDATE SET value = value + 1"
        )
        return int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    @staticmethod
    def _write_desired(
        db: sqlite3.Connection,
        name: str,
        version: str | None,
        sha256: str | None,
        lineage: list[tuple[str, str]],
        generation: int,
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO desired (name, version, sha256, lineage, generation, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (name, version, sha256, json.dumps(lineage), generation, time.time()),
        )

    # -- history ----------------------------------------------------------------------------

    def record(self, record: dict[str, Any]) -> None:
        with self._transaction() as db:
            self._write_record(db, record)

    @staticmethod
    def _write_record(db: sqlite3.Connection, record: dict[str, Any]) -> None:
        db.execute(
            "INSERT OR REPLACE INTO history (id, package, started_at, record, worker, finished_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
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
                operation = self._operation_in(db, record_id)
                if operation is not None and operation.phase.active and operation.coordinator not in live:
                    self._abandon(db, operation)
                else:
                    committed = operation is not None and operation.phase in _COMMITTED_PHASES
                    self._finish_record(db, record_id, worker, committed=committed)
                finished += 1
        return finished

    def _finish_record(self, db: sqlite3.Connection, record_id: str, worker: str, *, committed: bool) -> None:
        row = db.execute(
            "SELECT record FROM history WHERE id = ? AND finished_at IS NULL", (record_id,)
        ).fetchone()
        if row is not None:
            self._write_record(db, finish_orphaned(json.loads(row[0]), worker, committed=committed))

    # -- workers ----------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, serving: dict[str, str]) -> None:
        now = time.time()
        written = self._serving_written
        try:
            with self._transaction() as db:
                # What it serves rarely changes: then only the time is written (with 1000
                # packages, rewriting the map on every beat costs an idle worker more CPU).
                if written.get(worker_id) == serving:
                    updated = db.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, worker_id))
                    if updated.rowcount == 1:
                        return
                db.execute(
                    "INSERT INTO workers VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "heartbeat_at = excluded.heartbeat_at, serving = excluded.serving",
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
        rows = self._query(
            "SELECT id, pid, started_at, heartbeat_at, serving FROM workers ORDER BY started_at"
        )
        now = time.time()
        return [
            Worker(row[0], row[1], row[2], row[3], json.loads(row[4]))
            for row in rows
            if max_age is None or now - row[3] <= max_age
        ]

    def forget_workers(self, older_than: float) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM workers WHERE heartbeat_at < ?", (time.time() - older_than,))

    # -- cluster operations -----------------------------------------------------------------

    def begin_operation(self, operation: Operation, live: set[str]) -> Operation | None:
        if Phase(operation.phase) is not Phase.PREPARE:
            raise IllegalTransition(
                f"operation {operation.id} must begin in phase {Phase.PREPARE}, not {operation.phase}",
                package=operation.package,
            )
        with self._transaction() as db:
            under_way = db.execute(
                f"SELECT {_OP_COLUMNS} FROM operations WHERE package = ? AND phase IN {_in(_ACTIVE_PHASES)} "
                "ORDER BY created_at",
                (operation.package, *_ACTIVE_PHASES),
            ).fetchall()
            for row in under_way:
                other = _operation_from_row(row)
                if other.coordinator in live:
                    return other
                self._abandon(db, other)
            db.execute(
                f"INSERT INTO operations ({_OP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
        return None

    def abandon(self, operation: Operation) -> None:
        with self._transaction() as db:
            stored = self._operation_in(db, operation.id)
            if stored is not None:
                self._abandon(db, stored)

    def _abandon(self, db: sqlite3.Connection, operation: Operation) -> None:
        """A dead coordinator's operation: before its commit nothing changed (ABORT, its record
        interrupted); after it the change stands (DONE, its record succeeded), only its last
        steps were not seen. `operation` as stored, read in this transaction."""
        if not operation.phase.active:
            return
        committed = operation.phase is Phase.COMMIT
        self._move(db, operation, Phase.DONE if committed else Phase.ABORT)
        self._finish_record(db, operation.id, operation.coordinator, committed=committed)

    def operations(self, since: float = 0.0) -> list[Operation]:
        rows = self._query(
            f"SELECT {_OP_COLUMNS} FROM operations WHERE created_at >= ? ORDER BY created_at", since
        )
        return [_operation_from_row(row) for row in rows]

    def active_operations(self) -> list[Operation]:
        rows = self._query(
            f"SELECT {_OP_COLUMNS} FROM operations WHERE phase IN {_in(_ACTIVE_PHASES)} ORDER BY created_at",
            *_ACTIVE_PHASES,
        )
        return [_operation_from_row(row) for row in rows]

    def operation(self, op_id: str) -> Operation | None:
        rows = self._query(f"SELECT {_OP_COLUMNS} FROM operations WHERE id = ?", op_id)
        return _operation_from_row(rows[0]) if rows else None

    @staticmethod
    def _operation_in(db: sqlite3.Connection, op_id: str) -> Operation | None:
        row = db.execute(f"SELECT {_OP_COLUMNS} FROM operations WHERE id = ?", (op_id,)).fetchone()
        return _operation_from_row(row) if row is not None else None

    def vote(self, op_id: str, worker_id: str, vote: Vote, detail: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?)",
                (op_id, worker_id, Vote(vote).value, detail),
            )

    def votes(self, op_id: str) -> dict[str, tuple[Vote, str | None]]:
        rows = self._query("SELECT worker, vote, detail FROM votes WHERE operation = ?", op_id)
        return {row[0]: (Vote(row[1]), row[2]) for row in rows}

    def set_phase(self, op_id: str, phase: Phase) -> None:
        with self._transaction() as db:
            operation = self._operation_in(db, op_id)
            if operation is None:
                raise IllegalTransition(f"operation {op_id} does not exist: it cannot move to phase {phase}")
            self._move(db, operation, Phase(phase))

    @staticmethod
    def _move(db: sqlite3.Connection, operation: Operation, phase: Phase) -> None:
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

    def commit(self, operation: Operation) -> int:
        """The stored operation's change is what is committed: what every worker prepared."""
        with self._transaction(durable=True) as db:
            stored = self._operation_in(db, operation.id)
            if stored is None or stored.phase is not Phase.PREPARE:
                found = f"is in phase {stored.phase}" if stored is not None else "does not exist"
                raise IllegalTransition(
                    f"operation {operation.id} {found}: only one in phase {Phase.PREPARE} can be committed",
                    package=operation.package,
                )
            generation = self._bump(db)
            if stored.kind is OperationKind.REMOVE:
                db.execute("DELETE FROM desired WHERE name = ?", (stored.package,))
            else:
                self._write_desired(
                    db, stored.package, stored.version, stored.sha256, stored.lineage, generation
                )
                if stored.version is not None and stored.sha256 is not None:
                    self._mark_activated(db, stored.package, stored.version, stored.sha256)
            self._move(db, stored, Phase.COMMIT)
        return generation

    def prune_operations(self, older_than: float) -> None:
        cutoff = time.time() - older_than
        finished = f"created_at < ? AND phase IN {_in(_FINISHED_PHASES)}"
        with self._transaction() as db:
            db.execute(
                f"DELETE FROM votes WHERE operation IN (SELECT id FROM operations WHERE {finished})",
                (cutoff, *_FINISHED_PHASES),
            )
            db.execute(f"DELETE FROM operations WHERE {finished}", (cutoff, *_FINISHED_PHASES))


def _operation_from_row(row: tuple[Any, ...]) -> Operation:
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
    )


def _fsync_directory(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry itself must be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_store(home: Path) -> Store:
    """The store of a home directory (created if missing): the embedded default, SQLite."""
    return SQLiteStore(home)


def _enter_wal(db: sqlite3.Connection, deadline: float = 30.0) -> None:
    """Switch to WAL; the busy timeout does not cover this pragma, so two processes opening a new
    home at once can see "database is locked": retry until the other one is done."""
    give_up = time.monotonic() + deadline
    pause = 0.005
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
