"""Deployer: deploy, roll back, activate and undeploy packages in a running server.

The public facade. One Deployer runs in each worker process; its state survives restarts in the
store under `home`, and every worker of a host converges on the store's desired state (see
_cluster.py): a single worker is a cluster of one. The work is done below it: the engine owns
this process's packages, the coordinator runs the operations this worker accepted, the follower
carries out the others'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pluggy

from ._archive import ArchiveLimits, Source
from ._canary import ABORT, PROMOTE, PROMOTE_ALL, CanaryState, canary_gauges
from ._cluster import Cluster
from ._cluster_view import cluster_view
from ._coordinator import Coordinator, DeployOptions
from ._deployment import Action, Deployment
from ._engine import Engine
from ._errors import HotDeployError, NotRunning
from ._events import EventHub
from ._figures_share import SharedFigures, host_traffic
from ._follower import Follower
from ._hooks import ENTRY_POINT_GROUP, make_plugin_manager
from ._mounts import MountTable
from ._package import Package
from ._records import RecordLog
from ._signing import TrustedKeys
from ._status import PackageStatus
from ._store import Store
from ._store_url import open_store, store_url_from_env
from ._thread_hop import thread_hop
from ._watch import WatchFolder
from ._worker_figures import WorkerFigures

if TYPE_CHECKING:
    from ._metrics import HotDeployMetrics

logger = logging.getLogger("starlette_hotdeploy")

__all__ = ["Deployer"]


@dataclass(eq=False)
class _Runtime:
    """What exists only while the deployer runs (made in the worker process, never at import)."""

    store: Store
    cluster: Cluster
    follower: Follower
    coordinator: Coordinator
    background: anyio.CancelScope
    background_done: anyio.Event
    background_started: bool = False  # restore() ran: heartbeats, follower, records, watch folder
    shared: SharedFigures | None = None  # metrics on: this worker's figures for the host's others


class Deployer:
    """Deploys, rolls back, activates and undeploys packages; answers what is served.

    Args:
        home: the store: archives, desired state, history, unpacked versions (default
            `$HOTDEPLOY_HOME` or `./.hotdeploy`). Workers sharing a home converge on one state.
        plugins: pluggy plugins (objects or modules with `@hookimpl` functions) for every package.
        entry_points: also load plugins from the `starlette_hotdeploy` entry-point group (when
            the runtime starts).
        store: where the state is shared: a `postgresql://` URL (hosts that share that database
            converge on one state; see docs/cluster.md), a `Store`, or None: `$HOTDEPLOY_STORE`,
            else SQLite under `home` (the workers of one host).
        bake_time: seconds the previous version stays warm after a switch, so a failed
            post-activation check can switch back at once.
        check_timeout: seconds each check (hook or health request) may take.
        load_timeout: seconds a package's import (and factory call) may take, unless its
            manifest sets `load_timeout`.
        shutdown_timeout: seconds a version's lifespan shutdown may take.
        limits: caps for unpacking archives.
        keep_versions: archives kept per package (the active one and the one a rollback goes
            to are always kept).
        watch: a hot-deploy folder: archives dropped there are deployed.
        cluster_timeout: seconds the coordinator of a change waits for the other workers.
        trusted_keys: OpenSSH ed25519 public keys (paths to `.pub` or `allowed_signers` files, or
            key lines; default `$HOTDEPLOY_TRUSTED_KEYS`, separated by os.pathsep): when given,
            only archives signed by one of them are deployed (see docs/security.md).
        metrics: count requests, deployments and drains for Prometheus: the admin API serves
            them at `<prefix>/metrics`, and `deployer.metrics` is their collector.

    Constructing it does no I/O: the store is opened, entry points are scanned and the worker's
    identity is made when the runtime starts (`running()`, or the server's lifespan).
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        plugins: Iterable[object] = (),
        entry_points: bool = True,
        store: Store | str | None = None,
        bake_time: float = 0.0,
        check_timeout: float = 10.0,
        load_timeout: float = 30.0,
        shutdown_timeout: float = 30.0,
        limits: ArchiveLimits | None = None,
        history_size: int = 1000,
        keep_versions: int = 5,
        watch: str | os.PathLike[str] | None = None,
        cluster_timeout: float = 60.0,
        trusted_keys: Iterable[str | os.PathLike[str]] | None = None,
        metrics: bool = True,
        pin_secret: str | None = None,
    ) -> None:
        self.home = Path(home if home is not None else os.environ.get("HOTDEPLOY_HOME", ".hotdeploy"))
        self.plugins: pluggy.PluginManager = make_plugin_manager(plugins, entry_points=False)
        self.bake_time = bake_time
        self.keep_versions = max(keep_versions, 2)
        self.watch = Path(watch) if watch is not None else None
        self.events = EventHub()
        self._entry_points = entry_points
        self._store: Store | None = store if not isinstance(store, str) else None
        self._store_url = store if isinstance(store, str) else store_url_from_env()
        self._cluster_timeout = cluster_timeout
        self._engine = Engine(
            home=self.home,
            plugins=self.plugins,
            limits=limits or ArchiveLimits(),
            check_timeout=check_timeout,
            load_timeout=load_timeout,
            shutdown_timeout=shutdown_timeout,
        )
        # While a canary runs, a request may ask for a version (Hotdeploy-Version); with a secret,
        # only one that carries it too (Hotdeploy-Pin-Secret).
        self._engine.pin_secret = (
            pin_secret if pin_secret is not None else os.environ.get("HOTDEPLOY_PIN_SECRET")
        )
        if trusted_keys is None:
            trusted_keys = [k for k in os.environ.get("HOTDEPLOY_TRUSTED_KEYS", "").split(os.pathsep) if k]
        self._trusted_key_specs = list(trusted_keys)
        self._records = RecordLog(self.events, history_size, tidy=self._engine.redact)
        self._records.quiet = self._engine.until_quiet
        self._runtime: _Runtime | None = None
        self._stopped = True  # until running()
        self._figures = WorkerFigures() if metrics else None
        self._engine.figures = self._records.figures = self._figures
        self._metrics: HotDeployMetrics | None = None
        if metrics:
            from ._metrics import HotDeployMetrics  # prometheus_client: only when metrics are on

            self._metrics = HotDeployMetrics(self._snapshot, self._shared)

    @property
    def limits(self) -> ArchiveLimits:
        return self._engine.limits

    @limits.setter
    def limits(self, limits: ArchiveLimits) -> None:
        self._engine.limits = limits

    @property
    def mounts(self) -> MountsView:
        """The mount table, read-only (the request path's own)."""
        return MountsView(self._engine)

    @property
    def _mount_table(self) -> MountTable:
        """The request path's own table (for the middleware only)."""
        return self._engine.mounts

    def _attach_host(self, app: object) -> None:
        """The app the packages sit beside: a mount that would shadow one of its routes is refused."""
        self._engine.host_app = app

    def _redact(self, text: str) -> str:
        """`text` fit for an error detail: bounded, paths relative to the home."""
        return self._engine.redact(text)

    @property
    def history(self) -> tuple[Deployment, ...]:
        """This worker's recent deployment records, oldest first (live while they run)."""
        return tuple(self._records.history)

    @property
    def worker_id(self) -> str:
        return self._running().cluster.worker_id

    @property
    def metrics(self) -> HotDeployMetrics | None:
        """The prometheus_client collector of this host's `hotdeploy_*` metrics (every worker's);
        register it in a registry of your own with `registry.register(deployer.metrics)`. None
        when the deployer was made with `metrics=False`."""
        return self._metrics

    def traffic(self) -> dict[str, Any]:
        """Each loaded version's state, requests in flight and HTTP requests served, summed over
        this host's live workers (`workers` says how many); with metrics off, this worker's
        alone. What the admin UI's traffic shares come from. A blocking call (it reads the other
        workers' metrics files): from async code, run it in a worker thread."""
        runtime = self._running()
        worker = runtime.cluster.worker_id
        snapshot = self._snapshot()
        if snapshot is None or runtime.shared is None:
            packages = {
                package.name: {
                    v.version: {"state": v.state.value, "in_flight": v.in_flight, "served": v.served}
                    for v in package.loaded
                }
                for package in self._engine.packages()
            }
            return {"worker": worker, "workers": 1, "packages": packages}
        others = [other for other, live in runtime.shared.others() if live]
        return {"worker": worker, "workers": 1 + len(others), "packages": host_traffic([snapshot, *others])}

    def _snapshot(self) -> dict[str, Any] | None:
        """This worker's figures (None before the runtime started or with metrics off)."""
        runtime = self._runtime
        if self._figures is None or runtime is None:
            return None
        # Copied in steps that hold the GIL (`loaded` is a tuple): a scrape may run in a thread.
        packages = self._engine.packages()
        loaded = [version for package in packages for version in package.loaded]
        runs = runtime.coordinator.canaries
        canaries = [found for p in packages if (found := canary_gauges(p, runs.get(p.name))) is not None]
        return self._figures.snapshot(runtime.cluster.worker_id, loaded, canaries)

    def _shared(self) -> SharedFigures | None:
        runtime = self._runtime
        return runtime.shared if runtime is not None else None

    # -- runtime ----------------------------------------------------------------------------

    def _open_store(self) -> Store:
        """The store, opened on first need (a blocking call)."""
        if self._store is None:
            self.home.mkdir(parents=True, exist_ok=True)
            self._store = open_store(self.home, self._store_url)
        return self._store

    def _running(self) -> _Runtime:
        if self._runtime is None:
            raise NotRunning(
                "the deployer is not running: serve the app with lifespan enabled, "
                "or wrap the calls in `async with deployer.running():`"
            )
        return self._runtime

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Deployer]:
        """Open the runtime that package lifespans and drains run in, restore every package at
        its desired version, and follow the other workers' changes until closed.

        HotDeployMiddleware does this for the server's lifespan; use it directly when there is
        no server lifespan (tests, scripts)."""
        async with self.started():
            await self.restore()
            yield self

    @asynccontextmanager
    async def started(self) -> AsyncIterator[Deployer]:
        """The runtime without the restore: `restore()` brings the stored packages back (the
        middleware calls it once the host app's own startup completed)."""
        if self._runtime is not None:
            raise RuntimeError("this Deployer is already running")
        async with self._runtime_failures_logged(), anyio.create_task_group() as task_group:
            self._stopped = False
            try:
                store = await thread_hop(self._open_store)
                if self._trusted_key_specs:
                    self._engine.trusted_keys = await thread_hop(TrustedKeys.load, self._trusted_key_specs)
                if self._entry_points:
                    await thread_hop(self.plugins.load_setuptools_entrypoints, ENTRY_POINT_GROUP)
                self._engine.open(task_group, store)
                cluster = Cluster(store, timeout=self._cluster_timeout)
                follower = Follower(self._engine, cluster, store, bake_time=self.bake_time)
                self._records.open(store, cluster.worker_id)
                coordinator = Coordinator(
                    engine=self._engine,
                    cluster=cluster,
                    store=store,
                    follower=follower,
                    records=self._records,
                    bake_time=self.bake_time,
                    keep_versions=self.keep_versions,
                )
                follower.on_canary = coordinator.canary_noticed
                self._runtime = _Runtime(
                    store, cluster, follower, coordinator, anyio.CancelScope(), anyio.Event()
                )
                if self._figures is not None:
                    self._runtime.shared = SharedFigures(self.home / "metrics", cluster.worker_id)
                await thread_hop(self._engine.clean_staging)
                await cluster.join()
                live = await cluster.live()
                await thread_hop(store.finish_orphaned_records, live)
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                self._engine.close()
                self._runtime = None
                task_group.cancel_scope.cancel()

    @asynccontextmanager
    async def _runtime_failures_logged(self) -> AsyncIterator[None]:
        """A background task that raised ends the runtime: say so. Behind uvicorn, an error
        after the lifespan's startup is not shown, and the server would go on serving what it
        had, following nothing and no longer in the cluster, without a word."""
        try:
            yield
        except Exception:
            logger.exception("the deployer's runtime failed: this worker no longer follows deployments")
            raise

    async def restore(self) -> None:
        """Serve every stored package at its desired version (before the server sends us
        traffic), then follow the other workers' changes in the background."""
        runtime = self._running()
        await runtime.follower.converge()
        runtime.background_started = True
        self._engine.runtime().start_soon(self._run_background, runtime, name="hotdeploy background")

    async def _run_background(self, runtime: _Runtime) -> None:
        """Heartbeats, following the other workers, the record writer and the watch folder."""
        try:
            with runtime.background:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(runtime.follower.heartbeats, name="hotdeploy heartbeats")
                    tasks.start_soon(runtime.follower.follow, name="hotdeploy follower")
                    tasks.start_soon(self._records.run, name="hotdeploy records")
                    if runtime.shared is not None:
                        tasks.start_soon(
                            runtime.shared.run,
                            self._snapshot,
                            self._engine.until_quiet,
                            name="hotdeploy metrics",
                        )
                    if self.watch is not None:
                        folder = WatchFolder(
                            self.watch, self._deploy_dropped, lock_path=self.home / "watch.lock"
                        )
                        tasks.start_soon(folder.run, name="hotdeploy watch folder")
        finally:
            runtime.background_done.set()

    @property
    def is_running(self) -> bool:
        return self._runtime is not None

    async def shutdown(self) -> None:
        """The server is stopping: stop following the other workers, stop every loaded version,
        and leave the cluster (so nobody waits for this worker). Idempotent: the middleware calls
        it on `lifespan.shutdown`, and `running()` again on exit, when the server may already be
        tearing its tasks down, so a second call awaits nothing."""
        runtime = self._runtime
        if self._stopped or runtime is None:
            return
        self._stopped = True
        runtime.background.cancel()
        if runtime.background_started and not runtime.background_done.is_set():
            with anyio.move_on_after(5):
                await runtime.background_done.wait()  # a heartbeat in flight must not outlive leave()
        await runtime.follower.discard_prepared()
        await self._engine.shutdown()
        await self._records.flush()
        snapshot = self._snapshot()
        if runtime.shared is not None and snapshot is not None:
            await thread_hop(runtime.shared.stopped, snapshot)
        await runtime.cluster.leave()

    # -- queries ----------------------------------------------------------------------------

    @property
    def packages(self) -> Mapping[str, Package]:
        """The packages this worker knows, read-only."""
        return MappingProxyType({p.name: p for p in self._engine.packages()})

    def package(self, name: str) -> Package:
        """A package (read-only: change it through the operations)."""
        return self._engine.package(name)

    def status(self, name: str | None = None) -> list[PackageStatus]:
        """Every active package (or the one named), with the version each live worker serves.
        A blocking call (it reads the other workers' heartbeats): from async code, run it in a
        worker thread."""
        packages = [self._engine.package(name)] if name is not None else self._engine.packages()
        runtime = self._runtime
        workers = runtime.cluster.workers() if runtime is not None else []
        required_by: dict[str, list[str]] = {}
        for other in self._engine.packages():
            if other.active is not None:
                for name_required in other.active.manifest.requires:
                    required_by.setdefault(name_required, []).append(other.name)
        result = []
        for package in packages:
            if package.active is None:
                continue
            serving: dict[str, str | None] = {w.id: w.serving.get(package.name) for w in workers}
            if runtime is not None:
                serving[runtime.cluster.worker_id] = package.active.version
            result.append(
                PackageStatus.of(
                    package, serving, tuple(required_by.get(package.name, ())), self._canary_status(package)
                )
            )
        return result

    def _canary_status(self, package: Package) -> dict[str, Any] | None:
        """The package's canary as this worker splits it, with its step and last analysis (from
        its run, here or on another worker through the store). Blocking (it may read the store)."""
        canary = self._engine.canary(package)
        mount = package.mount
        if canary is None or mount is None or mount.split is None:
            return None
        runtime = self._runtime
        found: dict[str, Any] = {"version": canary.version, "key": mount.split.key}
        leader = mount.split.leader
        if leader is not None:  # its instance bound to the canary of what it requires
            found["follows"] = f"{leader.canary.name} {leader.canary.version}"
        elif runtime is not None:
            run = runtime.coordinator.canaries.get(package.name)
            if run is not None:
                found.update(run.state.status(), analysis=run.latest)
            else:
                stored = runtime.store.desired().get(package.name)
                if stored is not None and stored.canary is not None:
                    found.update(CanaryState.from_dict(stored.canary).status())
        found["weight_percent"] = mount.split.weight / 100  # what this worker applies now
        return found

    def cluster(self) -> dict[str, Any]:
        """Every live worker of every host sharing the store: what it serves, its heartbeat's
        age, the packages where it lags behind the desired state. A blocking call."""
        runtime = self._running()
        return cluster_view(runtime.store, runtime.cluster)

    def deployment(self, deployment_id: str) -> Deployment:
        """A deployment started by this worker (its live record)."""
        record = self._records.find(deployment_id)
        if record is None:
            raise LookupError(f"no deployment with id {deployment_id!r}")
        return record

    def find_deployment(self, deployment_id: str) -> Deployment | None:
        """A deployment started by any worker (live progress if it is this worker's). Blocking."""
        record = self._records.find(deployment_id)
        if record is not None:
            return record
        stored = self._open_store().deployment(deployment_id)
        return Deployment.from_dict(stored) if stored is not None else None

    def deployments(self, limit: int = 100, package: str | None = None) -> list[Deployment]:
        """The history of every worker, newest first. Blocking."""
        stored = self._open_store().history(limit, package)
        live = {record.id: record for record in self._records.history}
        return [live.get(r["id"]) or Deployment.from_dict(r) for r in stored]

    def retired_alive(self) -> list[str]:
        """Labels of unloaded versions whose app or modules are still referenced (after gc)."""
        return self._engine.retired_alive()

    # -- operations -------------------------------------------------------------------------

    async def deploy(
        self,
        source: Source,
        *,
        signature: bytes | None = None,
        force: bool = False,
        shadow_host_routes: bool = False,
        canary: bool | str | None = None,
        record: Deployment | None = None,
    ) -> Deployment:
        """Install or upgrade a package from a directory, a .zip or .whl path, or archive bytes.

        Returns the deployment record once every live worker serves the new version (and its
        post-activation checks passed); raises DeploymentError, with the record, if anything
        failed. The old version keeps serving in every failure case. The record finishes later,
        once the replaced version drained and shut down.

        `signature`: the archive's SSH signature (required when trusted keys are configured).
        `force`: replace a different archive already deployed under the same version number.
        `shadow_host_routes`: the mount may cover routes of the host app on purpose.
        `canary`: True, or steps such as "5%:30s, 25%:1m, 100%", for a canary deploy (False: a
        plain switch even if the manifest's strategy is `canary`; None: as the manifest says).
        It returns once the canary takes its first share everywhere, its outcome pending until
        it is promoted (succeeded) or aborted; `promote_canary` and `abort_canary` move it on."""
        coordinator = self._running().coordinator
        with self._engine.operation():  # from the call: its first thread hop saves the record
            options = _options(signature, force, shadow_host_routes, canary)
            if record is None:  # saved first thing in the unpack step's thread hop
                record = self._records.new(Action.DEPLOY, None)
                return await coordinator.deploy(source, record, options, saved=False)
            return await coordinator.deploy(source, record, options)

    async def deploy_set(
        self,
        sources: Sequence[Source],
        *,
        signatures: Sequence[bytes | None] = (),
        force: bool = False,
        shadow_host_routes: bool = False,
        record: Deployment | None = None,
    ) -> Deployment:
        """Deploy several packages as one operation: every one is prepared and checked (a
        package that requires another of the set is bound to its new version), then all switch
        at once on every worker, or none does. Returns the record (`bundle` lists the set);
        raises DeploymentError as `deploy` does. `signatures`: one per source, in order."""
        coordinator = self._running().coordinator
        with self._engine.operation():
            record = await self._saved(record)
            options = _options(None, force, shadow_host_routes, None)
            return await coordinator.deploy_set(sources, record, options, signatures)

    async def _deploy_dropped(self, path: Path, signature: bytes | None) -> Deployment:
        return await self.deploy(path, signature=signature)

    async def submit(
        self,
        source: Source,
        *,
        signature: bytes | None = None,
        force: bool = False,
        shadow_host_routes: bool = False,
        canary: bool | str | None = None,
    ) -> Deployment:
        """Start `deploy(source)` in the background and return its record once it is in the
        store (its outcome is "pending" until the deployment ends): a crash from then on leaves
        a record that says `interrupted`, never none."""
        coordinator = self._running().coordinator
        options = _options(signature, force, shadow_host_routes, canary)
        return await self._in_background(lambda record: coordinator.deploy(source, record, options))

    async def submit_set(
        self,
        sources: Sequence[Source],
        *,
        signatures: Sequence[bytes | None] = (),
        force: bool = False,
        shadow_host_routes: bool = False,
    ) -> Deployment:
        """`deploy_set(sources)` in the background, as `submit` is for one package."""
        coordinator = self._running().coordinator
        options = _options(None, force, shadow_host_routes, None)
        return await self._in_background(
            lambda record: coordinator.deploy_set(sources, record, options, signatures)
        )

    async def _saved(self, record: Deployment | None) -> Deployment:
        """`record`, or a new deployment's, saved: a crash from then on leaves a record that
        says `interrupted`, never none."""
        if record is None:
            record = self._records.new(Action.DEPLOY, None)
            await self._records.save(record)
        return record

    async def _in_background(self, work: Callable[[Deployment], Awaitable[Deployment]]) -> Deployment:
        """A new record, saved, and `work(record)` started in the runtime: a crash from then on
        leaves a record that says `interrupted`, never none."""

        async def run(record: Deployment, operation: ExitStack) -> None:
            with operation:  # begun with the call, it ends with the deployment
                try:
                    await work(record)
                except HotDeployError:
                    pass  # the record holds the outcome and the error
                except Exception:
                    logger.exception("deployment %s crashed", record.id)

        operation = ExitStack()
        operation.enter_context(self._engine.operation())
        try:
            record = await self._saved(None)
            self._engine.runtime().start_soon(
                run, record, operation, name=f"hotdeploy deployment {record.id}"
            )
        except BaseException:
            operation.close()
            raise
        return record

    async def promote_canary(self, name: str, *, all_steps: bool = False) -> dict[str, Any]:
        """Move the package's canary to its next step now (all the way with `all_steps`: it
        becomes the active version), without waiting for its analysis; its state."""
        return await self._running().coordinator.canary_command(name, PROMOTE_ALL if all_steps else PROMOTE)

    async def abort_canary(self, name: str) -> dict[str, Any]:
        """Stop the package's canary: no more requests to it, it drains and is unloaded; the
        active version serves everyone (it never stopped). Its deployment ends `aborted`."""
        return await self._running().coordinator.canary_command(name, ABORT)

    async def rollback(self, name: str) -> Deployment:
        """Go back to the version that was active before the current one."""
        return await self._running().coordinator.rollback(name)

    async def activate(self, name: str, version: str) -> Deployment:
        """Make a version that is still available (in memory or in the store) the active one."""
        return await self._running().coordinator.activate(name, version)

    async def undeploy(self, name: str) -> Deployment:
        """Unmount a package everywhere, drain and shut down its versions, and forget it."""
        return await self._running().coordinator.undeploy(name)


class MountsView:
    """The mount table, read-only: how many mounts, and which one a path reaches."""

    __slots__ = ("_engine",)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __len__(self) -> int:
        return len(self._engine.mounts)

    def match(self, route_path: str) -> object | None:
        """The package mount that serves `route_path`, if any (not a reserved prefix)."""
        mount = self._engine.mounts.match(route_path)
        return None if mount is None or mount.reserved else mount


def _options(
    signature: bytes | None, force: bool, shadow_host_routes: bool, canary: bool | str | None
) -> DeployOptions:
    if isinstance(canary, str):
        return DeployOptions(signature, force, shadow_host_routes, canary=True, canary_steps=canary)
    return DeployOptions(signature, force, shadow_host_routes, canary=canary)
