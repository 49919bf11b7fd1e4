"""Follower: this worker's part in the other workers' operations.

It keeps a heartbeat in the store, notices changes (SQLite's `PRAGMA data_version`, polled every
20 ms, and a full look once a second), votes on operations in their prepare phase by preparing
the version here, and makes every package serve exactly the store's desired state: at start-up
(the restore) and whenever another worker committed a change.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.to_thread

from ._cluster import Cluster
from ._deployment import Deployment
from ._engine import Engine
from ._store import Desired, Operation, Store
from ._version import PackageVersion

logger = logging.getLogger("starlette_hotdeploy")


class Follower:
    def __init__(self, engine: Engine, cluster: Cluster, store: Store, *, bake_time: float) -> None:
        self.engine = engine
        self.cluster = cluster
        self.store = store
        self.bake_time = bake_time
        self.prepared: dict[str, PackageVersion] = {}  # operation id -> version prepared for it
        self.voted: set[tuple[str, str]] = set()  # (operation id, vote) this worker cast

    @property
    def worker_id(self) -> str:
        return self.cluster.worker_id

    def discard_prepared(self) -> None:
        for version in self.prepared.values():
            version.abort_startup()
        self.prepared.clear()

    async def heartbeats(self) -> None:
        beats = 0
        while True:
            try:
                await self.cluster.heartbeat(self.engine.serving())
                beats += 1
                if beats % 120 == 1:  # about once a minute: what is older than an hour goes
                    await anyio.to_thread.run_sync(self.store.forget_workers, 3600.0)
                    await anyio.to_thread.run_sync(self.store.prune_operations, 3600.0)
            except Exception:
                logger.exception("heartbeat failed")
            await anyio.sleep(self.cluster.heartbeat_interval)

    async def follow(self) -> None:
        """Converge whenever another worker committed something (and once a second anyway)."""
        seen = -1
        last = 0.0
        while True:
            current = await anyio.to_thread.run_sync(self.store.data_version)
            if current != seen or time.monotonic() - last > 1.0:
                seen, last = current, time.monotonic()
                try:
                    await self.converge()
                except Exception:
                    logger.exception("converging on the desired state failed")
            await anyio.sleep(self.cluster.poll_interval)

    async def converge(self) -> None:
        """Vote on other workers' operations, then serve exactly the desired state."""
        live = await self.cluster.live()
        # Only unfinished operations: finished ones are history (and would grow without bound).
        operations = await anyio.to_thread.run_sync(self.store.active_operations)
        latest: dict[str, Operation] = {}  # per package, the committed operation to vote on
        for operation in operations:
            if operation.coordinator == self.worker_id:
                continue
            if operation.coordinator not in live:
                await anyio.to_thread.run_sync(self.store.abandon, operation)
            elif operation.phase == "commit":
                latest[operation.package] = operation
            elif not self.has_voted(operation, "prepared", "failed"):
                await self._prepare_for(operation)
        unfinished = {operation.id for operation in operations if operation.coordinator in live}
        for op_id in [op_id for op_id in self.prepared if op_id not in unfinished]:
            # Aborted (or finished without this worker): what was prepared for it goes.
            version = self.prepared.pop(op_id)
            package = self.engine.packages.get(version.name)
            if package is not None and version is not package.active:
                await self.engine.discard(package, version)
        self.voted = {vote for vote in self.voted if vote[0] in unfinished}
        desired = await anyio.to_thread.run_sync(self.store.desired)
        for name, wanted in desired.items():
            if name not in self.engine.busy:
                await self._converge_package(name, wanted, latest.get(name))
        for name, package in list(self.engine.packages.items()):
            if name not in desired and name not in self.engine.busy and package.active is not None:
                self.engine.busy.add(name)
                try:
                    await self.engine.remove_locally(package, None)
                finally:
                    self.engine.busy.discard(name)
                removal = latest.get(name)
                if removal is not None:
                    await self.vote(removal, "switched")

    def has_voted(self, operation: Operation, *votes: str) -> bool:
        return any((operation.id, vote) in self.voted for vote in votes)

    async def vote(self, operation: Operation, vote: str, detail: str | None = None) -> None:
        if (operation.id, vote) not in self.voted:
            self.voted.add((operation.id, vote))
            await anyio.to_thread.run_sync(self.store.vote, operation.id, self.worker_id, vote, detail)

    async def _prepare_for(self, operation: Operation) -> None:
        """Prepare another worker's change here, and vote."""
        if operation.kind != "activate" or operation.package in self.engine.busy:
            if operation.kind != "activate":
                await self.vote(operation, "prepared")
            return
        assert operation.version is not None
        assert operation.sha256 is not None
        self.engine.busy.add(operation.package)
        try:
            package = self.engine.packages.get(operation.package)
            warm = package.loaded_version(operation.version) if package is not None else None
            if (
                package is not None
                and warm is not None
                and warm.sha256 == operation.sha256
                and (self.engine.can_rewarm(warm) or warm is package.active)
            ):
                await self.vote(operation, "prepared")
                return
            record = Deployment(operation="deploy", package=operation.package, to_version=operation.version)
            try:
                unpacked = await self.engine.unpack_stored(
                    operation.package, operation.version, operation.sha256
                )
                if package is None:
                    package = await anyio.to_thread.run_sync(
                        self.engine.new_package, operation.package, unpacked.manifest.mount
                    )
                version = PackageVersion(unpacked.manifest, unpacked.root, unpacked.sha256)
                try:
                    await self.engine.prepare(record, package, version)
                except Exception:
                    await self.engine.discard(package, version)
                    raise
            except Exception as exc:
                await self.vote(operation, "failed", str(exc))
                return
            self.prepared[operation.id] = version
            if operation.package not in self.engine.packages:
                self.engine.packages[operation.package] = package
            await self.vote(operation, "prepared")
        finally:
            self.engine.busy.discard(operation.package)

    async def _converge_package(self, name: str, wanted: Desired, operation: Operation | None) -> None:
        """Make this worker serve the desired version of one package (restore or follow)."""
        package = self.engine.packages.get(name)
        active = package.active if package is not None else None
        if active is not None and (active.version, active.sha256) == (wanted.version, wanted.sha256):
            if operation is not None and operation.phase == "commit":
                await self.vote(operation, "switched")
            return
        self.engine.busy.add(name)
        try:
            target = self.prepared.pop(operation.id, None) if operation is not None else None
            if package is not None and target is None:
                warm = package.loaded_version(wanted.version)
                if warm is not None and warm.sha256 == wanted.sha256 and self.engine.can_rewarm(warm):
                    self.engine.cancel_retirement(warm)
                    target = warm
            if target is None:
                target, package = await self.engine.restore(name, wanted, package)
            if target is None:
                return
            assert package is not None
            self.engine.packages[name] = package
            if target.manifest.strategy == "block" and active is not None and package.mount is not None:
                await self.engine.switch_blocking(package, target, active, force=True)
            else:
                self.engine.point(package, target, active)
            package.set_lineage(wanted.lineage)
            package.available[wanted.version] = wanted.sha256
            if active is not None and active is not target:
                self.engine.schedule_retirement(package, active, None, delay=self.bake_time)
            # Heartbeat first: once the vote is in, the workers map must show the new version.
            await self.cluster.heartbeat(self.engine.serving())
            if operation is not None and operation.phase == "commit":
                await self.vote(operation, "switched")
        finally:
            self.engine.busy.discard(name)
