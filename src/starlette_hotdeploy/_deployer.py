"""Deployer: deploy, roll back, activate and undeploy packages in a running server.

One Deployer runs in each worker process. Its state survives restarts in the store under
`home`, and every worker of a host converges on the store's desired state (see _cluster.py):
a single worker is a cluster of one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.abc
import anyio.to_thread
import pluggy

from ._archive import ArchiveLimits, Unpacked, read_source, unpack
from ._cluster import Cluster
from ._deployment import Deployment, Operation, Step
from ._engine import Engine
from ._errors import (
    ArchiveError,
    CheckFailed,
    DeploymentError,
    DeploymentInProgress,
    HotDeployError,
    NoPreviousVersion,
    PackageInUse,
    UnknownVersion,
)
from ._events import EventHub
from ._follower import Follower
from ._hooks import make_plugin_manager, notify, run_checks
from ._package import Package
from ._store import Operation as ClusterOperation
from ._store import Store
from ._version import PackageVersion
from ._watch import WatchFolder

logger = logging.getLogger("starlette_hotdeploy")

Source = str | os.PathLike[str] | bytes


class Deployer:
    """Owns the mount table and every package version; runs deployments.

    Args:
        home: the store: archives, desired state, history, unpacked versions (default
            `$HOTDEPLOY_HOME` or `./.hotdeploy`). Workers sharing a home converge on one state.
        plugins: pluggy plugins (objects or modules with `@hookimpl` functions) for every package.
        entry_points: also load plugins from the `starlette_hotdeploy` entry-point group.
        bake_time: seconds the previous version stays warm after a switch, so a failed
            post-activation check can switch back at once.
        check_timeout: seconds each check (hook or health request) may take.
        shutdown_timeout: seconds a version's lifespan shutdown may take.
        limits: caps for unpacking archives.
        keep_versions: archives kept per package (the active one and the one a rollback goes
            to are always kept).
        watch: a hot-deploy folder: archives dropped there are deployed.
        cluster_timeout: seconds the coordinator of a change waits for the other workers.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        plugins: Iterable[object] = (),
        entry_points: bool = True,
        bake_time: float = 0.0,
        check_timeout: float = 10.0,
        shutdown_timeout: float = 30.0,
        limits: ArchiveLimits | None = None,
        history_size: int = 1000,
        keep_versions: int = 5,
        watch: str | os.PathLike[str] | None = None,
        cluster_timeout: float = 60.0,
    ) -> None:
        self.home = Path(home if home is not None else os.environ.get("HOTDEPLOY_HOME", ".hotdeploy"))
        self.home.mkdir(parents=True, exist_ok=True)
        self.plugins: pluggy.PluginManager = make_plugin_manager(plugins, entry_points=entry_points)
        self.bake_time = bake_time
        self.keep_versions = max(keep_versions, 2)
        self.watch = Path(watch) if watch is not None else None
        self.history: deque[Deployment] = deque(maxlen=history_size)
        self.events = EventHub()
        self.store = Store(self.home)
        self.cluster = Cluster(self.store, timeout=cluster_timeout)
        self.engine = Engine(
            home=self.home,
            store=self.store,
            plugins=self.plugins,
            limits=limits or ArchiveLimits(),
            check_timeout=check_timeout,
            shutdown_timeout=shutdown_timeout,
        )
        self.follower = Follower(self.engine, self.cluster, self.store, bake_time=bake_time)
        self.mounts = self.engine.mounts
        self._background: anyio.CancelScope | None = None
        self._stopped = True  # until running()
        self._background_done: anyio.Event | None = None

    @property
    def limits(self) -> ArchiveLimits:
        return self.engine.limits

    @limits.setter
    def limits(self, limits: ArchiveLimits) -> None:
        self.engine.limits = limits

    @property
    def worker_id(self) -> str:
        return self.cluster.worker_id

    # -- runtime ----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Deployer]:
        """Open the runtime that package lifespans and drains run in, restore every package at
        its desired version, and follow the other workers' changes until closed.

        HotDeployMiddleware does this for the server's lifespan; use it directly when there is
        no server lifespan (tests, scripts)."""
        if self.engine.task_group is not None:
            raise RuntimeError("this Deployer is already running")
        async with anyio.create_task_group() as task_group:
            self.engine.task_group = task_group
            self._stopped = False
            try:
                await anyio.to_thread.run_sync(self.engine.clean_staging)
                await self.cluster.heartbeat({})
                await self.follower.converge()  # restore: before the server sends us traffic
                self._background = background = anyio.CancelScope()
                self._background_done = done = anyio.Event()
                task_group.start_soon(self._run_background, background, done, name="hotdeploy background")
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                self.engine.task_group = None
                task_group.cancel_scope.cancel()

    async def _run_background(self, scope: anyio.CancelScope, done: anyio.Event) -> None:
        """Heartbeats, following the other workers, and the watch folder, until shutdown()."""
        try:
            with scope:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self.follower.heartbeats, name="hotdeploy heartbeats")
                    tasks.start_soon(self.follower.follow, name="hotdeploy follower")
                    if self.watch is not None:
                        folder = WatchFolder(self.watch, self.deploy, lock_path=self.home / "watch.lock")
                        tasks.start_soon(folder.run, name="hotdeploy watch folder")
        finally:
            done.set()

    @property
    def is_running(self) -> bool:
        return self.engine.task_group is not None

    async def shutdown(self) -> None:
        """The server is stopping: stop following the other workers, stop every loaded version,
        and leave the cluster (so nobody waits for this worker). Idempotent: the middleware calls
        it on `lifespan.shutdown`, and `running()` again on exit, when the server may already be
        tearing its tasks down, so a second call awaits nothing."""
        if self._stopped:
            return
        self._stopped = True
        background, done = self._background, self._background_done
        self._background = self._background_done = None
        if background is not None and done is not None:
            background.cancel()
            with anyio.move_on_after(5):
                await done.wait()  # a heartbeat in flight must not outlive leave()
        await self.engine.shutdown()
        self.follower.discard_prepared()
        await self.cluster.leave()

    # -- queries ----------------------------------------------------------------------------

    @property
    def packages(self) -> Mapping[str, Package]:
        return dict(self.engine.packages)

    def package(self, name: str) -> Package:
        return self.engine.package(name)

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every package (or the one named), with the version each live worker serves."""
        workers = self.cluster.workers()
        packages = [self.package(name)] if name is not None else self.engine.packages.values()
        result = []
        for package in sorted(packages, key=lambda p: p.name):
            if package.active is None:
                continue
            entry = package.to_dict()
            entry["workers"] = {w.id: w.serving.get(package.name) for w in workers}
            entry["workers"][self.worker_id] = package.active.version
            result.append(entry)
        return result

    def deployment(self, deployment_id: str) -> Deployment:
        """A deployment started by this worker."""
        for record in self.history:
            if record.id == deployment_id:
                return record
        raise LookupError(f"no deployment with id {deployment_id!r}")

    def find_deployment(self, deployment_id: str) -> dict[str, Any] | None:
        """A deployment started by any worker (live progress if it is this worker's)."""
        for record in self.history:
            if record.id == deployment_id:
                return record.to_dict()
        return self.store.deployment(deployment_id)

    def deployments(self, limit: int = 100, package: str | None = None) -> list[dict[str, Any]]:
        """The history of every worker, newest first."""
        stored = self.store.history(limit, package)
        local = {r.id: r.to_dict() for r in self.history}
        return [local.get(r["id"], r) for r in stored]

    def retired_alive(self) -> list[str]:
        """Labels of unloaded versions whose app or modules are still referenced (after gc)."""
        return self.engine.retired_alive()

    # -- operations -------------------------------------------------------------------------

    async def deploy(self, source: Source, *, record: Deployment | None = None) -> Deployment:
        """Install or upgrade a package from a directory, a .zip or .whl path, or archive bytes.

        Returns the deployment record once every live worker serves the new version (and its
        post-activation checks passed); raises DeploymentError, with the record, if anything
        failed. The old version keeps serving in every failure case."""
        self.engine.runtime()
        record = record or self._new_record("deploy", None)
        try:
            with record.step("unpack") as step:
                data = await anyio.to_thread.run_sync(read_source, source, self.limits)
                unpacked = await anyio.to_thread.run_sync(unpack, data, self.home / "packages", self.limits)
                manifest = unpacked.manifest
                await anyio.to_thread.run_sync(
                    self.store.save_archive, manifest.name, manifest.version, unpacked.sha256, data
                )
                step.detail = f"{manifest.name} {manifest.version} sha256:{unpacked.sha256[:12]}"
        except Exception as exc:
            error = exc if isinstance(exc, HotDeployError) else ArchiveError(f"{type(exc).__name__}: {exc}")
            await self._fail(record, error)
        record.package, record.to_version, record.sha256 = manifest.name, manifest.version, unpacked.sha256
        with self.engine.claim(manifest.name, record):
            package = self.engine.packages.get(manifest.name)
            if package is None:
                package = await anyio.to_thread.run_sync(
                    self.engine.new_package, manifest.name, manifest.mount
                )
            return await self._install(record, package, unpacked)

    def submit(self, source: Source) -> Deployment:
        """Start `deploy(source)` in the background and return its record at once (its outcome
        is "pending" until the deployment ends)."""
        runtime = self.engine.runtime()
        record = self._new_record("deploy", None)

        async def run() -> None:
            try:
                await self.deploy(source, record=record)
            except HotDeployError:
                pass  # the record holds the outcome and the error
            except Exception:
                logger.exception("deployment %s crashed", record.id)

        runtime.start_soon(run, name=f"hotdeploy deployment {record.id}")
        return record

    async def rollback(self, name: str) -> Deployment:
        """Go back to the version that was active before the current one."""
        package = self.package(name)
        target = package.previous
        if target is None:
            raise NoPreviousVersion(f"{name} has no previous version to roll back to", package=name)
        return await self._activate(package, target, "rollback")

    async def activate(self, name: str, version: str) -> Deployment:
        """Make a version that is still available (in memory or on disk) the active one."""
        package = self.package(name)
        await self._refresh_available(package)
        if package.loaded_version(version) is None and version not in package.available:
            known = ", ".join(package.available) or "none"
            raise UnknownVersion(
                f"{name} has no version {version!r} available (available: {known})",
                package=name,
                version=version,
            )
        return await self._activate(package, version, "activate")

    async def undeploy(self, name: str) -> Deployment:
        """Unmount a package everywhere, drain and shut down its versions, and forget it."""
        self.engine.runtime()
        package = self.package(name)
        dependants = sorted(
            other.name
            for other in self.engine.packages.values()
            if other.active is not None and name in other.active.manifest.requires
        )
        if dependants:
            raise PackageInUse(
                f"cannot remove {name}: required by {', '.join(dependants)}", package=name, step="undeploy"
            )
        active = package.active
        record = self._new_record(
            "undeploy", name, from_version=active.version if active is not None else None
        )
        with self.engine.claim(name, record), anyio.CancelScope(shield=True):
            operation = self.cluster.new_operation(record.id, name, "remove")
            await self._begin(operation, record)
            await self.engine.remove_locally(package, record)
            await self._commit(operation, record)
            record.finish("succeeded")
            await self._store_record(record)
        return record

    # -- the pipeline -----------------------------------------------------------------------

    async def _begin(self, operation: ClusterOperation, record: Deployment) -> None:
        """Register a cluster-wide operation; refused while another worker runs one on the package."""
        live = await self.cluster.live()
        other = await anyio.to_thread.run_sync(self.store.begin_operation, operation, live)
        if other is not None:
            error = DeploymentInProgress(
                f"another operation on {operation.package} is in progress on worker {other.coordinator}; "
                "retry when it has finished",
                package=operation.package,
                step="claim",
            )
            error.deployment = record
            record.finish("failed", error)
            await self._store_record(record)
            raise error
        await self._store_record(record)

    async def _commit(self, operation: ClusterOperation, record: Deployment) -> None:
        """Confirm the change in the store (the desired state), then wait for every live worker
        to serve it."""
        with record.step("commit"):
            await anyio.to_thread.run_sync(self.store.commit, operation)
        self.follower.voted.add((operation.id, "switched"))
        await anyio.to_thread.run_sync(self.store.vote, operation.id, self.worker_id, "switched")
        with record.step("converge") as step:
            result = await self.cluster.await_votes(operation, "switched")
            live = await self.cluster.live()
            step.detail = f"{len(live)} worker(s) serve it"
            if not result.ok:
                # Committed: they converge when they can; the answer says who lags.
                step.detail += f"; {result.describe()}"
                step.ok = False
        await anyio.to_thread.run_sync(self.store.set_phase, operation.id, "done")
        await self.cluster.heartbeat(self.engine.serving())

    async def _abort(self, operation: ClusterOperation) -> None:
        await anyio.to_thread.run_sync(self.store.set_phase, operation.id, "abort")

    async def _activate(self, package: Package, target: str, operation: Operation) -> Deployment:
        self.engine.runtime()
        current = package.active
        record = self._new_record(
            operation,
            package.name,
            from_version=current.version if current is not None else None,
            to_version=target,
        )
        with self.engine.claim(package.name, record):
            warm = package.loaded_version(target)
            if warm is not None and warm is current:
                record.finish("succeeded")
                return record
            if warm is not None and self.engine.can_rewarm(warm):
                # Still loaded and started (draining before its shutdown): switching back is one
                # assignment; the other workers prepare it (warm or from the archive) first.
                return await self._install(record, package, None, warm=warm)
            await self._refresh_available(package)
            sha256 = package.available.get(target)
            if sha256 is None:
                await self._fail(
                    record,
                    UnknownVersion(
                        f"{package.name} {target}: its archive is no longer in the store",
                        package=package.name,
                        version=target,
                    ),
                )
            unpacked = await self.engine.unpack_stored(package.name, target, sha256)
            return await self._install(record, package, unpacked)

    async def _refresh_available(self, package: Package) -> None:
        """Another worker may have stored versions this one has not seen."""
        for stored in await anyio.to_thread.run_sync(self.store.archives, package.name):
            package.available[stored.version] = stored.sha256

    async def _install(
        self,
        record: Deployment,
        package: Package,
        unpacked: Unpacked | None,
        *,
        warm: PackageVersion | None = None,
    ) -> Deployment:
        """Prepare a version on every worker, switch to it everywhere, then bake it."""
        current = package.active
        record.from_version = current.version if current is not None else None
        if warm is not None:
            version = warm
        else:
            assert unpacked is not None
            if current is not None and current.sha256 == unpacked.sha256:
                with record.step("unchanged") as step:
                    step.detail = (
                        f"{package.name} {unpacked.manifest.version} with this sha256 is already active"
                    )
                record.finish("succeeded")
                await self._store_record(record)
                return record
            version = PackageVersion(unpacked.manifest, unpacked.root, unpacked.sha256)
        record.sha256 = version.sha256
        manifest = version.manifest
        lineage = package.lineage_after(
            version.version, version.sha256, rollback=record.operation == "rollback"
        )[-self.keep_versions :]  # older versions' archives are pruned: no rollback to them
        operation = self.cluster.new_operation(
            record.id, package.name, "activate", version.version, version.sha256, lineage
        )
        with anyio.CancelScope(shield=True):  # a deployment runs to its outcome; every step is bounded
            await self._begin(operation, record)
            try:
                if warm is None:
                    await self.engine.prepare(record, package, version)
                else:
                    with record.step("prepare") as step:
                        step.detail = "warm: the version was still loaded"
                await anyio.to_thread.run_sync(self.store.vote, operation.id, self.worker_id, "prepared")
                with record.step("prepare workers") as step:
                    result = await self.cluster.await_votes(operation, "prepared")
                    if not result.ok:
                        raise CheckFailed(
                            f"not every worker could prepare it: {result.describe()}",
                            check="workers",
                            package=version.name,
                            version=version.version,
                            step="prepare workers",
                        )
                    step.detail = f"{len(await self.cluster.live())} worker(s) prepared"
                with record.step("switch") as step:
                    if warm is not None:
                        self.engine.cancel_retirement(warm)
                        step.detail = "warm: one assignment"
                        self.engine.point(package, version, current)
                    elif manifest.strategy == "block" and current is not None:
                        step.detail = "block: new requests held while the previous version finished"
                        await self.engine.switch_blocking(package, version, current)
                    else:
                        self.engine.point(package, version, current)
            except Exception as exc:
                await self._abort(operation)
                if warm is None:
                    await self.engine.discard(package, version)
                await self._fail(record, _as_error(exc, version))
            package.available[version.version] = version.sha256
            package.set_lineage(lineage)
            first_install = package.name not in self.engine.packages
            self.engine.packages[package.name] = package
            await self._commit(operation, record)
            try:
                with record.step("bake") as step:
                    await run_checks(
                        "hotdeploy_check_after_activate",
                        self.engine.managers(version),
                        {"version": version, "previous": current},
                        timeout=self.engine.check_timeout,
                        package=version.name,
                        version=version.version,
                        step="bake",
                    )
                    if self.bake_time > 0:
                        await anyio.sleep(self.bake_time)
                    step.detail = (
                        f"post-activation checks passed; previous version kept warm {self.bake_time:g}s"
                    )
            except Exception as exc:
                error = _as_error(exc, version)
                await self._switch_back(record, package, version, current, operation, first_install, error)
                raise DeploymentError(record, error) from exc
            self._after_success(package, version, current, record)
            await self._store_record(record)
            await self._prune(package)
        return record

    async def _switch_back(
        self,
        record: Deployment,
        package: Package,
        version: PackageVersion,
        current: PackageVersion | None,
        operation: ClusterOperation,
        first_install: bool,
        error: HotDeployError,
    ) -> None:
        """A post-activation check failed: the previous version again, everywhere."""
        with record.step("switch back") as step:
            step.detail = f"back to {current.version}" if current is not None else "unmounted"
            self.engine.point(package, current, version)
        back = self.cluster.new_operation(
            f"{record.id}-back",
            package.name,
            "activate" if current is not None else "remove",
            current.version if current is not None else None,
            current.sha256 if current is not None else None,
            operation.lineage[:-1],
        )
        await anyio.to_thread.run_sync(self.store.begin_operation, back, await self.cluster.live())
        await self._commit(back, record)
        package.set_lineage(operation.lineage[:-1])
        await self.engine.discard(package, version)
        if first_install:
            self.engine.packages.pop(package.name, None)
        record.finish("rolled_back", error)
        await self._store_record(record)
        if current is not None:
            await notify(
                "hotdeploy_rolled_back",
                self.engine.managers(current),
                {"version": version, "previous": current, "deployment": record},
            )
        await notify("hotdeploy_failed", self.engine.managers(None), {"deployment": record, "error": error})

    def _after_success(
        self, package: Package, new: PackageVersion, old: PackageVersion | None, record: Deployment
    ) -> None:
        record.finish("succeeded")
        tg = self.engine.runtime()
        tg.start_soon(self._announce, new, old, record)
        if old is not None and old is not new:
            self.engine.schedule_retirement(package, old, record)

    async def _announce(self, new: PackageVersion, old: PackageVersion | None, record: Deployment) -> None:
        await notify(
            "hotdeploy_activated",
            self.engine.managers(new),
            {"version": new, "previous": old, "deployment": record},
        )

    async def _fail(self, record: Deployment, error: HotDeployError) -> NoReturn:
        record.finish("failed", error)
        await self._store_record(record)
        await notify("hotdeploy_failed", self.engine.managers(None), {"deployment": record, "error": error})
        raise DeploymentError(record, error) from error

    # -- records and retention --------------------------------------------------------------

    def _new_record(self, operation: Operation, package: str | None, **fields: Any) -> Deployment:
        record = Deployment(operation=operation, package=package, **fields)
        record.on_change = self._publish
        self.history.append(record)
        self.events.publish({"type": "deployment.started", "deployment": record.to_dict()})
        return record

    def _publish(self, record: Deployment, step: Step | None) -> None:
        if step is None:
            self.events.publish({"type": "deployment.finished", "deployment": record.to_dict()})
        else:
            kind = "step.started" if step.ok is None else "step.finished"
            self.events.publish(
                {
                    "type": kind,
                    "deployment_id": record.id,
                    "package": record.package,
                    "to_version": record.to_version,
                    "step": step.to_dict(),
                }
            )

    async def _store_record(self, record: Deployment) -> None:
        if record.package is not None:
            await anyio.to_thread.run_sync(self.store.record, record.to_dict())

    async def _prune(self, package: Package) -> None:
        protect = set(package.lineage_pairs()[-2:])
        removed = await anyio.to_thread.run_sync(self.store.prune, package.name, self.keep_versions, protect)
        for archive in removed:
            if package.available.get(archive.version) == archive.sha256:
                del package.available[archive.version]
            if package.loaded_version(archive.version) is None:
                directory = self.home / "packages" / package.name / f"{archive.version}-{archive.sha256[:12]}"
                await anyio.to_thread.run_sync(_remove_tree, directory)


def _remove_tree(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _as_error(exc: BaseException, version: PackageVersion) -> HotDeployError:
    if isinstance(exc, HotDeployError):
        if exc.package is None:
            exc.package = version.name
        if exc.version is None:
            exc.version = version.version
        return exc
    return HotDeployError(
        f"unexpected {type(exc).__name__}: {exc}", package=version.name, version=version.version
    )
