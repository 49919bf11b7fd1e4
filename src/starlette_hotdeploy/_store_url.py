"""Which store a deployer uses: SQLite under the home (the embedded default), or the database a
URL names (`postgresql://...`), from `Deployer(store=...)`, `--store` or `$HOTDEPLOY_STORE`."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from ._errors import StoreError
from ._store import Store

STORE_ENV = "HOTDEPLOY_STORE"
_POSTGRES_SCHEMES = ("postgresql", "postgres")


def store_url_from_env() -> str | None:
    return os.environ.get(STORE_ENV) or None


def open_store(home: Path, url: str | None = None) -> Store:
    """The store `url` names (None: SQLite under `home`); `home` also keeps the unpacked
    versions and, for a database store, the archives it fetched. A blocking call."""
    if not url or url == "sqlite":
        from ._sqlite_store import SQLiteStore

        return SQLiteStore(home)
    scheme = urlsplit(url).scheme
    if scheme in _POSTGRES_SCHEMES:
        from ._postgres_store import PostgresStore  # psycopg is needed only here

        return PostgresStore(url, home)
    raise StoreError(
        f"the store URL must start with postgresql:// (or be unset: SQLite under the home), "
        f"not {scheme + '://' if scheme else repr(url[:40])}"
    )
