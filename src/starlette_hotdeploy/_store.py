"""Store: what survives a restart, under the home directory.

    home/
      state.db                  SQLite (WAL): desired state, archives index, history, workers
      archives/<name>/<version>-<sha12>.zip     every deployed archive, written tmp+fsync+rename
      packages/<name>/<version>-<sha12>/        unpacked versions (a cache: rebuilt from archives)

The desired state says which version of each package is active, with a generation number that
grows by one on every change; it changes only when a deployment is confirmed, in one transaction,
so a crash at any point leaves either the old or the new confirmed state.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS archives (
    name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
    path TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (name, version, sha256)
);
CREATE TABLE IF NOT EXISTS desired (
    name TEXT PRIMARY KEY, version TEXT NOT NULL, sha256 TEXT NOT NULL,
    lineage TEXT NOT NULL, generation INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    id TEXT PRIMARY KEY, package TEXT, started_at REAL NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_started ON history (started_at);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL, serving TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY, package TEXT NOT NULL, kind TEXT NOT NULL,
    version TEXT, sha256 TEXT, lineage TEXT, phase TEXT NOT NULL,
    coordinator TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_phase ON operations (phase);
CREATE TABLE IF NOT EXISTS votes (
    operation TEXT NOT NULL, worker TEXT NOT NULL, vote TEXT NOT NULL, detail TEXT,
    PRIMARY KEY (operation, worker)
);
"""

# Phases of a cluster operation: every live worker prepares and votes; then the coordinator
# commits (the desired state changes in the same transaction) or aborts.
ACTIVE_PHASES = ("prepare", "commit")


@dataclass(frozen=True, slots=True)
class StoredArchive:
    name: str
    version: str
    sha256: str
    path: Path
    created_at: float


@dataclass(frozen=True, slots=True)
class Worker:
    id: str
    pid: int
    started_at: float
    heartbeat_at: float
    serving: dict[str, str]  # package -> version


@dataclass(frozen=True, slots=True)
class Operation:
    """A change every worker carries out: `kind` is "activate" (version, sha256) or "remove"."""

    id: str
    package: str
    kind: str
    version: str | None
    sha256: str | None
    lineage: list[tuple[str, str]]
    phase: str
    coordinator: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Desired:
    """The confirmed active version of a package, and the versions before it (for rollback)."""

    name: str
    version: str
    sha256: str
    lineage: list[tuple[str, str]]  # (version, sha256) in activation order, the active one last
    generation: int


