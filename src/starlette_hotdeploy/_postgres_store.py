"""PostgresStore: the `Store` protocol in PostgreSQL, for hosts that share nothing but a database.

    <schema>.archives, blobs     archives indexed by (name, version, sha256); their bytes once
                                 per sha256 (content-addressed), fetched by each host on prepare,
                                 verified, and cached in its home: home/archives/<name>/...
    <schema>.desired, meta, history, workers, operations, votes   as in the SQLite store

Everything lives in one schema (`hotdeploy` unless the URL says `?schema=NAME`), so the tables
never meet an application's own. The schema is the list `_MIGRATIONS`; `schema_version` counts
the ones applied, under an advisory lock: two hosts starting at once migrate once.

Every write that the others wait for runs under one transaction-scoped advisory lock, which is
what SQLite's BEGIN IMMEDIATE gives the SQLite store: reads after it see every earlier commit, so
the checks made inside (an operation under way, a phase) hold until the commit. Those writes
NOTIFY the schema's channel; `subscribe` listens on it from a thread of its own and wakes this
worker (the notification is not replayed after a lost connection: on reconnecting it wakes the
worker once, and the workers also look on a slow timer).

Heartbeats and liveness go by the database's clock: hosts whose clocks disagree still agree on
who is alive. psycopg's sync API from worker threads keeps the store usable under asyncio and
trio alike; a connection lost is opened again on the next call.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._detail import redact_url
from ._errors import StoreError
from ._files import replace_file
from ._sql_store import Cursor, Db, SQLStore
from ._store import StoredArchive

try:
    import psycopg
    from psycopg import sql
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise StoreError(
        "the PostgreSQL store needs psycopg: pip install 'starlette-hotdeploy[postgresql]'"
    ) from exc

DEFAULT_SCHEMA = "hotdeploy"
_CHANNEL = "starlette_hotdeploy"
# Advisory lock keys (any bigint; these spell "hotdeplo" and one more): one for the writers that
# must not interleave, one for migrations.
_WRITE_LOCK = 0x686F7464_65706C6F
_MIGRATION_LOCK = _WRITE_LOCK + 1
CONNECT_TIMEOUT = 10  # seconds: a database that does not answer is reported, not waited for
# A write holds the cluster's one write lock until it commits, and ours run for milliseconds. A
# process frozen (SIGSTOP, a paused VM) inside one would hold it, and stall every host, until it
# resumes: the database ends such a session instead, well inside a worker's 5 s lease, so the
# others can abandon what the frozen one led. Its transaction is rolled back, and it reconnects.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 2000


_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE archives (
            name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
            path TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            activated_at DOUBLE PRECISION,
            PRIMARY KEY (name, version, sha256))""",
        "CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, size BIGINT NOT NULL, data BYTEA NOT NULL)",
        """CREATE TABLE desired (
            name TEXT PRIMARY KEY, version TEXT NOT NULL, sha256 TEXT NOT NULL,
            lineage TEXT NOT NULL, generation BIGINT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        """CREATE TABLE history (
            id TEXT PRIMARY KEY, package TEXT, started_at DOUBLE PRECISION NOT NULL,
            record TEXT NOT NULL, worker TEXT, finished_at DOUBLE PRECISION)""",
        "CREATE INDEX history_started ON history (started_at)",
        "CREATE INDEX history_unfinished ON history (worker) WHERE finished_at IS NULL",
        """CREATE TABLE workers (
            id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL, serving TEXT NOT NULL)""",
        """CREATE TABLE operations (
            id TEXT PRIMARY KEY, package TEXT NOT NULL, kind TEXT NOT NULL,
            version TEXT, sha256 TEXT, lineage TEXT, phase TEXT NOT NULL,
            coordinator TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX operations_phase ON operations (phase)",
        """CREATE TABLE votes (
            operation TEXT NOT NULL, worker TEXT NOT NULL, vote TEXT NOT NULL, detail TEXT,
            PRIMARY KEY (operation, worker))""",
        # data_version: bumped by every write, read by a poll (a sequence: no row to contend on).
        "CREATE SEQUENCE changes",
    ],
    # A package's canary (JSON: version, weight, step, plan), beside its desired version.
    ["ALTER TABLE desired ADD COLUMN canary TEXT"],
    # The other packages an operation changes in the same commit (JSON; a set deployed together).
    ["ALTER TABLE operations ADD COLUMN members TEXT"],
]


