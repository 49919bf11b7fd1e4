"""Moving a home's state to another store (`hotdeploy store migrate`): a single-host SQLite home
to the PostgreSQL store of a cluster, say.

Copied: every activated archive of every package (what can be activated again), in the order of
their activations, then each package's desired version and lineage (what a rollback goes back
to), then the deployment history. Not copied: uploads never activated, workers, operations; the
target must have no packages yet. Run it with the servers of both stores stopped: it reads one
consistent state and the new hosts restore from what it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._errors import StoreError
from ._store import Store

HISTORY_LIMIT = 1_000_000  # every record: the history is bounded by the deployers that wrote it


@dataclass
class Migrated:
    packages: dict[str, str] = field(default_factory=dict)  # name -> active version
    archives: int = 0
    records: int = 0


def migrate(source: Store, target: Store) -> Migrated:
    """Copy `source`'s packages, archives and history into the empty `target`."""
    existing = target.desired()
    if existing:
        raise StoreError(
            f"the target store already has packages ({', '.join(sorted(existing))}): "
            "migrate into a store that has none"
        )
    done = Migrated()
    for name, wanted in sorted(source.desired().items()):
        for stored in source.archives(name):  # oldest activation first
            try:
                data = stored.path.read_bytes()
            except OSError as exc:
                raise StoreError(
                    f"{name} {stored.version}: its archive cannot be read ({exc.strerror}): {stored.path}",
                    package=name,
                    version=stored.version,
                ) from exc
            target.save_archive(name, stored.version, stored.sha256, data)
            # Activated in the same order: retention keeps the most recently activated.
            target.set_desired(name, stored.version, stored.sha256, [(stored.version, stored.sha256)])
            done.archives += 1
        if target.archive(name, wanted.version, wanted.sha256) is None:
            raise StoreError(
                f"{name} {wanted.version}: the active version's archive is not in the source store",
                package=name,
                version=wanted.version,
            )
        target.set_desired(name, wanted.version, wanted.sha256, wanted.lineage)
        done.packages[name] = wanted.version
    for record in reversed(source.history(HISTORY_LIMIT)):  # oldest first
        target.record(record)
        done.records += 1
    return done
