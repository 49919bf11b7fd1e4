"""Deployer: deploy, roll back, activate and undeploy packages in a running server.

One Deployer runs in each worker process. Its state survives restarts in the store under
`home`, and every worker of a host converges on the store's desired state (see _cluster.py):
a single worker is a cluster of one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.abc
import anyio.to_thread
import pluggy

from ._archive import ArchiveLimits, Unpacked, read_source, unpack
from ._cluster import Cluster
from ._deployment import Deployment, Operation, Step
from ._dispatch import attach_routing
from ._errors import (
    ArchiveError,
    CheckFailed,
    DeploymentError,
    DeploymentInProgress,
    HotDeployError,
    LoadError,
    NoPreviousVersion,
    NotRunning,
    PackageInUse,
    StartupError,
    UnknownPackage,
    UnknownVersion,
)
from ._events import EventHub
from ._hooks import make_plugin_manager, notify, run_checks
from ._lifespan import LifespanFailed, LifespanTimeout
from ._loader import collected
from ._mounts import Mount, MountTable
from ._package import Package
from ._probe import probe
from ._store import Desired, Store
from ._store import Operation as ClusterOperation
from ._version import PackageVersion, VersionState
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
        self.mounts = MountTable()
        self.plugins: pluggy.PluginManager = make_plugin_manager(plugins, entry_points=entry_points)
        self.bake_time = bake_time
        self.check_timeout = check_timeout
        self.shutdown_timeout = shutdown_timeout
        self.limits = limits or ArchiveLimits()
        self.keep_versions = max(keep_versions, 2)
        self.watch = Path(watch) if watch is not None else None
        self.history: deque[Deployment] = deque(maxlen=history_size)
        self.events = EventHub()
        self.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.home)
        self.cluster = Cluster(self.store, timeout=cluster_timeout)
        self._packages: dict[str, Package] = {}
        self._busy: set[str] = set()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._retiring: dict[PackageVersion, anyio.CancelScope] = {}
        self._unloaded: deque[tuple[str, list[weakref.ref[Any]]]] = deque(maxlen=1000)
        self._prepared: dict[str, PackageVersion] = {}  # operation id -> version prepared for it
        self._voted: set[tuple[str, str]] = set()  # (operation id, vote) this worker cast

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
        if self._task_group is not None:
            raise RuntimeError("this Deployer is already running")
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            try:
                await anyio.to_thread.run_sync(_clean_staging, self.home / "packages")
                await self.cluster.heartbeat({})
                await self._converge()  # restore: before the server sends us traffic
                task_group.start_soon(self._heartbeats, name="hotdeploy heartbeats")
                task_group.start_soon(self._follow, name="hotdeploy follower")
                if self.watch is not None:
                    folder = WatchFolder(self.watch, self.deploy, lock_path=self.home / "watch.lock")
                    task_group.start_soon(folder.run, name="hotdeploy watch folder")
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                    await self.cluster.leave()
                self._task_group = None
                task_group.cancel_scope.cancel()

    @property
    def is_running(self) -> bool:
        return self._task_group is not None

    def _runtime(self) -> anyio.abc.TaskGroup:
        if self._task_group is None:
            raise NotRunning(
                "the deployer is not running: serve the app with lifespan enabled, "
                "or wrap the calls in `async with deployer.running():`"
            )
        return self._task_group

    async def shutdown(self) -> None:
        """Stop every loaded version (the server is stopping). Idempotent."""
        for package in list(self._packages.values()):
            if package.mount is not None:
                self.mounts.remove(package.prefix)
                package.mount = None
            for version in list(package.loaded):
                scope = self._retiring.pop(version, None)
                if scope is not None:
                    scope.cancel()
                await self._stop_and_unload(package, version)
        for version in list(self._prepared.values()):
            version.abort_startup()
        self._prepared.clear()

    # -- queries ----------------------------------------------------------------------------

    @property
    def packages(self) -> Mapping[str, Package]:
        return dict(self._packages)

    def package(self, name: str) -> Package:
        try:
            return self._packages[name]
        except KeyError:
            raise UnknownPackage(f"no package named {name!r} is deployed", package=name) from None

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every package (or the one named), with the version each live worker serves."""
        workers = self.store.workers(self.cluster.liveness)
        packages = [self.package(name)] if name is not None else self._packages.values()
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
        alive = [label for label, refs in self._unloaded if not collected(refs, collect=False)]
        if alive:
            alive = [label for label, refs in self._unloaded if not collected(refs)]
        return alive

    # -- operations -------------------------------------------------------------------------

    async def deploy(self, source: Source, *, record: Deployment | None = None) -> Deployment:
        """Install or upgrade a package from a directory, a .zip or .whl path, or archive bytes.

        Returns the deployment record once every live worker serves the new version (and its
        post-activation checks passed); raises DeploymentError, with the record, if anything
        failed. The old version keeps serving in every failure case."""
        self._runtime()
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
        with self._claim(manifest.name, record):
            package = self._packages.get(manifest.name)
            if package is None:
                package = Package(name=manifest.name, prefix=manifest.mount)
            return await self._install(record, package, unpacked)

    def submit(self, source: Source) -> Deployment:
        """Start `deploy(source)` in the background and return its record at once (its outcome
        is "pending" until the deployment ends)."""
        runtime = self._runtime()
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
        self._runtime()
        package = self.package(name)
        dependants = sorted(
            other.name
            for other in self._packages.values()
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
        with self._claim(name, record), anyio.CancelScope(shield=True):
            operation = self.cluster.new_operation(record.id, name, "remove")
            await self._begin(operation, record)
            await self._remove_locally(package, record)
            await self._commit(operation, record)
            record.finish("succeeded")
            await self._store_record(record)
        return record

    # -- the pipeline -----------------------------------------------------------------------

    @contextmanager
    def _claim(self, name: str, record: Deployment) -> Iterator[None]:
        if name in self._busy:
            error = DeploymentInProgress(
                f"another operation on {name} is in progress; retry when it has finished",
                package=name,
                step="claim",
            )
            error.deployment = record
            record.finish("failed", error)
            raise error
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

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
        self._voted.add((operation.id, "switched"))
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
        await self.cluster.heartbeat(self._serving())

    async def _abort(self, operation: ClusterOperation) -> None:
        await anyio.to_thread.run_sync(self.store.set_phase, operation.id, "abort")

    async def _activate(self, package: Package, target: str, operation: Operation) -> Deployment:
        self._runtime()
        current = package.active
        record = self._new_record(
            operation,
            package.name,
            from_version=current.version if current is not None else None,
            to_version=target,
        )
        with self._claim(package.name, record):
            warm = package.loaded_version(target)
            if warm is not None and warm is current:
                record.finish("succeeded")
                return record
            if warm is not None and self._can_rewarm(warm):
                # Still loaded and started (draining before its shutdown): switching back is one
                # assignment; the other workers prepare it (warm or from the archive) first.
                return await self._install(record, package, None, warm=warm)
            sha256 = package.available[target]
            unpacked = await self._unpack_stored(package.name, target, sha256)
            return await self._install(record, package, unpacked)

    def _can_rewarm(self, version: PackageVersion) -> bool:
        return version.state in (VersionState.READY, VersionState.DRAINING) and version in self._retiring

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
        )
        operation = self.cluster.new_operation(
            record.id, package.name, "activate", version.version, version.sha256, lineage
        )
        with anyio.CancelScope(shield=True):  # a deployment runs to its outcome; every step is bounded
            await self._begin(operation, record)
            try:
                if warm is None:
                    await self._prepare(record, package, version)
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
                        self._cancel_retirement(warm)
                        step.detail = "warm: one assignment"
                        self._point(package, version, current)
                    elif manifest.strategy == "block" and current is not None:
                        step.detail = "block: new requests held while the previous version finished"
                        await self._switch_blocking(package, version, current)
                    else:
                        self._point(package, version, current)
            except Exception as exc:
                await self._abort(operation)
                if warm is None:
                    await self._discard(package, version)
                await self._fail(record, _as_error(exc, version))
            package.available[version.version] = version.sha256
            package.set_lineage(lineage)
            first_install = package.name not in self._packages
            self._packages[package.name] = package
            await self._commit(operation, record)
            try:
                with record.step("bake") as step:
                    await run_checks(
                        "hotdeploy_check_after_activate",
                        self._managers(version),
                        {"version": version, "previous": current},
                        timeout=self.check_timeout,
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
            self._point(package, current, version)
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
        await self._discard(package, version)
        if first_install:
            self._packages.pop(package.name, None)
        record.finish("rolled_back", error)
        await self._store_record(record)
        if current is not None:
            await notify(
                "hotdeploy_rolled_back",
                self._managers(current),
                {"version": version, "previous": current, "deployment": record},
            )
        await notify("hotdeploy_failed", self._managers(None), {"deployment": record, "error": error})

    async def _prepare(self, record: Deployment, package: Package, version: PackageVersion) -> None:
        """Load, start and check a version beside the current one (no traffic yet)."""
        manifest = version.manifest
        with record.step("manifest"):
            if package.mount is not None and manifest.mount != package.prefix:
                raise HotDeployError(
                    f"mount changed from {package.prefix!r} to {manifest.mount!r}; a package keeps its "
                    "mount: undeploy it first, or deploy under a new name",
                    package=manifest.name,
                    version=manifest.version,
                    step="manifest",
                )
            self.mounts.check(manifest.mount, manifest.name)
        with record.step("validate"):
            await run_checks(
                "hotdeploy_validate",
                [self.plugins],
                {"manifest": manifest},
                timeout=self.check_timeout,
                package=manifest.name,
                version=manifest.version,
                step="validate",
            )
        with record.step("load"):
            self._load(version)
        with record.step("start"):
            await self._start(version)
        with record.step("check"):
            if manifest.health is not None:
                await self._health_check(version)
            await run_checks(
                "hotdeploy_check_before_activate",
                self._managers(version),
                {"version": version, "previous": package.active},
                timeout=self.check_timeout,
                package=manifest.name,
                version=manifest.version,
                step="check",
            )
        version.state = VersionState.READY
        package.loaded.append(version)

    def _load(self, version: PackageVersion) -> None:
        manifest = version.manifest
        version.load()
        attach_routing(version, manifest.mount)
        if manifest.hooks:
            try:
                module = version.namespace.import_module(manifest.hooks)  # type: ignore[union-attr]
                version.plugins = make_plugin_manager([module], entry_points=False)
            except Exception as exc:
                raise LoadError(
                    f"cannot load the package's hooks module {manifest.hooks!r}: {type(exc).__name__}: {exc}",
                    package=manifest.name,
                    version=manifest.version,
                    step="load",
                ) from exc

    async def _start(self, version: PackageVersion) -> None:
        manifest = version.manifest
        try:
            await version.start(self._runtime(), manifest.startup_timeout)
        except (LifespanFailed, LifespanTimeout) as exc:
            raise StartupError(
                f"lifespan startup failed: {exc}",
                package=manifest.name,
                version=manifest.version,
                step="start",
            ) from exc

    async def _health_check(self, version: PackageVersion) -> None:
        manifest = version.manifest
        assert manifest.health is not None
        where = f"GET {manifest.mount}{manifest.health}"
        context = {"check": "health", "package": manifest.name, "version": manifest.version, "step": "check"}
        try:
            response = await probe(version, manifest.health, self.check_timeout)
        except TimeoutError:
            raise CheckFailed(
                f"health check {where} did not answer within {self.check_timeout:g}s", **context
            ) from None
        except Exception as exc:
            raise CheckFailed(f"health check {where} raised {type(exc).__name__}: {exc}", **context) from exc
        if not 200 <= response.status < 300:
            body = response.text.strip()[:200]
            raise CheckFailed(
                f"health check {where} answered {response.status}" + (f": {body}" if body else ""), **context
            )

    def _point(self, package: Package, new: PackageVersion | None, old: PackageVersion | None) -> None:
        """The switch: one assignment on the request path's mount."""
        if new is None:
            self.mounts.remove(package.prefix)
            package.mount = None
        elif package.mount is None:
            mount = Mount(package.prefix, package.name, new)
            self.mounts.add(mount)
            package.mount = mount
        else:
            package.mount.active = new
        if new is not None:
            new.state = VersionState.ACTIVE
            new.activated_at = time.time()
            if new not in package.loaded:
                package.loaded.append(new)
        if old is not None:
            old.state = VersionState.DRAINING

    async def _switch_blocking(
        self, package: Package, new: PackageVersion, old: PackageVersion, *, force: bool = False
    ) -> None:
        """Integration Server's behaviour: hold new requests until the old version is idle.

        With `force` (a worker following a confirmed change), switch even if it is not."""
        mount = package.mount
        assert mount is not None
        gate = anyio.Event()
        mount.gate = gate
        try:
            timeout = new.manifest.drain_timeout
            if not await old.wait_idle(timeout) and not force:
                raise HotDeployError(
                    f"block: {old.in_flight} request(s) still running on {old.version} after "
                    f"{timeout:g}s; {old.version} stays active and held requests go to it",
                    package=new.name,
                    version=new.version,
                    step="switch",
                )
            self._point(package, new, old)
        finally:
            mount.gate = None
            gate.set()

    def _cancel_retirement(self, version: PackageVersion) -> None:
        scope = self._retiring.pop(version, None)
        if scope is not None:
            scope.cancel()

    def _after_success(
        self, package: Package, new: PackageVersion, old: PackageVersion | None, record: Deployment
    ) -> None:
        record.finish("succeeded")
        tg = self._runtime()
        tg.start_soon(self._announce, new, old, record)
        if old is not None and old is not new:
            self._schedule_retirement(package, old, record)

    def _schedule_retirement(
        self, package: Package, old: PackageVersion, record: Deployment | None, delay: float = 0.0
    ) -> None:
        scope = anyio.CancelScope()
        self._retiring[old] = scope
        self._runtime().start_soon(self._retire, package, old, record, scope, delay)

    async def _announce(self, new: PackageVersion, old: PackageVersion | None, record: Deployment) -> None:
        await notify(
            "hotdeploy_activated",
            self._managers(new),
            {"version": new, "previous": old, "deployment": record},
        )

    async def _retire(
        self,
        package: Package,
        old: PackageVersion,
        record: Deployment | None,
        scope: anyio.CancelScope,
        delay: float,
    ) -> None:
        """Drain the replaced version, then shut it down and unload it (in the background)."""
        terminated = 0
        with scope:
            if delay > 0:
                await anyio.sleep(delay)  # a following worker keeps it warm for the bake
            with _maybe_step(record, f"drain {old.version}") as step:
                if not await old.wait_idle(old.manifest.drain_timeout):
                    terminated = await old.terminate()
                    if step is not None:
                        step.detail = f"{terminated} still open at the drain timeout were ended"
            self._retiring.pop(old, None)  # past this point it cannot be switched back to
        if scope.cancelled_caught:
            return  # switched back to while it drained
        try:
            with _maybe_step(record, f"shutdown {old.version}"):
                await self._stop_and_unload(package, old)
        except Exception:
            logger.exception("%s %s: shutdown failed", old.name, old.version)
        await notify("hotdeploy_drained", self._managers(None), {"version": old, "terminated": terminated})

    async def _remove_locally(self, package: Package, record: Deployment | None) -> None:
        with _maybe_step(record, "unmount"):
            if package.mount is not None:
                self.mounts.remove(package.prefix)
                package.mount = None
        for version in list(package.loaded):
            self._cancel_retirement(version)
            with _maybe_step(record, f"drain {version.version}") as step:
                version.state = VersionState.DRAINING
                if not await version.wait_idle(version.manifest.drain_timeout):
                    count = await version.terminate()
                    if step is not None:
                        step.detail = f"{count} still open at the drain timeout were ended"
            with _maybe_step(record, f"shutdown {version.version}"):
                await self._stop_and_unload(package, version)
        self._packages.pop(package.name, None)

    async def _stop_and_unload(self, package: Package, version: PackageVersion) -> None:
        try:
            if version.state not in (VersionState.RETIRED, VersionState.FAILED, VersionState.STAGED):
                try:
                    await version.stop(self.shutdown_timeout)
                except (LifespanFailed, LifespanTimeout) as exc:
                    logger.warning("%s %s: lifespan shutdown: %s", version.name, version.version, exc)
        finally:
            refs = version.unload()
            if version.state is not VersionState.FAILED:
                version.state = VersionState.RETIRED
            if version in package.loaded:
                package.loaded.remove(version)
            self._unloaded.append((f"{version.name} {version.version}", refs))

    async def _discard(self, package: Package, version: PackageVersion) -> None:
        """Throw away a version that failed before or right after the switch."""
        if version.started:
            version.state = VersionState.DRAINING
            if not await version.wait_idle(version.manifest.drain_timeout):
                await version.terminate()
            try:
                await version.stop(self.shutdown_timeout)
            except (LifespanFailed, LifespanTimeout) as exc:
                logger.warning("%s %s: lifespan shutdown: %s", version.name, version.version, exc)
        else:
            version.abort_startup()
        version.state = VersionState.FAILED
        await self._stop_and_unload(package, version)

    async def _fail(self, record: Deployment, error: HotDeployError) -> NoReturn:
        record.finish("failed", error)
        await self._store_record(record)
        await notify("hotdeploy_failed", self._managers(None), {"deployment": record, "error": error})
        raise DeploymentError(record, error) from error

    def _managers(self, version: PackageVersion | None) -> list[pluggy.PluginManager]:
        if version is not None and version.plugins is not None:
            return [self.plugins, version.plugins]
        return [self.plugins]

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

    async def _unpack_stored(self, name: str, version: str, sha256: str) -> Unpacked:
        stored = await anyio.to_thread.run_sync(self.store.archive, name, version, sha256)
        if stored is None:
            raise UnknownVersion(f"{name} {version}: its archive is no longer in the store", package=name)
        return await anyio.to_thread.run_sync(unpack, stored.path, self.home / "packages", self.limits)

    def _serving(self) -> dict[str, str]:
        return {name: p.active.version for name, p in self._packages.items() if p.active is not None}

    # -- following the other workers ----------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.cluster.heartbeat(self._serving())
            except Exception:
                logger.exception("heartbeat failed")
            await anyio.sleep(self.cluster.heartbeat_interval)

    async def _follow(self) -> None:
        """Converge whenever another worker committed something (and once a second anyway)."""
        seen = -1
        last = 0.0
        while True:
            current = await anyio.to_thread.run_sync(self.store.data_version)
            if current != seen or time.monotonic() - last > 1.0:
                seen, last = current, time.monotonic()
                try:
                    await self._converge()
                except Exception:
                    logger.exception("converging on the desired state failed")
            await anyio.sleep(self.cluster.poll_interval)

    async def _converge(self) -> None:
        """Vote on other workers' operations, then serve exactly the desired state."""
        live = await self.cluster.live()
        operations = await anyio.to_thread.run_sync(self.store.operations, time.time() - 3600)
        latest: dict[str, ClusterOperation] = {}
        for operation in operations:
            if operation.phase in ("commit", "done"):
                latest[operation.package] = operation
            if operation.coordinator == self.worker_id:
                continue
            if operation.phase == "prepare" and operation.coordinator in live:
                if (operation.id, "prepared") not in self._voted and (
                    operation.id,
                    "failed",
                ) not in self._voted:
                    await self._prepare_for(operation)
            elif operation.phase != "commit" and operation.id in self._prepared:
                version = self._prepared.pop(operation.id)
                package = self._packages.get(operation.package)
                if package is not None and version is not package.active:
                    await self._discard(package, version)
        desired = await anyio.to_thread.run_sync(self.store.desired)
        for name, wanted in desired.items():
            if name not in self._busy:
                await self._converge_package(name, wanted, latest.get(name))
        for name, package in list(self._packages.items()):
            if name not in desired and name not in self._busy and package.active is not None:
                self._busy.add(name)
                try:
                    await self._remove_locally(package, None)
                finally:
                    self._busy.discard(name)
                removal = latest.get(name)
                if removal is not None:
                    await self._vote(removal, "switched")

    async def _vote(self, operation: ClusterOperation, vote: str, detail: str | None = None) -> None:
        if (operation.id, vote) not in self._voted:
            self._voted.add((operation.id, vote))
            await anyio.to_thread.run_sync(self.store.vote, operation.id, self.worker_id, vote, detail)

    async def _prepare_for(self, operation: ClusterOperation) -> None:
        """Prepare another worker's change here, and vote."""
        if operation.kind != "activate" or operation.package in self._busy:
            if operation.kind != "activate":
                await self._vote(operation, "prepared")
            return
        assert operation.version is not None
        assert operation.sha256 is not None
        self._busy.add(operation.package)
        try:
            package = self._packages.get(operation.package)
            warm = package.loaded_version(operation.version) if package is not None else None
            if (
                package is not None
                and warm is not None
                and warm.sha256 == operation.sha256
                and (self._can_rewarm(warm) or warm is package.active)
            ):
                await self._vote(operation, "prepared")
                return
            record = Deployment(operation="deploy", package=operation.package, to_version=operation.version)
            try:
                unpacked = await self._unpack_stored(operation.package, operation.version, operation.sha256)
                if package is None:
                    package = Package(name=operation.package, prefix=unpacked.manifest.mount)
                version = PackageVersion(unpacked.manifest, unpacked.root, unpacked.sha256)
                try:
                    await self._prepare(record, package, version)
                except Exception:
                    await self._discard(package, version)
                    raise
            except Exception as exc:
                await self._vote(operation, "failed", str(exc))
                return
            self._prepared[operation.id] = version
            if operation.package not in self._packages:
                self._packages[operation.package] = package
            await self._vote(operation, "prepared")
        finally:
            self._busy.discard(operation.package)

    async def _converge_package(self, name: str, wanted: Desired, operation: ClusterOperation | None) -> None:
        """Make this worker serve the desired version of one package (restore or follow)."""
        package = self._packages.get(name)
        active = package.active if package is not None else None
        if active is not None and (active.version, active.sha256) == (wanted.version, wanted.sha256):
            if operation is not None and operation.phase == "commit":
                await self._vote(operation, "switched")
            return
        self._busy.add(name)
        try:
            target = self._prepared.pop(operation.id, None) if operation is not None else None
            if package is not None and target is None:
                warm = package.loaded_version(wanted.version)
                if warm is not None and warm.sha256 == wanted.sha256 and self._can_rewarm(warm):
                    self._cancel_retirement(warm)
                    target = warm
            if target is None:
                target, package = await self._restore(name, wanted, package)
            if target is None:
                return
            assert package is not None
            self._packages[name] = package
            if target.manifest.strategy == "block" and active is not None and package.mount is not None:
                await self._switch_blocking(package, target, active, force=True)
            else:
                self._point(package, target, active)
            package.set_lineage(wanted.lineage)
            package.available[wanted.version] = wanted.sha256
            if active is not None and active is not target:
                self._schedule_retirement(package, active, None, delay=self.bake_time)
            if operation is not None and operation.phase == "commit":
                await self._vote(operation, "switched")
            await self.cluster.heartbeat(self._serving())
        finally:
            self._busy.discard(name)

    async def _restore(
        self, name: str, wanted: Desired, package: Package | None
    ) -> tuple[PackageVersion | None, Package | None]:
        """Load and start a confirmed version from its archive (no checks: it passed them).

        If it no longer starts, fall back to the versions before it (the salvage copies)."""
        candidates = [(wanted.version, wanted.sha256)] + [pair for pair in reversed(wanted.lineage[:-1])]
        for version_name, sha256 in candidates:
            try:
                unpacked = await self._unpack_stored(name, version_name, sha256)
                if package is None:
                    package = Package(name=name, prefix=unpacked.manifest.mount)
                    for stored in await anyio.to_thread.run_sync(self.store.archives, name):
                        package.available[stored.version] = stored.sha256
                version = PackageVersion(unpacked.manifest, unpacked.root, unpacked.sha256)
                try:
                    self._load(version)
                    await self._start(version)
                except Exception:
                    await self._discard(package, version)
                    raise
                return version, package
            except Exception:
                logger.exception("%s %s: cannot restore this version", name, version_name)
        logger.error("%s: no confirmed version could be restored; the package is not served", name)
        return None, package


@contextmanager
def _maybe_step(record: Deployment | None, name: str) -> Iterator[Step | None]:
    if record is None:
        yield None
    else:
        with record.step(name) as step:
            yield step


def _remove_tree(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _clean_staging(packages: Path) -> None:
    """Remove what an unpack interrupted by a crash left behind."""
    if packages.is_dir():
        for leftover in packages.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)


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
