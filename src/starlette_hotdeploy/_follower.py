"""Follower: this worker's part in the other workers' operations.

It keeps a heartbeat in the store, notices changes (SQLite's `PRAGMA data_version`, polled every
20 ms, and a full look once a second), votes on operations in their prepare phase by preparing
the version here, and makes every package serve exactly the store's desired state: at start-up
(the restore) and whenever another worker committed a change. It changes nothing itself: every
change goes through the engine's named methods, under the engine's claim on the package.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.to_thread

from ._cluster import Cluster
from ._engine import Engine
from ._operation import Operation, OperationKind, Phase, Vote
from ._package import Package
from ._store import Desired, Store
from ._version import PackageVersion, VersionState

logger = logging.getLogger("starlette_hotdeploy")


class Follower:
    def __init__(self, engine: Engine, cluster: Cluster, store: Store, *, bake_time: float) -> None:
        self.engine = engine
        self.cluster = cluster
        self.store = store
        self.bake_time = bake_time
        # operation id -> the version prepared (or held warm) for it here, with its package
        self._prepared: dict[str, tuple[Package, PackageVersion]] = {}
        self._voted: set[tuple[str, Vote]] = set()  # (operation id, vote) this worker cast

    @property
    def worker_id(self) -> str:
        return self.cluster.worker_id

    async def discard_prepared(self) -> None:
        """The server is stopping: what was prepared for unfinished operations goes."""
        prepared, self._prepared = self._prepared, {}
        for package, version in prepared.values():
            await self._let_go(package, version)

    async def _let_go(self, package: Package, version: PackageVersion) -> None:
        if version is package.active:
            return
        if version.state is VersionState.DRAINING:
            self.engine.release(package, version)  # it was held warm: back to its retirement
        else:
            await self.engine.discard(package, version)

    async def heartbeats(self) -> None:
        beats = 0
        while True:
            try:
                await self.cluster.heartbeat(self.engine.serving())
                beats += 1
                if beats % 120 == 1:  # about once a minute: what is older than an hour goes
                    live = await self.cluster.live()

                    def housekeeping(live: set[str] = live) -> None:
                        self.store.forget_workers(3600.0)
                        self.store.prune_operations(3600.0)
                        self.store.finish_orphaned_records(live)

                    await anyio.to_thread.run_sync(housekeeping)
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
            elif operation.phase is Phase.COMMIT:
                latest[operation.package] = operation
            elif not self._has_voted(operation, Vote.PREPARED, Vote.FAILED):
                await self._prepare_for(operation)
        unfinished = {operation.id for operation in operations if operation.coordinator in live}
        for op_id in [op_id for op_id in self._prepared if op_id not in unfinished]:
            # Aborted (or finished without this worker): what was prepared for it goes.
            await self._let_go(*self._prepared.pop(op_id))
        self._voted = {vote for vote in self._voted if vote[0] in unfinished}
        desired = await anyio.to_thread.run_sync(self.store.desired)
        for name, wanted in desired.items():
            if not self.engine.is_busy(name):
                await self._converge_package(name, wanted, latest.get(name))
        for package in self.engine.packages():
            name = package.name
            if name not in desired and not self.engine.is_busy(name) and package.active is not None:
                with self.engine.claim(name):
                    await self.engine.remove(package, None)
                removal = latest.get(name)
                if removal is not None:
                    await self.vote(removal, Vote.SWITCHED)

    def _has_voted(self, operation: Operation, *votes: Vote) -> bool:
        return any((operation.id, vote) in self._voted for vote in votes)

    async def vote(self, operation: Operation, vote: Vote, detail: str | None = None) -> None:
        """Cast this worker's vote (once): the coordinator votes through here too."""
        if (operation.id, vote) not in self._voted:
            self._voted.add((operation.id, vote))
            await anyio.to_thread.run_sync(self.store.vote, operation.id, self.worker_id, vote, detail)

    async def _prepare_for(self, operation: Operation) -> None:
        """Prepare another worker's change here, and vote."""
        if operation.kind is not OperationKind.ACTIVATE:
            await self.vote(operation, Vote.PREPARED)
            return
        if self.engine.is_busy(operation.package):
            return  # this worker is busy with the package: the next round votes
        assert operation.version is not None
        assert operation.sha256 is not None
        with self.engine.claim(operation.package):
            package = self.engine.get(operation.package)
            warm = package.loaded_version(operation.version) if package is not None else None
            if package is not None and warm is not None and warm.sha256 == operation.sha256:
                if warm is package.active:
                    await self.vote(operation, Vote.PREPARED)
                    return
                if self.engine.hold(warm):  # draining: now it cannot be unloaded under us
                    self._prepared[operation.id] = (package, warm)
                    await self.vote(operation, Vote.PREPARED)
                    return
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
                    await self.engine.prepare(None, package, version)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self.engine.discard(package, version)
                    raise
            except Exception as exc:
                await self.vote(operation, Vote.FAILED, str(exc))
                return
            self._prepared[operation.id] = (package, version)
            await self.vote(operation, Vote.PREPARED)

    async def _converge_package(self, name: str, wanted: Desired, operation: Operation | None) -> None:
        """Make this worker serve the desired version of one package (restore or follow)."""
        engine = self.engine
        package = engine.get(name)
        active = package.active if package is not None else None
        if active is not None and (active.version, active.sha256) == (wanted.version, wanted.sha256):
            if operation is not None:
                await self.vote(operation, Vote.SWITCHED)
            return
        with engine.claim(name):
            target: PackageVersion | None = None
            prepared = self._prepared.pop(operation.id, None) if operation is not None else None
            if prepared is not None:
                package, target = prepared
            elif package is not None:
                warm = package.loaded_version(wanted.version)
                if warm is not None and warm.sha256 == wanted.sha256 and engine.hold(warm):
                    target = warm
            if target is None:
                target, package = await engine.restore(name, wanted, package)
            if target is None:
                return
            assert package is not None
            engine.adopt(package)
            if target.manifest.strategy == "block" and active is not None and package.mount is not None:
                await engine.switch_blocking(package, target, active, force=True)
            else:
                engine.switch(package, target, active)
            engine.confirm(package, wanted.version, wanted.sha256, wanted.lineage)
            if active is not None and active is not target:
                engine.retire(package, active, None, delay=self.bake_time)
            # Heartbeat first: once the vote is in, the workers map must show the new version.
            await self.cluster.heartbeat(engine.serving())
            if operation is not None:
                await self.vote(operation, Vote.SWITCHED)
