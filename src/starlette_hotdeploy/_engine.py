"""Engine: the one owner of this process's packages and their versions.

Only the engine changes a package's versions in memory, its busy flag, its lineage and what its
mount points at, through the named methods below; the coordinator (this worker's operations)
and the follower (other workers' operations) call them and read the rest.

Retirement and warm switch-back exclude each other by construction: a replaced version is
`draining` until its retirement *decides* (one synchronous step, after the drain) to stop it,
which moves it to `stopping`; `hold()` takes a draining version back from its retirement in
one synchronous step too. Whichever comes first wins: a held version is never unloaded, and a
stopping version is never switched back to (it is cold: it is loaded again from its archive).
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pluggy

from . import _switch_interval as switch_interval
from . import _thread_hop
from ._archive import ArchiveLimits, Unpacked, clean_staging, unpack
from ._cleaners import Collector, Unloaded, release
from ._dependency_order import requirements_first as dependency_order
from ._deployment import Deployment, Step
from ._detail import Redactor
from ._errors import (
    CheckFailed,
    DependentFailed,
    DeploymentInProgress,
    HotDeployError,
    IllegalTransition,
    LifespanFailed,
    LifespanTimeout,
    LoadError,
    NotRunning,
    StartupError,
    UnknownPackage,
    UnknownVersion,
)
from ._figures import RequestFigures
from ._hooks import make_plugin_manager, notify, run_checks, unload_cleaners
from ._loader import audited, collected, top_level_names, weak_refs, what_raised
from ._manifest import MANIFEST_NAME, Manifest, load_manifest
from ._mounts import Mount, MountTable
from ._package import Package
from ._probe import ProbeCrashed, probe
from ._split import Split
from ._store import Desired, Store
from ._thread_hop import thread_hop
from ._types import ASGIApp
from ._version import PackageVersion, VersionState
from ._worker_figures import WorkerFigures

if TYPE_CHECKING:
    from ._signing import TrustedKeys

logger = logging.getLogger("starlette_hotdeploy")
# How many unloaded versions are tracked before the collected ones are first forgotten.
_FORGET_FIRST = 16

_PREPARING = frozenset({VersionState.STAGED, VersionState.STARTING, VersionState.READY})


@dataclass(eq=False)
class Retirement:
    """A replaced version on its way out: drain, then stop and unload (in the background)."""

    package: Package
    version: PackageVersion
    record: Deployment | None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    withdrawn: bool = False  # held for a switch back, or the server is stopping: leave it alone
    drain: Step | None = None  # the record's drain step, while it runs

    def withdraw(self, why: str) -> None:
        """Leave the version alone from now on; the record's last step ends here."""
        self.withdrawn = True
        self.scope.cancel()
        record = self.record
        if record is not None and record.finished_at is None:
            if self.drain is None:
                self.drain = record.begin_step(f"drain {self.version.version}")
            record.end_step(self.drain, detail=why)
            record.finish()


@dataclass(frozen=True, eq=False)
class Move:
    """Another package that switches in the same step as an operation's version: a dependent
    (`new` loaded from the same archive as `old`, its active version, bound to the new version
    of what it requires), or a package of a set deployed together (`old` None: installed by it)."""

    package: Package
    old: PackageVersion | None
    new: PackageVersion

    def __str__(self) -> str:
        return f"{self.package.name} {self.new.version}"


