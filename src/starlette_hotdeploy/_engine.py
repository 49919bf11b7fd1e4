"""Engine: the package versions of this process, and everything done to them.

Loading, starting and checking a version beside the current one, the switch, the drain and
retirement, unloading, and restoring a confirmed version from the store. The Deployer (which
coordinates an operation) and the Follower (which carries out other workers' operations) both
act through it.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pluggy

from ._archive import ArchiveLimits, Unpacked, clean_staging, unpack
from ._deployment import Deployment, Step
from ._dispatch import attach_routing
from ._errors import (
    CheckFailed,
    DeploymentInProgress,
    HotDeployError,
    LoadError,
    NotRunning,
    StartupError,
    UnknownPackage,
    UnknownVersion,
)
from ._hooks import make_plugin_manager, notify, run_checks
from ._lifespan import LifespanFailed, LifespanTimeout
from ._loader import collected
from ._mounts import Mount, MountTable
from ._package import Package
from ._probe import probe
from ._store import Desired, Store
from ._version import PackageVersion, VersionState

logger = logging.getLogger("starlette_hotdeploy")


class Engine:
    def __init__(
        self,
        *,
        home: Path,
        store: Store,
        plugins: pluggy.PluginManager,
        limits: ArchiveLimits,
        check_timeout: float,
        shutdown_timeout: float,
    ) -> None:
        self.home = home
        self.store = store
        self.plugins = plugins
        self.limits = limits
        self.check_timeout = check_timeout
        self.shutdown_timeout = shutdown_timeout
        self.mounts = MountTable()
        self.packages: dict[str, Package] = {}
        self.busy: set[str] = set()  # packages with an operation under way in this process
        self.task_group: anyio.abc.TaskGroup | None = None
        self._retiring: dict[PackageVersion, anyio.CancelScope] = {}
        self._unloaded: deque[tuple[str, list[weakref.ref[Any]]]] = deque(maxlen=1000)

    def package(self, name: str) -> Package:
        try:
            return self.packages[name]
        except KeyError:
            raise UnknownPackage(f"no package named {name!r} is deployed", package=name) from None

    async def shutdown(self) -> None:
        """Stop every loaded version (the server is stopping). Idempotent."""
        for package in list(self.packages.values()):
            if package.mount is not None:
                self.mounts.remove(package.prefix)
                package.mount = None
            for version in list(package.loaded):
                self.cancel_retirement(version)
                await self.stop_and_unload(package, version)

    def retired_alive(self) -> list[str]:
        """Labels of unloaded versions whose app or modules are still referenced (after gc)."""
        alive = [label for label, refs in self._unloaded if not collected(refs, collect=False)]
        if alive:
            alive = [label for label, refs in self._unloaded if not collected(refs)]
        return alive

    def clean_staging(self) -> None:
        """Remove what an unpack interrupted by a crash left behind (not a live worker's)."""
        clean_staging(self.home / "packages")

    def new_package(self, name: str, prefix: str) -> Package:
        """A package this process did not know yet, with the versions the store keeps."""
        package = Package(name=name, prefix=prefix)
        for stored in self.store.archives(name):
            package.available[stored.version] = stored.sha256
        return package

    def runtime(self) -> anyio.abc.TaskGroup:
        if self.task_group is None:
            raise NotRunning(
                "the deployer is not running: serve the app with lifespan enabled, "
                "or wrap the calls in `async with deployer.running():`"
            )
        return self.task_group

    @contextmanager
    def claim(self, name: str, record: Deployment) -> Iterator[None]:
        if name in self.busy:
            error = DeploymentInProgress(
                f"another operation on {name} is in progress; retry when it has finished",
                package=name,
                step="claim",
            )
            error.deployment = record
            record.finish("failed", error)
            raise error
        self.busy.add(name)
        try:
            yield
        finally:
            self.busy.discard(name)

    def can_rewarm(self, version: PackageVersion) -> bool:
        return version.state in (VersionState.READY, VersionState.DRAINING) and version in self._retiring

    async def prepare(self, record: Deployment, package: Package, version: PackageVersion) -> None:
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
            self.load(version)
        with record.step("start"):
            await self.start(version)
        with record.step("check"):
            if manifest.health is not None:
                await self.health_check(version)
            await run_checks(
                "hotdeploy_check_before_activate",
                self.managers(version),
                {"version": version, "previous": package.active},
                timeout=self.check_timeout,
                package=manifest.name,
                version=manifest.version,
                step="check",
            )
        version.state = VersionState.READY
        package.loaded.append(version)

    def load(self, version: PackageVersion) -> None:
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

    async def start(self, version: PackageVersion) -> None:
        manifest = version.manifest
        try:
            await version.start(self.runtime(), manifest.startup_timeout)
        except (LifespanFailed, LifespanTimeout) as exc:
            raise StartupError(
                f"lifespan startup failed: {exc}",
                package=manifest.name,
                version=manifest.version,
                step="start",
            ) from exc

    async def health_check(self, version: PackageVersion) -> None:
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

    def point(self, package: Package, new: PackageVersion | None, old: PackageVersion | None) -> None:
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

    async def switch_blocking(
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
            self.point(package, new, old)
        finally:
            mount.gate = None
            gate.set()

    def cancel_retirement(self, version: PackageVersion) -> None:
        scope = self._retiring.pop(version, None)
        if scope is not None:
            scope.cancel()

    def schedule_retirement(
        self, package: Package, old: PackageVersion, record: Deployment | None, delay: float = 0.0
    ) -> None:
        scope = anyio.CancelScope()
        self._retiring[old] = scope
        self.runtime().start_soon(self._retire, package, old, record, scope, delay)

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
            with maybe_step(record, f"drain {old.version}") as step:
                if not await old.wait_idle(old.manifest.drain_timeout):
                    terminated = await old.terminate()
                    if step is not None:
                        step.detail = f"{terminated} still open at the drain timeout were ended"
            self._retiring.pop(old, None)  # past this point it cannot be switched back to
        if scope.cancelled_caught:
            return  # switched back to while it drained
        try:
            with maybe_step(record, f"shutdown {old.version}"):
                await self.stop_and_unload(package, old)
        except Exception:
            logger.exception("%s %s: shutdown failed", old.name, old.version)
        await notify("hotdeploy_drained", self.managers(None), {"version": old, "terminated": terminated})

    async def remove_locally(self, package: Package, record: Deployment | None) -> None:
        with maybe_step(record, "unmount"):
            if package.mount is not None:
                self.mounts.remove(package.prefix)
                package.mount = None
        for version in list(package.loaded):
            self.cancel_retirement(version)
            with maybe_step(record, f"drain {version.version}") as step:
                version.state = VersionState.DRAINING
                if not await version.wait_idle(version.manifest.drain_timeout):
                    count = await version.terminate()
                    if step is not None:
                        step.detail = f"{count} still open at the drain timeout were ended"
            with maybe_step(record, f"shutdown {version.version}"):
                await self.stop_and_unload(package, version)
        self.packages.pop(package.name, None)

    async def stop_and_unload(self, package: Package, version: PackageVersion) -> None:
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

    async def discard(self, package: Package, version: PackageVersion) -> None:
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
        await self.stop_and_unload(package, version)

    def managers(self, version: PackageVersion | None) -> list[pluggy.PluginManager]:
        if version is not None and version.plugins is not None:
            return [self.plugins, version.plugins]
        return [self.plugins]

    async def unpack_stored(self, name: str, version: str, sha256: str) -> Unpacked:
        stored = await anyio.to_thread.run_sync(self.store.archive, name, version, sha256)
        if stored is None:
            raise UnknownVersion(f"{name} {version}: its archive is no longer in the store", package=name)
        return await anyio.to_thread.run_sync(unpack, stored.path, self.home / "packages", self.limits)

    def serving(self) -> dict[str, str]:
        return {name: p.active.version for name, p in self.packages.items() if p.active is not None}

    async def restore(
        self, name: str, wanted: Desired, package: Package | None
    ) -> tuple[PackageVersion | None, Package | None]:
        """Load and start a confirmed version from its archive (no checks: it passed them).

        If it no longer starts, fall back to the versions before it (the salvage copies)."""
        candidates = [(wanted.version, wanted.sha256)] + [pair for pair in reversed(wanted.lineage[:-1])]
        for version_name, sha256 in candidates:
            try:
                unpacked = await self.unpack_stored(name, version_name, sha256)
                if package is None:
                    package = await anyio.to_thread.run_sync(self.new_package, name, unpacked.manifest.mount)
                version = PackageVersion(unpacked.manifest, unpacked.root, unpacked.sha256)
                try:
                    self.load(version)
                    await self.start(version)
                except Exception:
                    await self.discard(package, version)
                    raise
                return version, package
            except Exception:
                logger.exception("%s %s: cannot restore this version", name, version_name)
        logger.error("%s: no confirmed version could be restored; the package is not served", name)
        return None, package


@contextmanager
def maybe_step(record: Deployment | None, name: str) -> Iterator[Step | None]:
    """A timed step of `record`, if there is a record (a follower's work has none)."""
    if record is None:
        yield None
    else:
        with record.step(name) as step:
            yield step