def split_url(url: str) -> tuple[str, str]:
    """(the libpq URL, the schema): `?schema=NAME` is ours, libpq would refuse it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((value for key, value in query if key == "schema"), DEFAULT_SCHEMA)
    rest = urlencode([(key, value) for key, value in query if key != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


class _Adapter:
    """psycopg's connection with the `?` placeholders the shared queries use."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, query: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self._connection.execute(query.replace("?", "%s").encode(), parameters)


class _Line:
    """One connection of the store, its lock, and the process that opened it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.connection: psycopg.Connection[Any] | None = None


class PostgresStore(SQLStore):
    """The store of every host whose deployer points at this database (and schema)."""

    def __init__(self, url: str, home: Path) -> None:
        self.url, self.schema = split_url(url)
        self.home = home
        self.archives_dir = home / "archives"
        self.archives_dir.mkdir(parents=True, exist_ok=True)
        self._serving_written = {}
        self._offset = 0.0
        # Two connections: reads never queue behind this process's writes, which may wait for
        # the write lock while other hosts hold it.
        self._writer = _Line()
        self._reader = _Line()
        self._migrated = False
        self._channel = f"{_CHANNEL}.{self.schema}"[:63]  # one schema's workers wake each other
        self._notify = "SELECT pg_notify(" + _literal(self._channel) + ", '')"
        with self._writer.lock:
            self._connected(self._writer)

    def describe(self) -> str:
        """Where it is, without the password."""
        return f"{redact_url(self.url)} (schema {self.schema})"

    # -- the connection -------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            connection = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name="starlette-hotdeploy",
            )
        except psycopg.Error as exc:
            raise StoreError(f"the store {self.describe()} cannot be reached: {_cause(exc)}") from exc
        try:
            if not self._migrated:
                self._migrate(connection)
                self._migrated = True
            connection.execute(
                sql.SQL("SET search_path TO {}; SET idle_in_transaction_session_timeout TO {}").format(
                    sql.Identifier(self.schema), sql.Literal(f"{IDLE_IN_TRANSACTION_TIMEOUT_MS}ms")
                )
            )
            self._measure_offset(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _connected(self, line: _Line) -> psycopg.Connection[Any]:
        """The line's open connection (under its lock): made again after a fork or a lost one."""
        if os.getpid() != line.pid:  # never share a connection across a fork (gunicorn --preload)
            line.pid, line.connection = os.getpid(), None
        connection = line.connection
        if connection is None or connection.closed or connection.broken:
            if connection is not None:
                connection.close()
            line.connection = connection = self._connect()
        return connection

    def _migrate(self, connection: psycopg.Connection[Any]) -> None:
        schema = sql.Identifier(self.schema)
        version_table = sql.SQL("{}.schema_version").format(schema)
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            connection.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (version INTEGER NOT NULL)").format(version_table)
            )
            row = connection.execute(sql.SQL("SELECT version FROM {}").format(version_table)).fetchone()
            applied = row[0] if row else 0
            if applied > len(_MIGRATIONS):
                raise StoreError(
                    f"the store {self.describe()} has schema version {applied}, newer than this "
                    f"starlette-hotdeploy knows ({len(_MIGRATIONS)}); upgrade starlette-hotdeploy"
                )
            connection.execute(sql.SQL("SET LOCAL search_path TO {}").format(schema))
            for statements in _MIGRATIONS[applied:]:
                for statement in statements:
                    connection.execute(statement.encode())
            if row is None:
                connection.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s)").format(version_table), (len(_MIGRATIONS),)
                )
            elif applied < len(_MIGRATIONS):
                connection.execute(
                    sql.SQL("UPDATE {} SET version = %s").format(version_table), (len(_MIGRATIONS),)
                )

    def close(self) -> None:
        for line in (self._writer, self._reader):
            with line.lock:
                if line.connection is not None:
                    line.connection.close()
                    line.connection = None

    @contextmanager
    def _transaction(self, *, durable: bool = False, serialized: bool = True) -> Iterator[Db]:
        # Its opening and its closing statements go in one round trip each (simple query
        # protocol, no parameters): with every worker of every host writing, each round trip
        # is a context switch into the database and back.
        opening = ["BEGIN"]
        if not durable:
            # As SQLite's synchronous=NORMAL: it survives a crash of this process or of the
            # database, not a power loss, and skips the WAL flush (ms each). A durable commit
            # later flushes it too (the WAL is written in order).
            opening.append("SET LOCAL synchronous_commit TO off")
        if serialized:
            opening.append(f"SELECT pg_advisory_xact_lock({_WRITE_LOCK})")
        closing = ["SELECT nextval('changes')"]
        if serialized:
            closing.append(self._notify)
        closing.append("COMMIT")
        with self._writer.lock:
            connection = self._begin("; ".join(opening))
            try:
                try:
                    yield _Adapter(connection)
                    connection.execute("; ".join(closing).encode())
                except BaseException:
                    if not connection.broken:
                        with suppress(psycopg.Error):
                            connection.execute("ROLLBACK")
                    raise
            except psycopg.Error as exc:
                # A lost connection, or a session the database ended (the idle-in-transaction
                # timeout is not an OperationalError); any other error is a bug, raised as it is.
                if isinstance(exc, psycopg.OperationalError) or connection.broken:
                    raise StoreError(f"the store {self.describe()} failed: {_cause(exc)}") from exc
                raise

    def _begin(self, opening: str) -> psycopg.Connection[Any]:
        """The opening statements on the open connection; once more on a new one if that one
        was lost since the last call (a restarted database): nothing ran yet, so that retry is
        always safe."""
        for attempt in (1, 2):
            connection = self._connected(self._writer)
            try:
                connection.execute(opening.encode())
                return connection
            except psycopg.OperationalError as exc:
                if attempt == 2 or not connection.broken:
                    raise StoreError(f"the store {self.describe()} failed: {_cause(exc)}") from exc
        raise AssertionError("unreachable")

    def _query(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """A read; retried once on a connection lost since the last call (a restarted database)."""
        line = self._reader
        with line.lock:
            for attempt in (1, 2):
                try:
                    return _Adapter(self._connected(line)).execute(query, args).fetchall()
                except psycopg.OperationalError as exc:
                    if attempt == 2 or (line.connection is not None and not line.connection.broken):
                        raise StoreError(f"the store {self.describe()} failed: {_cause(exc)}") from exc
            raise AssertionError("unreachable")

    def _db_now(self, db: Db) -> float:
        return float(db.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])

    def _clock_offset(self) -> float:
        return self._offset

    def _measure_offset(self, connection: psycopg.Connection[Any]) -> None:
        """This clock minus the database's, measured once per connection (then stable: a worker's
        times do not jitter from one look to the next), from the fastest of a few round trips."""
        samples = []
        for _ in range(3):
            before = time.time()
            row = connection.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
            after = time.time()
            samples.append((after - before, (before + after) / 2 - float(row[0]) if row else 0.0))
        self._offset = min(samples)[1]

    def data_version(self) -> int:
        return int(self._query("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM changes")[0][0])

    # -- archives: bytes in the database, a verified copy in the home ----------------------

    def save_archive(self, name: str, version: str, sha256: str, data: bytes) -> Path:
        path = self._archive_path(name, version, sha256)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO blobs (sha256, size, data) VALUES (?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (sha256, len(data), data),
            )
            self._index_archive(db, name, version, sha256, path)
        replace_file(path, data)
        return path

    def archive(self, name: str, version: str, sha256: str | None = None) -> StoredArchive | None:
        """Also fetched into the home's cache when it is not there yet, and verified."""
        stored = super().archive(name, version, sha256)
        if stored is None or stored.path.is_file():
            return stored
        rows = self._query("SELECT data FROM blobs WHERE sha256 = ?", stored.sha256)
        if not rows:
            return None
        data = bytes(rows[0][0])
        if hashlib.sha256(data).hexdigest() != stored.sha256:
            raise StoreError(
                f"the archive of {name} {version} in the store {self.describe()} does not match "
                f"its sha256 {stored.sha256}: it was altered or damaged",
                package=name,
                version=version,
            )
        replace_file(stored.path, data)
        return stored

    def _delete_archive(self, db: Db, archive: StoredArchive) -> None:
        super()._delete_archive(db, archive)
        db.execute(
            "DELETE FROM blobs WHERE sha256 = ? AND NOT EXISTS (SELECT 1 FROM archives WHERE sha256 = ?)",
            (archive.sha256, archive.sha256),
        )

    # -- wake-ups -------------------------------------------------------------------------

    def subscribe(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call `on_change` (from a thread) after every write that others wait for, on any host;
        once more after a lost connection is back. Returns the function that stops it."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._listen, args=(on_change, stop), name="hotdeploy-listen", daemon=True
        )
        thread.start()
        return stop.set

    def _listen(self, on_change: Callable[[], None], stop: threading.Event) -> None:
        pause = 0.1
        while not stop.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                ) as connection:
                    connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    on_change()  # what was missed while not listening
                    pause = 0.1
                    while not stop.is_set():
                        for _ in connection.notifies(timeout=0.5):
                            on_change()
            except psycopg.Error:
                stop.wait(pause)
                pause = min(pause * 2, 2.0)


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings, on since PostgreSQL 9.1)."""
    return "'" + text.replace("'", "''") + "'"


def _cause(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
