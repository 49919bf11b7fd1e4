"""Deployer: deploy, roll back, activate and undeploy packages in a running server."""

from __future__ import annotations

import logging
import os
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

from ._archive import ArchiveLimits, Unpacked, unpack
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
from ._version import PackageVersion, VersionState

logger = logging.getLogger("starlette_hotdeploy")

Source = str | os.PathLike[str] | bytes


class Deployer:
    """Owns the mount table and every package version; runs deployments.

    Args:
        home: where unpacked versions are kept (default `$HOTDEPLOY_HOME` or `./.hotdeploy`).
        plugins: pluggy plugins (objects or modules with `@hookimpl` functions) for every package.
        entry_points: also load plugins from the `starlette_hotdeploy` entry-point group.
        bake_time: seconds the previous version stays warm after a switch, so a failed
            post-activation check can switch back at once.
        check_timeout: seconds each check (hook or health request) may take.
        shutdown_timeout: seconds a version's lifespan shutdown may take.
        limits: caps for unpacking archives.
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
    ) -> None:
        self.home = Path(home if home is not None else os.environ.get("HOTDEPLOY_HOME", ".hotdeploy"))
        self.mounts = MountTable()
        self.plugins: pluggy.PluginManager = make_plugin_manager(plugins, entry_points=entry_points)
        self.bake_time = bake_time
        self.check_timeout = check_timeout
        self.shutdown_timeout = shutdown_timeout
        self.limits = limits or ArchiveLimits()
        self.history: deque[Deployment] = deque(maxlen=history_size)
        self.events = EventHub()
        self._packages: dict[str, Package] = {}
        self._busy: set[str] = set()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._retiring: dict[PackageVersion, anyio.CancelScope] = {}
        self._unloaded: deque[tuple[str, list[weakref.ref[Any]]]] = deque(maxlen=1000)

    # -- runtime ----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Deployer]:
        """Open the runtime that package lifespans and drains run in.

        HotDeployMiddleware does this for the server's lifespan; use it directly when there is
        no server lifespan (tests, scripts)."""
        if self._task_group is not None:
            raise RuntimeError("this Deployer is already running")
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
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

    # -- queries ----------------------------------------------------------------------------

    @property
    def packages(self) -> Mapping[str, Package]:
        return dict(self._packages)

    def package(self, name: str) -> Package:
        try:
            return self._packages[name]
        except KeyError:
            raise UnknownPackage(f"no package named {name!r} is deployed", package=name) from None

    def status(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in sorted(self._packages.values(), key=lambda p: p.name)]

    def deployment(self, deployment_id: str) -> Deployment:
        for record in self.history:
            if record.id == deployment_id:
                return record
        raise LookupError(f"no deployment with id {deployment_id!r}")

    def retired_alive(self) -> list[str]:
        """Labels of unloaded versions whose app or modules are still referenced (after gc)."""
        alive = [label for label, refs in self._unloaded if not collected(refs, collect=False)]
        if alive:
            alive = [label for label, refs in self._unloaded if not collected(refs)]
        return alive

    # -- operations -------------------------------------------------------------------------

    async def deploy(self, source: Source, *, record: Deployment | None = None) -> Deployment:
        """Install or upgrade a package from a directory, a .zip or .whl path, or archive bytes.

        Returns the deployment record once the new version is active (and its post-activation
        checks passed); raises DeploymentError, with the record, if anything failed. The old
        version keeps serving in every failure case."""
        self._runtime()
        record = record or self._new_record("deploy", None)
        try:
            with record.step("unpack") as step:
                unpacked = await anyio.to_thread.run_sync(unpack, source, self.home / "packages", self.limits)
                step.detail = (
                    f"{unpacked.manifest.name} {unpacked.manifest.version} sha256:{unpacked.sha256[:12]}"
                )
        except Exception as exc:
            error = exc if isinstance(exc, HotDeployError) else ArchiveError(f"{type(exc).__name__}: {exc}")
            await self._fail(record, error)
        manifest = unpacked.manifest
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
        """Unmount a package, drain and shut down its versions, and forget it."""
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
            with record.step("unmount"):
                self.mounts.remove(package.prefix)
                package.mount = None
            for version in list(package.loaded):
                retiring = self._retiring.pop(version, None)
                if retiring is not None:
                    retiring.cancel()
                with record.step(f"drain {version.version}") as step:
                    version.state = VersionState.DRAINING
                    if not await version.wait_idle(version.manifest.drain_timeout):
                        count = await version.terminate()
                        step.detail = f"{count} still open at the drain timeout were ended"
                with record.step(f"shutdown {version.version}"):
                    await self._stop_and_unload(package, version)
            self._packages.pop(name, None)
            record.finish("succeeded")
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
            record.finish("failed", error)
            raise error
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

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
            if warm is not None and warm is not current and self._can_rewarm(warm):
                # Still loaded and started (ready, or draining before its shutdown): switching
                # back is one assignment.
                scope = self._retiring.pop(warm, None)
                if scope is not None:
                    scope.cancel()
                record.sha256 = warm.sha256
                with record.step("switch") as step:
                    step.detail = "warm: the version was still loaded"
                    self._point(package, warm, current)
                self._after_success(package, warm, current, record)
                return record
            if warm is not None and warm is current:
                record.finish("succeeded")
                return record
            unpacked = package.available[target]
            record.sha256 = unpacked.sha256
            return await self._install(record, package, unpacked)

    def _can_rewarm(self, version: PackageVersion) -> bool:
        return version.state in (VersionState.READY, VersionState.DRAINING) and version in self._retiring

    async def _install(self, record: Deployment, package: Package, unpacked: Unpacked) -> Deployment:
        """Load, start and check a version beside the current one, then switch to it."""
        manifest = unpacked.manifest
        current = package.active
        record.from_version = current.version if current is not None else None
        if current is not None and current.sha256 == unpacked.sha256:
            with record.step("unchanged") as step:
                step.detail = f"{manifest.name} {manifest.version} with this sha256 is already active"
            record.finish("succeeded")
            return record
        version = PackageVersion(manifest, unpacked.root, unpacked.sha256)
        with anyio.CancelScope(shield=True):  # a deployment runs to its outcome; every step is bounded
            try:
                await self._prepare(record, package, version)
            except Exception as exc:
                await self._discard(package, version)
                await self._fail(record, _as_error(exc, version))
            try:
                with record.step("switch") as step:
                    if manifest.strategy == "block" and current is not None:
                        step.detail = "block: new requests held while the previous version finished"
                        await self._switch_blocking(package, version, current)
                    else:
                        self._point(package, version, current)
            except Exception as exc:
                await self._discard(package, version)
                await self._fail(record, _as_error(exc, version))
            first_install = package.name not in self._packages
            self._packages[package.name] = package
            try:
                with record.step("bake") as step:
                    step.detail = f"post-activation checks; previous version warm for {self.bake_time:g}s"
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
            except Exception as exc:
                error = _as_error(exc, version)
                with record.step("switch back") as step:
                    step.detail = f"back to {current.version}" if current is not None else "unmounted"
                    self._point(package, current, version)
                await self._discard(package, version)
                if first_install:
                    self._packages.pop(package.name, None)
                record.finish("rolled_back", error)
                if current is not None:
                    await notify(
                        "hotdeploy_rolled_back",
                        self._managers(current),
                        {"version": version, "previous": current, "deployment": record},
                    )
                await notify("hotdeploy_failed", self._managers(None), {"deployment": record, "error": error})
                raise DeploymentError(record, error) from exc
            package.available[manifest.version] = unpacked
            self._after_success(package, version, current, record)
        return record

    async def _prepare(self, record: Deployment, package: Package, version: PackageVersion) -> None:
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
        with record.step("start"):
            try:
                await version.start(self._runtime(), manifest.startup_timeout)
            except (LifespanFailed, LifespanTimeout) as exc:
                raise StartupError(
                    f"lifespan startup failed: {exc}",
                    package=manifest.name,
                    version=manifest.version,
                    step="start",
                ) from exc
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

    async def _health_check(self, version: PackageVersion) -> None:
        manifest = version.manifest
        assert manifest.health is not None
        where = f"GET {manifest.mount}{manifest.health}"
        try:
            response = await probe(version, manifest.health, self.check_timeout)
        except TimeoutError:
            raise CheckFailed(
                f"health check {where} did not answer within {self.check_timeout:g}s",
                check="health",
                package=manifest.name,
                version=manifest.version,
                step="check",
            ) from None
        except Exception as exc:
            raise CheckFailed(
                f"health check {where} raised {type(exc).__name__}: {exc}",
                check="health",
                package=manifest.name,
                version=manifest.version,
                step="check",
            ) from exc
        if not 200 <= response.status < 300:
            body = response.text.strip()[:200]
            raise CheckFailed(
                f"health check {where} answered {response.status}" + (f": {body}" if body else ""),
                check="health",
                package=manifest.name,
                version=manifest.version,
                step="check",
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
        if old is not None:
            old.state = VersionState.DRAINING

    async def _switch_blocking(self, package: Package, new: PackageVersion, old: PackageVersion) -> None:
        """Integration Server's behaviour: hold new requests until the old version is idle."""
        mount = package.mount
        assert mount is not None
        gate = anyio.Event()
        mount.gate = gate
        try:
            timeout = new.manifest.drain_timeout
            if not await old.wait_idle(timeout):
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

    def _after_success(
        self, package: Package, new: PackageVersion, old: PackageVersion | None, record: Deployment
    ) -> None:
        if record.operation == "rollback":
            if package.lineage and package.lineage[-1] != new.version:
                package.lineage.pop()
        else:
            package.record_activation(new.version)
        if new not in package.loaded:
            package.loaded.append(new)
        record.finish("succeeded")
        tg = self._runtime()
        tg.start_soon(self._announce, new, old, record)
        if old is not None:
            scope = anyio.CancelScope()
            self._retiring[old] = scope
            tg.start_soon(self._retire, package, old, record, scope)

    async def _announce(self, new: PackageVersion, old: PackageVersion | None, record: Deployment) -> None:
        await notify(
            "hotdeploy_activated",
            self._managers(new),
            {"version": new, "previous": old, "deployment": record},
        )

    async def _retire(
        self, package: Package, old: PackageVersion, record: Deployment, scope: anyio.CancelScope
    ) -> None:
        """Drain the replaced version, then shut it down and unload it (in the background)."""
        terminated = 0
        with scope:
            with record.step(f"drain {old.version}") as step:
                if not await old.wait_idle(old.manifest.drain_timeout):
                    terminated = await old.terminate()
                    step.detail = f"{terminated} still open at the drain timeout were ended"
            self._retiring.pop(old, None)  # past this point it cannot be switched back to
        if scope.cancelled_caught:
            return  # switched back to while it drained
        try:
            with record.step(f"shutdown {old.version}"):
                await self._stop_and_unload(package, old)
        except Exception:
            logger.exception("%s %s: shutdown failed", old.name, old.version)
        await notify("hotdeploy_drained", self._managers(None), {"version": old, "terminated": terminated})

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
        await notify("hotdeploy_failed", self._managers(None), {"deployment": record, "error": error})
        raise DeploymentError(record, error) from error

    def _managers(self, version: PackageVersion | None) -> list[pluggy.PluginManager]:
        if version is not None and version.plugins is not None:
            return [self.plugins, version.plugins]
        return [self.plugins]


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
