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

from . import _switch_interval as switch_interval
from ._errors import HotDeployError
from ._files import write_all
from ._operation import OperationKind
from ._sql_store import COMMITTED_PHASES, SQLStore, sql_in

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
    committed = sql_in(tuple(phase.value for phase in COMMITTED_PHASES))
    for row in db.execute(
        f"SELECT package, version, sha256, created_at FROM operations WHERE kind = ? AND phase IN {committed}",
        (OperationKind.ACTIVATE.value, *(phase.value for phase in COMMITTED_PHASES)),
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


def _add_desired_canary(db: sqlite3.Connection) -> None:
    """4: a package's canary (JSON: version, weight, step, plan), beside its desired version."""
    db.execute("ALTER TABLE desired ADD COLUMN canary TEXT")


def _add_operation_members(db: sqlite3.Connection) -> None:
    """5: the other packages an operation changes in the same commit (JSON; a set deployed together)."""
    db.execute("ALTER TABLE operations ADD COLUMN members TEXT")


_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _create_tables,
    _add_history_worker_and_finished_at,
    _add_archive_activated_at,
    _add_desired_canary,
    _add_operation_members,
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
class SQLiteStore(SQLStore):
    """The store of one home directory: `home/state.db` and `home/archives/`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.archives_dir = home / "archives"
        self.archives_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection = self._connect()
        self._serving_written: dict[str, dict[str, str]] = {}  # worker id -> its last heartbeat's

    def describe(self) -> str:
        """Where it is."""
        return f"sqlite: {self.home / 'state.db'}"

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
    def _transaction(self, *, durable: bool = False, serialized: bool = True) -> Iterator[sqlite3.Connection]:
        # Every SQLite write transaction is serialized (BEGIN IMMEDIATE takes the write lock).
        # It holds that lock for every worker of the home: with a short switch interval, each of
        # its statements gets the GIL back at once from a busy event loop (see _switch_interval).
        db = self._db  # first: after a fork this replaces the lock too
        with self._lock, switch_interval.shortened():
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
        with self._lock, switch_interval.shortened():
            return db.execute(sql, args).fetchall()

    def data_version(self) -> int:
        # SQLite's own counter: it changes when another connection committed, a cheap poll.
        return int(self._query("PRAGMA data_version")[0][0])

    # -- archives ---------------------------------------------------------------------------

    def save_archive(self, name: str, version: str, sha256: str, data: bytes) -> Path:
        """Written to a temporary file, fsynced, renamed (never overwritten in place), then
        indexed, not yet activated."""
        path = self._archive_path(name, version, sha256)
        directory = path.parent
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            temporary = directory / f".{path.name}.{os.getpid()}.tmp"
            with open(temporary, "wb", buffering=0) as out:  # unbuffered: fewer system calls
                write_all(out, data)
                os.fsync(out.fileno())
            os.replace(temporary, path)
            _fsync_directory(directory)
        # Not durable on its own (no WAL flush): an archive matters once a version of it is
        # desired, and the transaction that says so flushes the WAL, this row with it. A power
        # loss before that may lose the row (the file stays: deployed again, it is indexed again).
        with self._transaction() as db:
            self._index_archive(db, name, version, sha256, path)
        return path


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
