"""A throwaway PostgreSQL for the tests: `pgserver` (a test extra) ships real binaries and starts
one in about a second, without root or a system install. One server per test session; each test
gets a schema of its own (`?schema=`), so tests never see each other's state.

Nothing is skipped: a machine where it cannot start fails these tests, as CI must."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import _commands
from pgserver.postgres_server import PostgresServer, get_server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server. Its data lives outside pytest's temporary tree: as root,
    pgserver runs PostgreSQL as a user of its own, and another pytest session resets that tree
    to 0700 when it starts (a restart then fails with "Permission denied")."""
    pgdata = Path(tempfile.mkdtemp(prefix="hotdeploy-test-pg-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR
            server = get_server(pgdata, cleanup_mode="stop")
        try:
            yield server
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of the session's PostgreSQL server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return postgres_server.get_uri()


def restart(server: PostgresServer) -> None:
    """Restart the database, as an operator's restart or a failover would: every connection is
    cut (fast shutdown); it comes back on the same socket."""
    pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]  # made at import, one per binary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)


def schema_url(url: str, key: str | Path) -> str:
    """`url` with a schema named after `key` (a test's home, say): same key, same state."""
    schema = "t_" + hashlib.sha256(str(key).encode()).hexdigest()[:16]
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"