class Engine:
    def __init__(
        self,
        *,
        home: Path,
        plugins: pluggy.PluginManager,
        limits: ArchiveLimits,
        check_timeout: float,
        load_timeout: float = 30.0,
        shutdown_timeout: float,
    ) -> None:
        self.home = home
        self.plugins = plugins
        self.limits = limits
        self.check_timeout = check_timeout
        self.load_timeout = load_timeout  # unless the manifest sets its own
        self.redact = Redactor(home)  # what error details may say of the server's paths
        self.trusted_keys: TrustedKeys | None = None  # set: only signed archives are accepted
        self.host_app: object | None = None  # the app the packages sit beside (its routes)
        self.figures: WorkerFigures | None = None  # set: metrics are on (requests, drains)
        self.pin_secret: str | None = None  # set: pinning a request to a version needs it
        self.shutdown_timeout = shutdown_timeout
        self.mounts = MountTable()
        self._store: Store | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._packages: dict[str, Package] = {}
        self._busy: set[str] = set()  # packages with an operation under way in this process
        self._handed_over: set[str] = set()  # claims that outlive their block (see hand_over_claim)
        # A package under a canary -> its dependents whose instances bound to the canary follow
        # it, each with the active version it had when it began to follow.
        self._carried: dict[str, list[tuple[Package, PackageVersion | None]]] = {}
        self._retirements: dict[PackageVersion, Retirement] = {}
        self._held: set[PackageVersion] = set()  # draining versions taken back for a switch back
        self._unloaded: deque[tuple[str, list[weakref.ref[Any]]]] = deque(maxlen=1000)
        self._forget_at = _FORGET_FIRST
        # Operations under way in this process (deployments from their call to their answer, a
        # bake's wait aside; a follower's part in another worker's): see `operation`.
        self._operations = 0
        self._quiet: anyio.Event | None = None  # set when the last operation ends
        self.collector = Collector(lambda: not self._operations and not self._preparing())
        self._collecting_in: anyio.abc.TaskGroup | None = None  # the runtime its task runs in

    # -- runtime ----------------------------------------------------------------------------

    def open(self, task_group: anyio.abc.TaskGroup, store: Store) -> None:
        """The runtime started: lifespans and retirements run in `task_group`."""
        self._task_group = task_group
        self._store = store

    def close(self) -> None:
        self._task_group = None

    @property
    def is_running(self) -> bool:
        return self._task_group is not None

    def runtime(self) -> anyio.abc.TaskGroup:
        if self._task_group is None:
            raise NotRunning(
                "the deployer is not running: serve the app with lifespan enabled, "
                "or wrap the calls in `async with deployer.running():`"
            )
        return self._task_group

    @property
    def store(self) -> Store:
        if self._store is None:
            raise NotRunning("the deployer is not running: its store is not open yet")
        return self._store

    # -- reading ----------------------------------------------------------------------------

    def package(self, name: str) -> Package:
        try:
            return self._packages[name]
        except KeyError:
            raise UnknownPackage(f"no package named {name!r} is deployed", package=name) from None

    def get(self, name: str) -> Package | None:
        return self._packages.get(name)

    def packages(self) -> list[Package]:
        return sorted(self._packages.values(), key=lambda p: p.name)

    def is_busy(self, name: str) -> bool:
        return name in self._busy

    def serving(self) -> dict[str, str]:
        return {name: p.active.version for name, p in self._packages.items() if p.active is not None}

    def retired_alive(self) -> list[str]:
        """Labels of unloaded versions whose app or modules are still referenced (after gc)."""
        alive = [label for label, refs in self._unloaded if not collected(refs, collect=False)]
        if alive:
            gc.collect()  # once for all of them
            alive = [label for label, refs in self._unloaded if not collected(refs, collect=False)]
        return alive

    def managers(self, version: PackageVersion | None) -> list[pluggy.PluginManager]:
        if version is not None and version.plugins is not None:
            return [self.plugins, version.plugins]
        return [self.plugins]

    # -- claiming and membership -------------------------------------------------------------

    @contextmanager
    def claim(self, name: str) -> Iterator[None]:
        """One operation per package at a time in this process."""
        if name in self._busy:
            raise DeploymentInProgress(
                f"another operation on {name} is in progress; retry when it has finished",
                package=name,
                step="claim",
            )
        self._busy.add(name)
        try:
            yield
        finally:
            if name in self._handed_over:
                self._handed_over.discard(name)  # held on by whoever took it over
            else:
                self._busy.discard(name)

    def hand_over_claim(self, name: str) -> None:
        """Inside `claim(name)`: the claim outlives the block (a canary run keeps it until its
        end); `release_claim` ends it."""
        self._handed_over.add(name)

    def release_claim(self, name: str) -> None:
        self._busy.discard(name)

    def new_package(self, name: str, prefix: str) -> Package:
        """A package this process did not know yet, with the versions the store keeps (blocking)."""
        package = Package(name=name, prefix=prefix)
        for stored in self.store.archives(name):
            package._available[stored.version] = stored.sha256
        return package

    def adopt(self, package: Package) -> None:
        """The package has (or is about to have) an active version here."""
        self._packages.setdefault(package.name, package)

    def forget(self, package: Package) -> None:
        if self._packages.get(package.name) is package:
            del self._packages[package.name]

    def confirm(self, package: Package, version: str, sha256: str, lineage: list[tuple[str, str]]) -> None:
        """The store's desired state for the package: `version` active, after `lineage`."""
        package._available[version] = sha256
        package._lineage = list(lineage)

    def set_lineage(self, package: Package, lineage: list[tuple[str, str]]) -> None:
        package._lineage = list(lineage)

    def note_available(self, package: Package, archives: list[tuple[str, str]]) -> None:
        for version, sha256 in archives:
            package._available[version] = sha256

    def drop_available(self, package: Package, version: str, sha256: str) -> None:
        if package._available.get(version) == sha256:
            del package._available[version]

    # -- preparing a version ----------------------------------------------------------------

    async def prepare(
        self,
        record: Deployment | None,
        package: Package,
        version: PackageVersion,
        bound_to: dict[str, PackageVersion] | None = None,
    ) -> None:
        """Load, start and check a version beside the current one (no traffic yet). On failure
        the caller discards it. `bound_to`: the versions of its requirements it imports from
        (default: the active ones)."""
        manifest = version.manifest
        with maybe_step(record, "manifest"):
            if package.mount is not None and manifest.mount != package.prefix:
                raise HotDeployError(
                    f"mount changed from {package.prefix!r} to {manifest.mount!r}; a package keeps its "
                    "mount: undeploy it first, or deploy under a new name",
                    package=manifest.name,
                    version=manifest.version,
                    step="manifest",
                )
            self.mounts.check(manifest.mount, manifest.name)
        with maybe_step(record, "validate"):
            await run_checks(
                "hotdeploy_validate",
                [self.plugins],
                {"manifest": manifest},
                timeout=self.check_timeout,
                package=manifest.name,
                version=manifest.version,
                step="validate",
            )
        with maybe_step(record, "load"):
            await self._load(package, version, bound_to)
        with maybe_step(record, "start"):
            await self._start(version)
        with maybe_step(record, "check"):
            if manifest.health is not None:
                await self._health_check(version)
            await run_checks(
                "hotdeploy_check_before_activate",
                self.managers(version),
                {"version": version, "previous": package.active},
                timeout=self.check_timeout,
                package=manifest.name,
                version=manifest.version,
                step="check",
            )
        version.transition(VersionState.READY)

    def bindings(self, manifest: Manifest) -> dict[str, PackageVersion]:
        """What a version of `manifest` imports its requirements from: their active versions
        (none if it opts out with `reload_with_requirements = false`)."""
        if not manifest.reload_with_requirements:
            return {}
        found = {name: self._packages[name].active for name in manifest.requires if name in self._packages}
        return {name: version for name, version in found.items() if version is not None}

    def is_bound_current(self, version: PackageVersion) -> bool:
        """Whether it is bound to exactly the active versions of its requirements (one restored
        before its requirement was is bound to nothing there, and must be bound anew)."""
        return version.bound_to == self.bindings(version.manifest)

    async def _load(
        self,
        package: Package,
        version: PackageVersion,
        bound_to: dict[str, PackageVersion] | None = None,
        *,
        threads: anyio.CapacityLimiter | None = None,
    ) -> None:
        """Import the version's app and hooks module in a worker thread (one of `threads`, when
        given), bounded by its `load_timeout` (the event loop serves everything else meanwhile;
        see _loader)."""
        manifest = version.manifest
        package._loaded.append(version)  # from here on, discard() cleans it up
        version.open_namespace(self.bindings(manifest) if bound_to is None else bound_to)
        timeout = manifest.load_timeout or self.load_timeout
        stage = [f"importing {manifest.app_module!r}"]  # what the thread is doing, for the timeout
        try:
            with anyio.fail_after(timeout):
                app, plugins = await thread_hop(
                    _import_version, version, stage, abandon_on_cancel=True, limiter=threads
                )
        except TimeoutError:
            raise LoadError(
                f"{stage[0]} did not finish within {timeout:g}s; the thread is abandoned (Python "
                "cannot stop it): it runs on until the import returns and keeps what it holds, its "
                "namespace is closed and what it installs is removed; restart the worker if it "
                "never returns",
                package=manifest.name,
                version=manifest.version,
                step="load",
            ) from None
        # Set on the event loop, only now: an abandoned thread's result is never kept.
        version.app, version.plugins = app, plugins

    async def _start(self, version: PackageVersion) -> None:
        manifest = version.manifest
        if self.figures is not None:
            version.figures = RequestFigures()
        try:
            await version.start(self.runtime(), manifest.startup_timeout)
        except (LifespanFailed, LifespanTimeout) as exc:
            raise StartupError(
                exc.message,
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
        except ProbeCrashed as exc:
            raise CheckFailed(f"health check {where} raised {exc}", **context) from exc
        if not 200 <= response.status < 300:
            body = response.text.strip()[:200]
            raise CheckFailed(
                f"health check {where} answered {response.status}" + (f": {body}" if body else ""), **context
            )

    async def unpack_stored(self, name: str, version: str, sha256: str) -> Unpacked:
        return await thread_hop(self._unpack_stored, name, version, sha256)

    def _unpack_stored(self, name: str, version: str, sha256: str) -> Unpacked:
        """Blocking: a stored archive, unpacked (one thread hop for the look-up and the unpack).
        An earlier unpack of it is used as it is, as `unpack` itself would (a directory appears
        only complete, by a rename), without reading and extracting the archive again."""
        stored = self.store.archive(name, version, sha256)
        if stored is None:
            raise UnknownVersion(f"{name} {version}: its archive is no longer in the store", package=name)
        cached = self.home / "packages" / name / f"{version}-{sha256[:12]}"
        manifest_path = cached / MANIFEST_NAME
        if manifest_path.is_file():
            try:
                manifest = load_manifest(manifest_path)
            except HotDeployError:
                pass
            else:
                if (manifest.name, manifest.version) == (name, version):
                    return Unpacked(cached, manifest, sha256, top_level_names(cached))
        return unpack(stored.path, self.home / "packages", self.limits)

    async def restore(
        self,
        name: str,
        wanted: Desired,
        package: Package | None,
        before_load: Callable[[Manifest], Awaitable[None]] | None = None,
        threads: anyio.CapacityLimiter | None = None,
    ) -> tuple[PackageVersion | None, Package | None]:
        """Load and start a confirmed version from its archive (no checks: it passed them).
        `before_load` is awaited once its manifest is read (`RestoreOrder.before_load`);
        its thread hops (reading the archive, importing) take one of `threads`
        (`RestoreOrder.threads`).

        If it no longer starts, fall back to the versions before it (the salvage copies)."""
        candidates = [(wanted.version, wanted.sha256), *reversed(wanted.lineage[:-1])]
        for version_name, sha256 in candidates:
            try:

                def fetch(
                    version_name: str = version_name, sha256: str = sha256, known: Package | None = package
                ) -> tuple[Unpacked, Package]:
                    unpacked = self._unpack_stored(name, version_name, sha256)
                    found = known if known is not None else self.new_package(name, unpacked.manifest.mount)
                    return unpacked, found

                unpacked, found = await thread_hop(fetch, limiter=threads)  # one thread hop
                package = found
                if before_load is not None:
                    await before_load(unpacked.manifest)
                version = unpacked.new_version()
                try:
                    await self._load(found, version, threads=threads)
                    await self._start(version)
                    version.transition(VersionState.READY)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self.discard(found, version)
                    raise
                logger.info(
                    "%s %s restored from the store",
                    name,
                    version_name,
                    extra={"package": name, "version": version_name},
                )
                return version, found
            except Exception:
                logger.exception("%s %s: cannot restore this version", name, version_name)
        logger.error("%s: no confirmed version could be restored; the package is not served", name)
        return None, package

    # -- dependents -------------------------------------------------------------------------

    def dependents(self, *names: str) -> list[Package]:
        """The active packages that move with `names` (those changing): those that require one
        (or require one that moves) and do not opt out, each after the ones it requires."""
        moving = set(names)
        found: list[Package] = []
        grew = True
        while grew:
            grew = False
            for package in sorted(self._packages.values(), key=lambda p: p.name):
                active = package.active
                if package.name in moving or active is None or not active.manifest.reload_with_requirements:
                    continue
                if moving & active.manifest.requires.keys():
                    moving.add(package.name)
                    found.append(package)
                    grew = True
        return requirements_first(found)  # each bound to the new instances of what it requires

    async def prepare_dependents(
        self, record: Deployment | None, dependents: list[Package], *changing: PackageVersion
    ) -> list[Move]:
        """Load, start and check a new instance of each dependent (from its active version's
        archive), bound to the `changing` versions and to the instances moving before it. All or
        nothing: on failure the ones prepared are discarded and DependentFailed names the
        dependent."""
        moves: list[Move] = []
        moving = {version.name: version for version in changing}
        new = changing[0]
        for package in dependents:
            old = package.active
            if old is None:
                continue
            version = old.twin()
            try:
                with maybe_step(record, f"dependent {package.name} {old.version}") as step:
                    bound = await self.prepare_bound(package, version, moving)
                    if step is not None:
                        step.detail = describe_binding(bound)
            except Exception as exc:
                with anyio.CancelScope(shield=True):
                    await self.discard_moves(moves)
                cause = exc.message if isinstance(exc, HotDeployError) else what_raised(exc)
                required = [v for name, v in moving.items() if name in old.manifest.requires]
                what = " and ".join(v.name for v in required) or new.name
                bound_to = ", ".join(f"{v.name} {v.version}" for v in required) or new.version
                raise DependentFailed(
                    f"{package.name} {old.version} requires {what} and moves with it, but could not "
                    f"be prepared bound to {bound_to}: {cause}; nothing switched",
                    package=new.name,
                    version=new.version,
                    step=f"dependent {package.name}",
                ) from exc
            moves.append(Move(package, old, version))
            moving[package.name] = version
        return moves

    async def prepare_bound(
        self, package: Package, version: PackageVersion, moving: dict[str, PackageVersion] | None = None
    ) -> dict[str, PackageVersion]:
        """`prepare` a version bound to the `moving` versions of what it requires (to the active
        ones for the rest); discarded if it fails. What it is bound to."""
        bound = self.bindings(version.manifest)
        if moving and version.manifest.reload_with_requirements:
            bound.update({name: v for name, v in moving.items() if name in version.manifest.requires})
        try:
            await self.prepare(None, package, version, bound)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.discard(package, version)
            raise
        return bound

    async def discard_moves(self, moves: list[Move]) -> None:
        """Throw away the new instances of moves that did not switch (dependents first)."""
        for move in reversed(moves):
            await self.discard(move.package, move.new)

    def retire_moves(self, moves: list[Move], delay: float = 0.0) -> None:
        """The old instances of moves that switched: drained, stopped and unloaded."""
        for move in moves:
            if move.old is not None and move.old.state is VersionState.DRAINING:
                self.retire(move.package, move.old, None, delay)

    # -- switching --------------------------------------------------------------------------

    def switch(
        self,
        package: Package,
        new: PackageVersion | None,
        old: PackageVersion | None,
        moves: Sequence[Move] = (),
    ) -> None:
        """The switch: one assignment on the request path's mount (or the unmount, for None),
        and one on each moving dependent's, with no await in between: no request sees a new
        version beside a dependent bound to the old one."""
        self._switch_one(package, new, old)
        for move in moves:
            self._switch_one(move.package, move.new, move.old)

    def switch_back(
        self, package: Package, to: PackageVersion | None, away: PackageVersion, moves: Sequence[Move] = ()
    ) -> None:
        """Undo `switch(package, away, to, moves)` in one step: every mount back to what served
        before (held since the switch), or unmounted where the operation installed it."""
        self._switch_one(package, to, away)
        for move in moves:
            self._switch_one(move.package, move.old, move.new)

    def _switch_one(self, package: Package, new: PackageVersion | None, old: PackageVersion | None) -> None:
        if new is None:
            self.mounts.remove(package.prefix)
            package._mount = None
        else:
            if new.state is VersionState.DRAINING:
                if new not in self._held:
                    raise IllegalTransition(
                        "a draining version is switched back to only while held",
                        package=new.name,
                        version=new.version,
                        step="switch",
                    )
                self._held.discard(new)
            new.transition(VersionState.ACTIVE)
            if new not in package._loaded:
                package._loaded.append(new)
            if package._mount is None:
                mount = Mount(package.prefix, package.name, new)
                self.mounts.add(mount)
                package._mount = mount
            else:
                package._mount.point(new)
                split = package._mount.split
                if split is not None and split.canary is new:
                    package._mount.split = None  # promoted: every request goes to it now
                    self._carried.pop(package.name, None)  # its dependents' switch in the same step
        if old is not None and old is not new and old.state is VersionState.ACTIVE:
            old.transition(VersionState.DRAINING)
            if new is not None:
                # Kept warm for a switch back until the operation retires (or releases) it.
                self._held.add(old)

    # -- canaries ---------------------------------------------------------------------------

    def canary(self, package: Package) -> PackageVersion | None:
        """The version that takes a share of the package's requests beside the active one."""
        mount = package.mount
        return mount.split.canary if mount is not None and mount.split is not None else None

    def start_canary(
        self,
        package: Package,
        version: PackageVersion,
        weight: int,
        key: str,
        operation: str,
        carried: Sequence[Move] = (),
    ) -> None:
        """Send `weight` basis points of new users to a ready version, beside the active one;
        the same users to each `carried` dependent's instance bound to it (one step, no await)."""
        mount = package.mount
        active = package.active
        if mount is None or active is None or version.state is not VersionState.READY or version.app is None:
            raise IllegalTransition(
                "a canary needs an active version beside it, and itself ready",
                package=version.name,
                version=version.version,
                step="canary",
            )
        if version not in package._loaded:
            package._loaded.append(version)
        for side in (active, version):
            if side.figures is None:  # the analysis compares them, metrics or not
                side.figures = RequestFigures()
        mount.split = Split(version, weight, key, operation, self.pin_secret)
        self._carried[package.name] = []
        self.add_followers(package, carried)

    def add_followers(self, package: Package, moves: Sequence[Move]) -> None:
        """Dependents follow the package's running canary: each move's `new`, a ready instance
        bound to the canary, gets the same users on the dependent's mount."""
        mount = package.mount
        leader = mount.split if mount is not None else None
        active = package.active
        if leader is None or leader.leader is not None or active is None:
            raise IllegalTransition(
                "only a running canary has followers", package=package.name, step="canary"
            )
        for move in moves:
            if move.package.mount is None or move.new.state is not VersionState.READY:
                raise IllegalTransition(
                    "a dependent follows a canary with a ready instance beside its active one",
                    package=move.package.name,
                    version=move.new.version,
                    step="canary",
                )
        for move in moves:
            if move.new not in move.package._loaded:
                move.package._loaded.append(move.new)
            follows = move.package.mount
            assert follows is not None  # checked above
            follows.split = Split(
                move.new,
                leader.weight,
                leader.key,
                leader.operation,
                self.pin_secret,
                leader=(leader, active),
            )
            self._carried[package.name].append((move.package, move.old))

    def carried(self, package: Package) -> list[Move]:
        """The dependents following the package's canary: (their active when they began to
        follow, the instance bound to the canary)."""
        return [Move(dependent, old, split.canary) for dependent, old, split in self._followers(package)]

    def _followers(self, package: Package) -> list[tuple[Package, PackageVersion | None, Split]]:
        found = []
        for dependent, old in self._carried.get(package.name, ()):
            mount = dependent.mount
            split = mount.split if mount is not None else None
            if split is not None and split.leader is not None:
                found.append((dependent, old, split))
        return found

    def leader_of(self, package: Package) -> str | None:
        """The package whose running canary this one follows, if any."""
        leader = self._leading(package)
        return leader.canary.name if leader is not None else None

    def canary_to_follow(self, package: Package) -> Package | None:
        """A package it imports from whose canary it should follow but does not (it was restored,
        or deployed, after the canary began here)."""
        active = package.active
        mount = package.mount
        if active is None or mount is None or mount.split is not None:
            return None
        if not active.manifest.reload_with_requirements:
            return None
        for name in sorted(active.manifest.requires):
            required = self._packages.get(name)
            split = required.mount.split if required is not None and required.mount is not None else None
            if required is not None and split is not None and split.leader is None:
                return required
        return None

    def follows_a_canary(self, package: Package) -> bool:
        """Its split follows a canary that still runs (on the mount of what it requires)."""
        return self._leading(package) is not None

    def _leading(self, package: Package) -> Split | None:
        """The split of the running canary that the package's split follows, if any."""
        mount = package.mount
        split = mount.split if mount is not None else None
        if split is None or split.leader is None:
            return None
        leader = self._packages.get(split.leader.canary.name)
        live = leader is not None and leader.mount is not None and leader.mount.split is split.leader
        return split.leader if live else None

    def set_canary_weight(self, package: Package, weight: int) -> None:
        mount = package.mount
        if mount is not None and mount.split is not None:
            mount.split.weight = weight
        for _, _, split in self._followers(package):
            split.weight = weight

    def end_canary(self, package: Package, record: Deployment | None) -> PackageVersion | None:
        """No more requests to the canary: it drains, then stops and is unloaded (the active
        version was never touched). `record` is finished once it is gone."""
        mount = package.mount
        split = mount.split if mount is not None else None
        if split is None:
            return None
        assert mount is not None
        for dependent, _, follows in self._followers(package):  # their instances bound to it first
            assert dependent.mount is not None
            dependent.mount.split = None
            if follows.canary.state is VersionState.READY:
                follows.canary.transition(VersionState.DRAINING)
                self.retire(dependent, follows.canary, None)
        self._carried.pop(package.name, None)
        mount.split = None  # from here on, new requests go to the active version only
        canary = split.canary
        if canary.state is VersionState.READY:
            canary.transition(VersionState.DRAINING)
            self.retire(package, canary, record)
        elif record is not None and record.finished_at is None:
            record.finish()
        return canary

    async def switch_blocking(
        self,
        package: Package,
        new: PackageVersion,
        old: PackageVersion | None,
        moves: Sequence[Move] = (),
        *,
        force: bool = False,
    ) -> None:
        """Integration Server's behaviour: hold new requests until the old version is idle, and
        the same for the dependents that move with it (as its reload of dependent packages).

        With `force` (a worker following a confirmed change), switch even if it is not."""
        pairs = [(p, v) for p, v in [(package, old), *((m.package, m.old) for m in moves)] if v is not None]
        mounts = [p.mount for p, _ in pairs if p.mount is not None]
        gate = anyio.Event()
        for mount in mounts:
            mount.gate = gate
        try:
            timeout = new.manifest.drain_timeout
            with anyio.move_on_after(timeout):
                for _, version in pairs:
                    await version.wait_idle(timeout)
            busy = [v for _, v in pairs if v.in_flight]
            if busy and not force:
                running = ", ".join(
                    f"{v.in_flight} request(s) still running on {v.version if v is old else f'{v.name} {v.version}'}"
                    for v in busy
                )
                stays = old.version if old is not None else "what was active"
                raise HotDeployError(
                    f"block: {running} after {timeout:g}s; {stays} stays active and held requests go to it",
                    package=new.name,
                    version=new.version,
                    step="switch",
                )
            self.switch(package, new, old, moves)
        finally:
            for mount in mounts:
                mount.gate = None
            gate.set()

    def hold(self, version: PackageVersion) -> bool:
        """Take a draining version back from its retirement, for a warm switch back.

        True: it stays loaded until `switch()` makes it active or `release()` gives it back.
        False: its retirement already decided to stop it (or it is not draining): load it cold."""
        retirement = self._retirements.get(version)
        if retirement is None or version.state is not VersionState.DRAINING:
            return False
        del self._retirements[version]
        self._held.add(version)
        retirement.withdraw("taken back by a switch back before it drained")
        return True

    def release(self, package: Package, version: PackageVersion) -> None:
        """A held version that was not switched to after all goes back to retirement."""
        if version in self._held:
            self._held.discard(version)
            if version.state is VersionState.DRAINING:
                self.retire(package, version, None)

    # -- retiring ---------------------------------------------------------------------------

    def retire(
        self, package: Package, old: PackageVersion, record: Deployment | None, delay: float = 0.0
    ) -> None:
        """Drain `old`, then stop and unload it, in the background; `record` is finished then."""
        if old in self._retirements or not old.state.loaded:
            # Retired already (or on its way): a second retirement would stop it twice.
            logger.warning("%s %s: already retired (%s)", old.name, old.version, old.state.value)
            if record is not None:
                record.finish()
            return
        self._held.discard(old)
        retirement = Retirement(package, old, record)
        self._retirements[old] = retirement
        self.runtime().start_soon(
            self._retire, retirement, delay, name=f"hotdeploy retire {old.name} {old.version}"
        )

    async def _retire(self, retirement: Retirement, delay: float) -> None:
        package, old, record = retirement.package, retirement.version, retirement.record
        idle = False
        drain_started = time.perf_counter()
        with retirement.scope:
            if retirement.withdrawn:
                # Held for a switch back before this task first ran (its record is finished):
                # a withdrawn scope ends only at an await, and none came yet.
                return
            if delay > 0:
                await anyio.sleep(delay)  # a following worker keeps it warm for the bake
            if record is not None:
                retirement.drain = record.begin_step(f"drain {old.version}")
            drain_started = time.perf_counter()
            idle = await old.wait_idle(old.manifest.drain_timeout)
            # Dependents bound to it may still run its code in their requests: they go first.
            await old.wait_unbound()
        # The decision, in one synchronous step (no await since the check): a hold() that came
        # first wins; past this line nobody can switch back to it.
        if retirement.withdrawn:
            return
        self._retirements.pop(old, None)
        old.transition(VersionState.STOPPING)
        terminated = 0
        if not idle:
            terminated = await old.terminate()
            logger.warning(
                "%s %s: drain timeout (%gs): %d request(s), stream(s) or websocket(s) still open were ended",
                old.name,
                old.version,
                old.manifest.drain_timeout,
                terminated,
                extra={"package": old.name, "version": old.version, "terminated": terminated},
            )
        self._drained(old, time.perf_counter() - drain_started, terminated)
        if record is not None and retirement.drain is not None:
            detail = f"{terminated} still open at the drain timeout were ended" if terminated else None
            record.end_step(retirement.drain, detail=detail)
        try:
            with maybe_step(record, f"shutdown {old.version}"):
                await self._stop_and_unload(package, old, VersionState.RETIRED)
        except Exception:
            logger.exception("%s %s: shutdown failed", old.name, old.version)
        finally:
            if record is not None:
                record.finish()
        await notify("hotdeploy_drained", self.managers(None), {"version": old, "terminated": terminated})

    async def remove(self, package: Package, record: Deployment | None) -> None:
        """Unmount a package, drain and stop every version of it, and forget it."""
        with maybe_step(record, "unmount"):
            self.switch(package, None, package.active)
        for version in list(package._loaded):
            self._withdraw(version, "ended by the removal of the package")
            with maybe_step(record, f"drain {version.version}") as step:
                ended = await self._drain(version)
                if step is not None and ended:
                    step.detail = f"{ended} still open at the drain timeout were ended"
            with maybe_step(record, f"shutdown {version.version}"):
                await self._stop_and_unload(package, version, VersionState.RETIRED)
        self.forget(package)

    async def discard(self, package: Package, version: PackageVersion) -> None:
        """Throw away a version that failed before or right after the switch (never active)."""
        self._withdraw(version, "discarded")
        if version.state is VersionState.DRAINING:
            await self._drain(version)
        await self._stop_and_unload(package, version, VersionState.FAILED)

    async def _drain(self, version: PackageVersion) -> int:
        """Wait for the version's in-flight work; at its drain timeout end what is left (the count)."""
        started = time.perf_counter()
        terminated = 0
        if not await version.wait_idle(version.manifest.drain_timeout):
            terminated = await version.terminate()
        self._drained(version, time.perf_counter() - started, terminated)
        return terminated

    def _drained(self, version: PackageVersion, seconds: float, terminated: int) -> None:
        if self.figures is not None:
            self.figures.drained(version.name, seconds, terminated)

    def _withdraw(self, version: PackageVersion, why: str) -> None:
        """Stop a retirement under way (the caller stops the version itself)."""
        self._held.discard(version)
        retirement = self._retirements.pop(version, None)
        if retirement is not None:
            retirement.withdraw(why)

    async def _stop_and_unload(self, package: Package, version: PackageVersion, final: VersionState) -> None:
        if version.state is VersionState.ACTIVE:
            raise IllegalTransition(
                "an active version is switched away from before it stops",
                package=version.name,
                version=version.version,
                step="shutdown",
            )
        if version.can_become(VersionState.STOPPING):
            version.transition(VersionState.STOPPING)
        try:
            if version.started:
                try:
                    await version.stop(self.shutdown_timeout)
                except (LifespanFailed, LifespanTimeout) as exc:
                    logger.warning("%s %s: %s", version.name, version.version, exc.message)
            else:
                version.abort_startup()
        finally:
            if self.figures is not None:
                self.figures.unloaded(version)
            namespace = version.namespace
            definitions = weak_refs(*namespace.definitions()) if namespace is not None else []
            refs = version.unload() + definitions
            if namespace is not None:
                # Libraries' caches keyed on its endpoints and models would keep it alive.
                release(
                    Unloaded(namespace.package, namespace.version, namespace.name, namespace.root),
                    unload_cleaners(self.plugins),
                )
            if version.can_become(final):
                version.transition(final)
            if version in package._loaded:
                package._loaded.remove(version)
            # Versions already collected are forgotten: only those still alive are worth a look.
            # Looked at once the list has doubled since the last look, not on every unload: a
            # server stopping 1000 packages collects nothing in between (that was quadratic).
            if len(self._unloaded) >= self._forget_at:
                alive = [(label, r) for label, r in self._unloaded if not collected(r, collect=False)]
                self._unloaded = deque(alive, maxlen=self._unloaded.maxlen)
                self._forget_at = max(_FORGET_FIRST, 2 * len(alive))
            self._unloaded.append((f"{version.name} {version.version}", refs))
            self._schedule_collection()

    @contextmanager
    def operation(self) -> Iterator[None]:
        """An operation that swaps versions runs inside: a full collection (which blocks the
        event loop for as long as it scans the heap) waits until none runs, and starts as soon
        as the last one ends. Back-to-back deployments then pay for it between two of them,
        not inside one (an upload's unpack, a commit, a converge). Meanwhile the GIL switch
        interval is short, and the loop waits for the thread hops in turns, so that they are
        not starved by a busy event loop (see _switch_interval, _thread_hop)."""
        self._operation_began()
        try:
            yield
        finally:
            self._operation_ended()

    @contextmanager
    def resting(self) -> Iterator[None]:
        """Inside `operation`, a wait that only sleeps (a bake time): the collector may run,
        and the switch interval is back to what it was."""
        self._operation_ended()
        try:
            yield
        finally:
            self._operation_began()

    async def until_quiet(self, patience: float) -> None:
        """Until no operation runs here, or `patience` seconds passed. Background chores (the
        periodic look, heartbeats, the records' and metrics' writers) wait here before their
        thread hops: under load every hop waits for the GIL behind the busy event loop, and
        one beside an operation's makes that operation's hops wait longer."""
        with anyio.move_on_after(patience):
            while self._operations:
                if self._quiet is None:
                    self._quiet = anyio.Event()
                await self._quiet.wait()

    def _operation_began(self) -> None:
        self._operations += 1
        switch_interval.enter()
        _thread_hop.operation_began()

    def _operation_ended(self) -> None:
        _thread_hop.operation_ended()
        switch_interval.leave()
        self._operations -= 1
        if not self._operations:
            self.collector.poke()
            quiet, self._quiet = self._quiet, None
            if quiet is not None:
                quiet.set()

    def _preparing(self) -> bool:
        """Whether a version is being loaded, started or checked, up to its switch: the part of
        a deployment that a full collection (which blocks the event loop) must not stretch."""
        if any(name not in self._packages for name in self._busy):
            return True  # a new package's first version: not adopted yet
        return any(
            v.state in _PREPARING and v is not self.canary(p)
            for p in self._packages.values()
            for v in p._loaded
        )

    def _schedule_collection(self) -> None:
        """Free the unloaded version with one collection when no version is being prepared (see
        Collector), rather than leave the garbage to an automatic full collection, which would
        come later, scan a larger heap, and may fall in the middle of the next deployment."""
        task_group = self._task_group
        if task_group is None:
            return  # the server is stopping: the process's exit frees it
        if self._collecting_in is not task_group:
            try:
                task_group.start_soon(self.collector.run, name="hotdeploy collector")
            except RuntimeError:  # the runtime's task group is closing: nothing to schedule
                return
            self._collecting_in = task_group
        self.collector.unloaded()

    async def shutdown(self) -> None:
        """Stop every loaded version (the server is stopping), dependents before what they
        import. Idempotent."""
        for package in reversed(requirements_first(list(self._packages.values()))):
            if package.mount is not None:
                self.switch(package, None, package.active)
            for version in list(package._loaded):
                self._withdraw(version, "ended by the server's shutdown")
                await self._stop_and_unload(package, version, VersionState.RETIRED)

    def clean_staging(self) -> None:
        """Remove what an unpack interrupted by a crash left behind (not a live worker's)."""
        clean_staging(self.home / "packages")


def describe_binding(bound: dict[str, PackageVersion]) -> str:
    """'bound to inventory 2.0, billing 1.1' (for a step's detail)."""
    if not bound:
        return "bound to no other package"
    return "bound to " + ", ".join(f"{name} {v.version}" for name, v in sorted(bound.items()))


def requirements_first(packages: list[Package]) -> list[Package]:
    """`packages`, each after the ones its loaded versions require."""
    return dependency_order(
        packages, lambda p: p.name, lambda p: [r for v in p.loaded for r in sorted(v.manifest.requires)]
    )


def _import_version(version: PackageVersion, stage: list[str]) -> tuple[ASGIApp, pluggy.PluginManager | None]:
    """Blocking, in a worker thread: the version's app and its own plugin manager (manifest
    `hooks`), audited (see _loader.audited). Raises LoadError only."""
    namespace = version.namespace
    assert namespace is not None
    manifest = version.manifest

    def load() -> tuple[ASGIApp, pluggy.PluginManager | None]:
        app = version.load()
        if not manifest.hooks:
            return app, None
        stage[0] = f"importing the hooks module {manifest.hooks!r}"
        try:
            module = namespace.import_module(manifest.hooks)
            return app, make_plugin_manager([module], entry_points=False)
        except BaseException as exc:  # a worker thread: nothing here is ours to let through
            raise LoadError(
                f"cannot load the package's hooks module {manifest.hooks!r}: "
                f"{what_raised(exc, namespace.root)}",
                package=manifest.name,
                version=manifest.version,
                step="load",
            ) from exc

    return audited(namespace, load)


@contextmanager
def maybe_step(record: Deployment | None, name: str) -> Iterator[Step | None]:
    """A timed step of `record`, if there is a record (a follower's work has none)."""
    if record is None:
        yield None
    else:
        with record.step(name) as step:
            yield step
