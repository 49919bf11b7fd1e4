"""SQLiteStore's own behaviour: files on disk, SQLite settings, a fork. The contract every store
keeps (and SQLite's schema migrations) is in test_store_conformance.py."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from starlette_hotdeploy._errors import IllegalTransition
from starlette_hotdeploy._operation import Operation, OperationKind, Phase
from starlette_hotdeploy._sqlite_store import SQLiteStore
from starlette_hotdeploy._store_url import open_store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_open_store_is_the_sqlite_store_of_the_home(tmp_path: Path) -> None:
    store = open_store(tmp_path / "home")
    try:
        assert isinstance(store, SQLiteStore)
        assert (tmp_path / "home" / "state.db").is_file()
        assert (tmp_path / "home" / "archives").is_dir()
    finally:
        store.close()


def test_archives_are_files_named_by_version_and_sha(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        path = store.save_archive("greeter", "1.0", sha(b"one"), b"one")
        assert path == tmp_path / "archives" / "greeter" / f"1.0-{sha(b'one')[:12]}.zip"
        assert not list((tmp_path / "archives" / "greeter").glob(".*.tmp"))  # renamed into place
    finally:
        store.close()
    # The index holds paths relative to the home: a home can be moved.
    db = sqlite3.connect(tmp_path / "state.db")
    try:
        assert db.execute("SELECT path FROM archives").fetchall() == [
            (f"archives/greeter/1.0-{sha(b'one')[:12]}.zip",)
        ]
    finally:
        db.close()


def test_wal_with_full_sync_only_while_a_durable_transaction_runs(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        db = store._connection
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        normal, full = 1, 2
        with store._transaction(durable=True):
            assert db.execute("PRAGMA synchronous").fetchone() == (full,)
        assert db.execute("PRAGMA synchronous").fetchone() == (normal,)
        # A refused durable transaction is rolled back and leaves NORMAL too.
        operation = Operation(
            "op1", "greeter", OperationKind.REMOVE, None, None, [], Phase.PREPARE, "w1", 0.0
        )
        with pytest.raises(IllegalTransition):
            store.commit(operation)  # never begun
        assert not db.in_transaction
        assert db.execute("PRAGMA synchronous").fetchone() == (normal,)
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_gets_its_own_connection(tmp_path: Path) -> None:
    """gunicorn --preload opens the store in the master: a worker must not share its connection."""
    store = SQLiteStore(tmp_path)
    try:
        store.heartbeat("master", {})
        pid = os.fork()
        if pid == 0:  # the child: report by exit status only, never return into pytest
            status = 1
            try:
                inherited = store._connection
                store.heartbeat("child", {})
                status = 0 if store._connection is not inherited else 2
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert sorted(w.id for w in store.workers()) == ["child", "master"]
    finally:
        store.close()


def created_at_of(home: Path, version: str) -> float:
    db = sqlite3.connect(home / "state.db")
    try:
        return float(
            db.execute("SELECT created_at FROM archives WHERE version = ?", (version,)).fetchone()[0]
        )
    finally:
        db.close()


def test_uploading_a_failed_archive_again_restarts_its_grace_period(tmp_path: Path) -> None:
    """The grace period counts from the last upload: a retry of an old failed upload is under
    way, not stale. An activated archive keeps its created_at."""
    store = SQLiteStore(tmp_path)
    try:
        for version in ("1.0", "2.0"):
            store.save_archive("greeter", version, sha(version.encode()), version.encode())
        store.set_desired("greeter", "1.0", sha(b"1.0"), [("1.0", sha(b"1.0"))])
        db = sqlite3.connect(tmp_path / "state.db")
        db.execute("UPDATE archives SET created_at = 1.0")  # both saved long ago
        db.commit()
        db.close()
        for version in ("1.0", "2.0"):
            store.save_archive("greeter", version, sha(version.encode()), version.encode())
        assert created_at_of(tmp_path, "1.0") == 1.0
        assert created_at_of(tmp_path, "2.0") == pytest.approx(time.time(), abs=60)
        assert store.prune("greeter", keep=5, protect=set()) == []
    finally:
        store.close()


def test_activations_keep_their_order_when_the_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path)
    try:
        for version in ("1.0", "2.0"):
            store.save_archive("greeter", version, sha(version.encode()), version.encode())
        store.set_desired("greeter", "1.0", sha(b"1.0"), [("1.0", sha(b"1.0"))])
        an_hour_ago = time.time() - 3600
        monkeypatch.setattr(time, "time", lambda: an_hour_ago)
        store.set_desired("greeter", "2.0", sha(b"2.0"), [("2.0", sha(b"2.0"))])
        assert [a.version for a in store.archives("greeter")] == ["1.0", "2.0"]
    finally:
        store.close()


def test_a_heartbeat_rewrites_the_serving_map_only_when_it_changed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        serving = {f"p{n}": "1.0" for n in range(100)}
        store.heartbeat("w", serving)
        first = store.workers()[0]
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        store.heartbeat("w", dict(serving))
        store._db.set_trace_callback(None)
        assert not any("serving" in sql for sql in statements), statements  # only the time
        again = store.workers()[0]
        assert again.heartbeat_at >= first.heartbeat_at
        assert again.serving == serving
        serving["p0"] = "2.0"
        store.heartbeat("w", serving)  # changed (the caller's dict, changed in place): written
        assert store.workers()[0].serving["p0"] == "2.0"
        store.remove_worker("w")
        store.heartbeat("w", serving)  # unregistered meanwhile: registered again, in full
        assert [(w.id, w.serving) for w in store.workers()] == [("w", serving)]
    finally:
        store.close()