class Store:
    """Durable state in SQLite (stdlib, WAL mode) plus archive files. Thread-safe; every method
    is a short blocking call (run it in a worker thread from async code)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.archives_dir = home / "archives"
        self.archives_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.home / "state.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a crash of the process; the transactions that confirm a state
        # (`durable=True`) switch to FULL so that they also survive a power loss.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
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
        """Changes whenever another connection (another worker) committed: a cheap poll."""
        return int(self._query("PRAGMA data_version")[0][0])

    # -- archives ---------------------------------------------------------------------------

    def save_archive(self, name: str, version: str, sha256: str, data: bytes) -> Path:
        """Keep an archive: written to a temporary file, fsynced, renamed (never overwritten in
        place), then indexed. Saving the same archive again is a no-op."""
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
            db.execute(
                "INSERT OR IGNORE INTO archives VALUES (?, ?, ?, ?, ?)",
                (name, version, sha256, str(path.relative_to(self.home)), time.time()),
            )
        return path

    def archive(self, name: str, version: str, sha256: str | None = None) -> StoredArchive | None:
        """The newest archive of that version (of that sha256, if given)."""
        rows = self._query(
            "SELECT name, version, sha256, path, created_at FROM archives WHERE name = ? AND version = ?"
            + (" AND sha256 = ?" if sha256 else "")
            + " ORDER BY created_at DESC LIMIT 1",
            *((name, version, sha256) if sha256 else (name, version)),
        )
        return self._archive_row(rows[0]) if rows else None

    def archives(self, name: str) -> list[StoredArchive]:
        """A package's archives, oldest first."""
        rows = self._query(
            "SELECT name, version, sha256, path, created_at FROM archives WHERE name = ? ORDER BY created_at",
            name,
        )
        return [self._archive_row(row) for row in rows]

    def _archive_row(self, row: tuple[Any, ...]) -> StoredArchive:
        return StoredArchive(row[0], row[1], row[2], self.home / row[3], row[4])

    def prune(self, name: str, keep: int, protect: set[tuple[str, str]]) -> list[StoredArchive]:
        """Drop all but the newest `keep` archives of a package (never one in `protect`)."""
        stored = self.archives(name)
        surplus = [a for a in stored[: max(len(stored) - keep, 0)] if (a.version, a.sha256) not in protect]
        with self._transaction() as db:
            for archive in surplus:
                db.execute(
                    "DELETE FROM archives WHERE name = ? AND version = ? AND sha256 = ?",
                    (archive.name, archive.version, archive.sha256),
                )
        for archive in surplus:
            archive.path.unlink(missing_ok=True)
        return surplus

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
        """Confirm `version` as the active one; returns the new generation."""
        with self._transaction(durable=True) as db:
            generation = self._bump(db)
            db.execute(
                "INSERT OR REPLACE INTO desired VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, sha256, json.dumps(lineage), generation, time.time()),
            )
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

    # -- history ----------------------------------------------------------------------------

    def record(self, record: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)",
                (record["id"], record["package"], record["started_at"], json.dumps(record)),
            )

    def history(self, limit: int = 100, package: str | None = None) -> list[dict[str, Any]]:
        """Deployment records, newest first."""
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

    # -- workers ----------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, serving: dict[str, str]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO workers VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, serving = excluded.serving",
                (worker_id, os.getpid(), now, now, json.dumps(serving)),
            )

    def remove_worker(self, worker_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self, max_age: float | None = None) -> list[Worker]:
        """Workers whose last heartbeat is at most `max_age` seconds old (all if None)."""
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
        """Record `operation` unless another one on the same package is under way, led by a
        live worker; return that one instead (a dead coordinator's operation is aborted)."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, coordinator FROM operations WHERE package = ? AND phase IN (?, ?)",
                (operation.package, *ACTIVE_PHASES),
            ).fetchall()
            for op_id, coordinator in rows:
                if coordinator in live:
                    return self._operation_row(
                        db.execute(f"SELECT {_OP_COLUMNS} FROM operations WHERE id = ?", (op_id,)).fetchone()
                    )
                self._abandon(db, op_id, coordinator)
            db.execute(
                f"INSERT INTO operations ({_OP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    operation.id,
                    operation.package,
                    operation.kind,
                    operation.version,
                    operation.sha256,
                    json.dumps(operation.lineage),
                    operation.phase,
                    operation.coordinator,
                    operation.created_at,
                ),
            )
        return None

    def abandon(self, operation: Operation) -> None:
        """End an operation whose coordinator died (see `_abandon`)."""
        with self._transaction() as db:
            self._abandon(db, operation.id, operation.coordinator)

    @staticmethod
    def _abandon(db: sqlite3.Connection, op_id: str, coordinator: str) -> None:
        """A dead coordinator's operation: before its commit nothing changed (aborted, the
        record failed); after it the change stands, only its last steps were not seen."""
        row = db.execute("SELECT phase FROM operations WHERE id = ?", (op_id,)).fetchone()
        if row is None or row[0] not in ACTIVE_PHASES:
            return
        committed = row[0] == "commit"
        db.execute("UPDATE operations SET phase = ? WHERE id = ?", ("done" if committed else "abort", op_id))
        found = db.execute("SELECT record FROM history WHERE id = ?", (op_id,)).fetchone()
        if found is None:
            return
        record = json.loads(found[0])
        if record.get("outcome") != "pending":
            return
        record["outcome"] = "succeeded" if committed else "failed"
        record["finished_at"] = time.time()
        record["error"] = f"worker {coordinator} stopped during the deployment" + (
            "; the change had been committed" if committed else "; nothing changed"
        )
        db.execute("UPDATE history SET record = ? WHERE id = ?", (json.dumps(record), op_id))

    def operations(self, since: float = 0.0) -> list[Operation]:
        rows = self._query(
            f"SELECT {_OP_COLUMNS} FROM operations WHERE created_at >= ? ORDER BY created_at", since
        )
        return [self._operation_row(row) for row in rows]

    def active_operations(self) -> list[Operation]:
        """Operations still in their prepare or commit phase (what a follower acts on)."""
        rows = self._query(
            f"SELECT {_OP_COLUMNS} FROM operations WHERE phase IN (?, ?) ORDER BY created_at", *ACTIVE_PHASES
        )
        return [self._operation_row(row) for row in rows]

    def operation(self, op_id: str) -> Operation | None:
        rows = self._query(f"SELECT {_OP_COLUMNS} FROM operations WHERE id = ?", op_id)
        return self._operation_row(rows[0]) if rows else None

    @staticmethod
    def _operation_row(row: tuple[Any, ...]) -> Operation:
        return Operation(
            row[0], row[1], row[2], row[3], row[4], [(v, s) for v, s in json.loads(row[5] or "[]")], *row[6:]
        )

    def vote(self, op_id: str, worker_id: str, vote: str, detail: str | None = None) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?)", (op_id, worker_id, vote, detail))

    def votes(self, op_id: str) -> dict[str, tuple[str, str | None]]:
        rows = self._query("SELECT worker, vote, detail FROM votes WHERE operation = ?", op_id)
        return {row[0]: (row[1], row[2]) for row in rows}

    def set_phase(self, op_id: str, phase: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE operations SET phase = ? WHERE id = ?", (phase, op_id))

    def commit(self, operation: Operation) -> int:
        """Phase "commit" and the new desired state, in one transaction."""
        with self._transaction(durable=True) as db:
            generation = self._bump(db)
            if operation.kind == "remove":
                db.execute("DELETE FROM desired WHERE name = ?", (operation.package,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO desired VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        operation.package,
                        operation.version,
                        operation.sha256,
                        json.dumps(operation.lineage),
                        generation,
                        time.time(),
                    ),
                )
            db.execute("UPDATE operations SET phase = 'commit' WHERE id = ?", (operation.id,))
        return generation

    def prune_operations(self, older_than: float) -> None:
        cutoff = time.time() - older_than
        with self._transaction() as db:
            db.execute(
                "DELETE FROM votes WHERE operation IN (SELECT id FROM operations WHERE created_at < ? "
                "AND phase NOT IN (?, ?))",
                (cutoff, *ACTIVE_PHASES),
            )
            db.execute(
                "DELETE FROM operations WHERE created_at < ? AND phase NOT IN (?, ?)",
                (cutoff, *ACTIVE_PHASES),
            )


_OP_COLUMNS = "id, package, kind, version, sha256, lineage, phase, coordinator, created_at"


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
