"""Coordinator: this worker's side of an operation it accepted (deploy, rollback, activate,
remove), carried out on every live worker of the cluster.

    claim ─▶ begin (store: operation PREPARE) ─▶ prepare here ─▶ votes PREPARED everywhere
          ─▶ switch here ─▶ commit (store: desired state + COMMIT, one transaction)
          ─▶ votes SWITCHED everywhere ─▶ DONE ─▶ bake (post-activation checks)
          ─▶ decided ─▶ the previous version retires ─▶ finished

Any failure before the commit aborts the operation: the new version is discarded and nothing
switched anywhere. A failed post-activation check switches back everywhere (a second operation).
The engine owns the state; this module only calls its named methods.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import anyio

from ._archive import Source, Unpacked, read_source, unpack
from ._canary import CanaryRun, CanaryState, with_command
from ._canary_plan import DEFAULT_STEPS, CanaryPlan, parse_steps
from ._cluster import Cluster
from ._deployment import Action, Deployment, Outcome
from ._engine import Engine, Move, describe_binding
from ._errors import (
    ArchiveError,
    CanaryRefused,
    CheckFailed,
    DeploymentError,
    DeploymentInProgress,
    HotDeployError,
    IllegalTransition,
    MountConflict,
    NoPreviousVersion,
    PackageInUse,
    StoreError,
    UnknownVersion,
    UnmetRequirement,
    VersionConflict,
)
from ._follower import Follower
from ._hooks import implemented, notify, run_checks
from ._host_routes import HostRoute, host_routes, shadowed
from ._manifest import Manifest
from ._mounts import Mount, MountTable
from ._operation import CANARY_SUFFIX, Member, Operation, OperationKind, Phase, Vote
from ._package import Package
from ._records import RecordLog
from ._requirements import check_change, in_dependency_order
from ._store import Store, StoredArchive
from ._thread_hop import thread_hop
from ._version import PackageVersion, VersionState

logger = logging.getLogger("starlette_hotdeploy")


@dataclass(frozen=True, slots=True)
class DeployOptions:
    """What the caller of a deploy says about the archive."""

    signature: bytes | None = None  # the archive's SSH signature (checked against trusted keys)
    force: bool = False  # replace a different archive deployed under the same version number
    shadow_host_routes: bool = False  # the mount may cover routes of the host app
    # A canary deploy: True (the manifest's plan, or the default one), False (a plain switch,
    # even if the manifest's strategy is `canary`), None (as the manifest says).
    canary: bool | None = None
    canary_steps: str | None = None  # steps such as "5%:30s, 100%" (implies canary)


@dataclass
class _Arrival:
    """What `Coordinator._unpack`'s thread hop got as far as (what to clean up if it failed)."""

    data: bytes = b""
    signer: str | None = None
    unpacked: Unpacked | None = None
    forced: bool = False  # a different archive under its version number, replaced on purpose


class Coordinator:
    def __init__(
        self,
        *,
        engine: Engine,
        cluster: Cluster,
        store: Store,
        follower: Follower,
        records: RecordLog,
        bake_time: float,
        keep_versions: int,
    ) -> None:
        self.engine = engine
        self.cluster = cluster
        self.store = store
        self.follower = follower
        self.records = records
        self.bake_time = bake_time
        self.keep_versions = keep_versions
        self.canaries: dict[str, CanaryRun] = {}  # the canaries this worker runs, by package

    # -- the operations ---------------------------------------------------------------------

    async def deploy(
        self,
        source: Source,
        record: Deployment,
        options: DeployOptions | None = None,
        *,
        saved: bool = True,
    ) -> Deployment:
        """Deploy `source`. Unless `saved`, the record's first write is the first thing the
        unpack step's thread hop does (a crash from then on leaves it `interrupted`)."""
        engine = self.engine
        options = options or DeployOptions()
        unpacked = await self._unpack(source, record, options, save_record=not saved)
        manifest = unpacked.manifest
        record.package, record.to_version, record.sha256 = manifest.name, manifest.version, unpacked.sha256
        try:
            await self._after_concluded_canary(manifest.name)
            with self._claim(manifest.name, record):
                package = engine.get(manifest.name)
                if package is None:
                    package = await thread_hop(engine.new_package, manifest.name, manifest.mount)
                current = package.active
                if current is not None and manifest.parsed_version < current.manifest.parsed_version:
                    record.downgrade = True
                try:
                    plan = canary_plan(manifest, options, current)
                except HotDeployError as exc:
                    await self._fail(record, exc)
                if plan is not None:
                    return await self._install_canary(record, package, unpacked, plan)
                return await self._install(record, package, unpacked)
        except (DeploymentError, DeploymentInProgress):
            if record.outcome is Outcome.FAILED:
                await self.records.save(record)  # a refused claim concluded it
                await self._forget_upload(manifest.name, manifest.version, unpacked.sha256)
            raise

    async def deploy_set(
        self,
        sources: Sequence[Source],
        record: Deployment,
        options: DeployOptions | None = None,
        signatures: Sequence[bytes | None] = (),
    ) -> Deployment:
        """Deploy several packages as one operation: all prepared and checked (each bound to the
        set's new versions of what it requires), then all switched at once, or none."""
        options = options or DeployOptions()
        if options.canary or options.canary_steps:
            await self._fail(
                record, CanaryRefused("a set of packages is deployed without a canary", step="canary")
            )
        uploads: list[Unpacked] = []
        try:
            for index, source in enumerate(sources):
                signature = signatures[index] if index < len(signatures) else None
                uploads.append(await self._unpack(source, record, options, signature))
            names = [u.manifest.name for u in uploads]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                await self._fail(
                    record,
                    HotDeployError(
                        f"a set deploys each package once; {', '.join(twice)} came more than once",
                        package=twice[0],
                        step="unpack",
                    ),
                )
            scratch = MountTable()  # the set's mounts against each other (prepare checks the rest)
            for upload in uploads:
                try:
                    scratch.add(Mount.reservation(upload.manifest.mount, upload.manifest.name))
                except MountConflict as error:
                    error.version = upload.manifest.version
                    await self._fail(record, error)
            order = {m.name: i for i, m in enumerate(in_dependency_order(u.manifest for u in uploads))}
            uploads.sort(key=lambda u: order[u.manifest.name])
            record.bundle = [f"{u.manifest.name} {u.manifest.version}" for u in uploads]
            changed = [u for u in uploads if not self._is_active(u)]
            first = (changed or uploads)[0]
            record.package, record.to_version, record.sha256 = (
                first.manifest.name,
                first.manifest.version,
                first.sha256,
            )
            await self._after_concluded_canary(*(u.manifest.name for u in changed or uploads[:1]))
            with ExitStack() as claims:
                packages: list[Package] = []
                for upload in changed or uploads[:1]:
                    claims.enter_context(self._claim(upload.manifest.name, record))
                    package = self.engine.get(upload.manifest.name)
                    if package is None:
                        package = await thread_hop(
                            self.engine.new_package, upload.manifest.name, upload.manifest.mount
                        )
                    packages.append(package)
                members = list(zip(packages[1:], (changed or uploads)[1:], strict=True))
                return await self._install(record, packages[0], first, members=members)
        except (DeploymentError, DeploymentInProgress):
            if record.outcome is Outcome.FAILED:
                await self.records.save(record)  # a refused claim concluded it
                for upload in uploads:
                    await self._forget_upload(upload.manifest.name, upload.manifest.version, upload.sha256)
            raise

    def _is_active(self, unpacked: Unpacked) -> bool:
        package = self.engine.get(unpacked.manifest.name)
        active = package.active if package is not None else None
        return active is not None and active.sha256 == unpacked.sha256

    async def _unpack(
        self,
        source: Source,
        record: Deployment,
        options: DeployOptions,
        signature: bytes | None = None,
        *,
        save_record: bool = False,
    ) -> Unpacked:
        """The `unpack` step: read, verify, unpack and check an archive, and save it in the store;
        a failure fails `record`. With `save_record`, the record's first write comes first."""
        engine = self.engine
        arrival = _Arrival()
        unpacked: Unpacked | None = None

        def arrive(
            accept: Callable[[], None] | None,
            loaded: set[tuple[str, str, str]],
            routes: list[HostRoute] | None,
        ) -> None:
            # One thread hop for all of it: under load, each hop waits for a busy event loop.
            if accept is not None:
                accept()  # a StoreError fails the deployment as it is (its record says why)
            arrival.data = read_source(source, engine.limits)
            if engine.trusted_keys is not None:
                # Before anything of the archive is read: an untrusted one is never unpacked.
                verified = engine.trusted_keys.verify(arrival.data, signature or options.signature)
                arrival.signer = verified.describe()
            arrival.unpacked = unpack(arrival.data, engine.home / "packages", engine.limits)
            manifest, sha256 = arrival.unpacked.manifest, arrival.unpacked.sha256
            stored = self.store.archives(manifest.name)
            arrival.forced = _check_replacement(manifest, sha256, options, stored, loaded)
            _check_host_routes(manifest, options, routes)
            self.store.save_archive(manifest.name, manifest.version, sha256, arrival.data)

        try:
            with record.step("unpack") as step:
                # What the checks need of this process's state, read on the event loop: the
                # thread hop reads only these copies.
                loaded = {(p.name, v.version, v.sha256) for p in engine.packages() for v in p.loaded}
                # Taken now, with the step begun: the background writer has nothing left to
                # write (its hop would wait for this one's connection, or hold it up).
                accept = self.records.writer(record) if save_record else None
                try:
                    await thread_hop(arrive, accept, loaded, self._host_routes(options))
                finally:
                    unpacked, record.signer = arrival.unpacked, arrival.signer
                    if unpacked is not None:
                        record.package = unpacked.manifest.name
                        record.to_version = unpacked.manifest.version
                    record.forced = record.forced or arrival.forced
                assert unpacked is not None
                manifest = unpacked.manifest
                step.detail = f"{manifest.name} {manifest.version} sha256:{unpacked.sha256[:12]}"
                if record.signer is not None:
                    step.detail += f", signed by {record.signer}"
        except Exception as exc:
            error = exc if isinstance(exc, HotDeployError) else ArchiveError(f"{type(exc).__name__}: {exc}")
            if unpacked is not None:
                # Refused before this upload was saved: an identical archive in the store is
                # someone else's (another worker may be about to deploy it); only the copy goes.
                await self._forget_upload(
                    unpacked.manifest.name, unpacked.manifest.version, unpacked.sha256, saved=False
                )
            await self._fail(record, error)
        assert unpacked is not None
        return unpacked

    def _host_routes(self, options: DeployOptions) -> list[HostRoute] | None:
        """The host app's routes a package must not shadow (None: nothing to check)."""
        host = self.engine.host_app
        if host is None or options.shadow_host_routes:
            return None
        return host_routes(host)

    async def _forget_upload(self, name: str, version: str, sha256: str, *, saved: bool = True) -> None:
        """A deployment that failed before its commit leaves neither archive nor unpacked copy
        behind (unless that archive was active once: then it stays available)."""
        if saved:
            await thread_hop(self.store.discard_archive, name, version, sha256)
        if await thread_hop(self.store.archive, name, version, sha256) is not None:
            return  # it was active once: it stays available
        package = self.engine.get(name)
        if package is not None and any(v.sha256 == sha256 for v in package.loaded):
            return
        directory = self.engine.home / "packages" / name / f"{version}-{sha256[:12]}"
        await thread_hop(_remove_tree, directory)

    async def rollback(self, name: str) -> Deployment:
        package = self.engine.package(name)
        target = package.previous
        if target is None:
            raise NoPreviousVersion(f"{name} has no previous version to roll back to", package=name)
        return await self._activate(
            package, target, self.records.new(Action.ROLLBACK, name, to_version=target)
        )

    async def activate(self, name: str, version: str) -> Deployment:
        package = self.engine.package(name)
        await self._refresh_available(package)
        if package.loaded_version(version) is None and version not in package.available:
            known = ", ".join(package.available) or "none"
            raise UnknownVersion(
                f"{name} has no version {version!r} available (available: {known})",
                package=name,
                version=version,
            )
        return await self._activate(
            package, version, self.records.new(Action.ACTIVATE, name, to_version=version)
        )

    async def undeploy(self, name: str) -> Deployment:
        package = self.engine.package(name)
        dependants = sorted(
            other.name
            for other in self.engine.packages()
            if other.active is not None and name in other.active.manifest.requires
        )
        if dependants:
            raise PackageInUse(
                f"cannot remove {name}: required by {', '.join(dependants)}", package=name, step="undeploy"
            )
        await self._after_concluded_canary(name)
        active = package.active
        record = self.records.new(Action.UNDEPLOY, name, from_version=active.version if active else None)
        with self._claim(name, record), anyio.CancelScope(shield=True):
            operation = self.cluster.new_operation(record.id, name, OperationKind.REMOVE)
            await self._begin(operation, record)
            try:
                await self.engine.remove(package, record)
            except Exception as exc:
                await self.cluster.end(operation.id, Phase.ABORT)
                await self._fail(record, _as_error_for(exc, name))
            await self._commit(operation, record)
            record.conclude(Outcome.SUCCEEDED)
            await self.records.save(record)
        return record

    # -- the pipeline -----------------------------------------------------------------------

    async def _after_concluded_canary(self, *names: str) -> None:
        """A canary of one of `names` whose end is decided (promoted or aborted: its run still
        saves, retires, prunes and lets go of the package): wait for that run to finish. A
        client that deploys as soon as it sees the canary's record decided is not refused."""
        for name in names:
            run = self.canaries.get(name)
            if run is not None and run.record.decided:
                await run.finished()

    @contextmanager
    def _claim(self, name: str, record: Deployment) -> Iterator[None]:
        """The engine's claim on the package; a refusal finishes `record` (and is raised)."""
        with ExitStack() as stack:
            try:
                run = self.canaries.get(name)
                if run is not None:
                    raise DeploymentInProgress(
                        f"a canary of {name} {run.canary.version} is running (deployment "
                        f"{run.record.id}): promote or abort it first",
                        package=name,
                        step="claim",
                    )
                package = self.engine.get(name)
                leader = self.engine.leader_of(package) if package is not None else None
                leading = self.canaries.get(leader) if leader is not None else None
                # (Every worker that splits its requests knows; its promotion may move it.)
                if leader is not None and (leading is None or leading.ending is None):
                    raise DeploymentInProgress(
                        f"{name} follows the canary of {leader} (it imports it): promote or abort "
                        "that canary first",
                        package=name,
                        step="claim",
                    )
                stack.enter_context(self.engine.claim(name))
            except DeploymentInProgress as error:
                error.deployment = record
                record.conclude(Outcome.FAILED, error)
                raise
            yield

    async def _activate(self, package: Package, target: str, record: Deployment) -> Deployment:
        current = package.active
        record.from_version = current.version if current is not None else None
        await self._after_concluded_canary(package.name)
        with self.engine.operation(), self._claim(package.name, record):
            warm = package.loaded_version(target)
            if warm is not None and warm is current:
                record.conclude(Outcome.SUCCEEDED)
                await self.records.save(record)
                return record
            if warm is not None and self.engine.hold(warm):
                # Still loaded and started (draining before its shutdown), and now held: its
                # retirement can no longer unload it. Switching back is one assignment; the other
                # workers prepare it (warm or from the archive) first.
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
            try:
                unpacked = await self.engine.unpack_stored(package.name, target, sha256)
            except HotDeployError as exc:
                await self._fail(record, exc)
            return await self._install(record, package, unpacked)

    async def _refresh_available(self, package: Package) -> None:
        """Another worker may have stored versions this one has not seen."""
        stored = await thread_hop(self.store.archives, package.name)
        self.engine.note_available(package, [(a.version, a.sha256) for a in stored])

    async def _check_requirements(self, record: Deployment, *manifests: Manifest) -> None:
        """Refused (409) if activating `manifest` would leave a requirement unmet, or form a cycle."""
        active = [p.active.manifest for p in self.engine.packages() if p.active is not None]
        try:
            check_change(active, *manifests)
        except UnmetRequirement as error:
            await self._fail(record, error)

    async def _begin(self, operation: Operation, record: Deployment) -> None:
        """Register a cluster-wide operation, and save the record in the same thread hop;
        refused while another worker runs one on the package."""
        other = await self.cluster.begin_operation(operation, then=self.records.writer(record))
        if other is not None:
            on = sorted(other.packages & operation.packages)
            error = DeploymentInProgress(
                f"another operation on {', '.join(on)} is in progress on worker {other.coordinator}; "
                "retry when it has finished",
                package=operation.package,
                step="claim",
            )
            error.deployment = record
            record.conclude(Outcome.FAILED, error)
            await self.records.save(record)
            raise error

    async def _commit(self, operation: Operation, record: Deployment) -> None:
        """Confirm the change in the store (the desired state), wait for every live worker to
        serve it, and end the operation."""
        with record.step("commit"):
            await self.cluster.commit(operation)
        await self._converge(operation, record)

    async def _converge(self, operation: Operation, record: Deployment, *, done: bool = True) -> None:
        """After the commit: this worker's vote, then every live worker's switch. Without
        `done`, the operation stays open (no other worker may start one on the package) until
        the caller ends it: through the bake."""
        await self._vote(operation, Vote.SWITCHED)
        with record.step("converge") as step:
            result = await self.cluster.await_votes(operation, Vote.SWITCHED, _reporter(record))
            step.detail = f"{len(result.live)} worker(s) serve it"
            if not result.ok:
                # Committed: they converge when they can; the answer says who lags.
                step.detail += f"; {result.describe()}"
                step.ok = False
        if done:
            await self._done(operation)

    async def _prepare_workers(
        self, operation: Operation, record: Deployment, version: PackageVersion
    ) -> None:
        """This worker's PREPARED vote (written with the commit), then every live worker's
        (CheckFailed names who failed)."""
        self.cluster.vote_with_commit(operation.id, Vote.PREPARED)
        with record.step("prepare workers") as step:
            result = await self.cluster.await_votes(operation, Vote.PREPARED, _reporter(record))
            if not result.ok:
                raise CheckFailed(
                    f"not every worker could prepare it: {result.describe()}",
                    check="workers",
                    package=version.name,
                    version=version.version,
                    step="prepare workers",
                )
            step.detail = f"{len(result.live)} worker(s) prepared"

    async def _vote(self, operation: Operation, vote: Vote) -> None:
        """This worker's own vote. A store that fails it (a database restarting, this process
        frozen past the database's patience) is ridden out: the follower casts it again on its
        next look, and the votes are awaited until the cluster timeout."""
        with contextlib.suppress(StoreError):
            await self.follower.vote(operation, vote)

    async def _done(self, operation: Operation) -> None:
        # Committed already: a store that fails this write does not undo the deployment.
        await self.cluster.end(operation.id, Phase.DONE, serving=self.engine.serving())

    async def _install(
        self,
        record: Deployment,
        package: Package,
        unpacked: Unpacked | None,
        *,
        warm: PackageVersion | None = None,
        members: Sequence[tuple[Package, Unpacked]] = (),
    ) -> Deployment:
        """Prepare a version on every worker, switch to it everywhere, then bake it. `members`:
        the other packages of a set deployed together (each after those it requires), prepared
        after it and switched, committed and baked in the same steps."""
        engine = self.engine
        current = package.active
        record.from_version = current.version if current is not None else None
        if warm is not None:
            version = warm
        else:
            assert unpacked is not None
            if current is not None and current.sha256 == unpacked.sha256 and not members:
                with record.step("unchanged") as step:
                    step.detail = (
                        f"{package.name} {unpacked.manifest.version} with this sha256 is already active"
                    )
                record.conclude(Outcome.SUCCEEDED)
                await self.records.save(record)
                return record
            version = unpacked.new_version()
        record.sha256 = version.sha256
        manifest = version.manifest
        lineage = package.lineage_after(
            version.version, version.sha256, rollback=record.operation is Action.ROLLBACK
        )[-self.keep_versions :]  # older versions' archives are pruned: no rollback to them
        together = [(member, u.new_version(), member.lineage_pairs()) for member, u in members]
        operation = self.cluster.new_operation(
            record.id,
            package.name,
            OperationKind.ACTIVATE,
            version.version,
            version.sha256,
            lineage,
            members=tuple(
                Member(
                    m.name, v.version, v.sha256, m.lineage_after(v.version, v.sha256)[-self.keep_versions :]
                )
                for m, v, _ in together
            ),
        )
        moves: list[Move] = []
        carried: list[Move] = []  # a promotion's: its canary's to end, should it fail
        # A deployment runs to its outcome (every step is bounded); the claims of the dependents
        # that move with it are held as long.
        with anyio.CancelScope(shield=True), ExitStack() as claims:
            try:
                await self._check_requirements(record, manifest, *(v.manifest for _, v, _ in together))
                in_set = {package.name, *(m.name for m, _, _ in together)}
                dependents = [d for d in engine.dependents(*in_set) if d.name not in in_set]
                # What it imports from must not change under it (its new version is bound to
                # their active versions), nor what moves with it.
                required = {r for v in (version, *(v for _, v, _ in together)) for r in v.manifest.requires}
                for name in sorted(required - in_set):
                    if engine.get(name) is not None:
                        claims.enter_context(self._claim(name, record))
                for dependent in dependents:
                    claims.enter_context(self._claim(dependent.name, record))
                await self._begin(operation, record)
            except BaseException:
                if warm is not None:
                    engine.release(package, warm)
                raise
            try:
                if warm is None:
                    await engine.prepare(record, package, version)
                else:
                    with record.step("prepare") as step:
                        step.detail = "warm: the version was still loaded"
                moves = await self._prepare_members(record, version, together)
                # A canary's promotion: its dependents' instances bound to it are ready.
                carried = (
                    engine.carried(package) if warm is not None and warm is engine.canary(package) else []
                )
                moves += carried
                following = {move.package.name for move in carried}
                moves += await engine.prepare_dependents(
                    record,
                    [d for d in dependents if d.name not in following],
                    version,
                    *(m.new for m in moves),
                )
                await self._prepare_workers(operation, record, version)
                with record.step("switch") as step:
                    if warm is not None:
                        step.detail = "warm: one assignment"
                        engine.switch(package, version, current, moves)
                    elif any(
                        new.manifest.strategy == "block" and old is not None
                        for new, old in [
                            (version, current),
                            *((m.new, m.old) for m in moves[: len(together)]),
                        ]
                    ):
                        step.detail = "block: new requests held while the previous version finished"
                        await engine.switch_blocking(package, version, current, moves)
                    else:
                        engine.switch(package, version, current, moves)
                    if moves:
                        record.moved = [str(move) for move in moves[len(together) :]]
                        with_it = ", ".join(f"{move.new.name} {move.new.version}" for move in moves)
                        step.detail = f"{step.detail or 'one assignment'}; with {with_it}"
            except BaseException as exc:
                # Ended even if the store fails it (the store may be why this failed): what was
                # prepared here must go, and the error that failed it is the answer.
                await self.cluster.end(operation.id, Phase.ABORT)
                await engine.discard_moves([move for move in moves if move not in carried])
                if warm is None:
                    await engine.discard(package, version)
                elif version.state is not VersionState.ACTIVE:
                    engine.release(package, version)
                if not isinstance(exc, Exception):
                    raise
                await self._fail(record, _as_error(exc, version))
            set_moves = moves[: len(together)]  # the set's packages (then the dependents)
            first_install = engine.get(package.name) is None
            lineage_before = package.lineage_pairs()
            installed = [m for m, _, _ in together if engine.get(m.name) is None]
            engine.adopt(package)
            engine.confirm(package, version.version, version.sha256, lineage)
            for (member, member_version, _), entry in zip(together, operation.members, strict=True):
                engine.adopt(member)
                engine.confirm(member, member_version.version, member_version.sha256, entry.lineage)
            try:
                with record.step("commit"):
                    await self.cluster.commit(operation)
            except Exception as exc:
                # Not committed: the store refused (this coordinator was thought dead and its
                # operation abandoned) or failed. Nothing changed anywhere else, so nothing may
                # change here: back to what served before. (If a failed commit did land, the
                # generation moved and this worker's follower converges on it.)
                with record.step("switch back") as step:
                    step.detail = f"back to {current.version}" if current is not None else "unmounted"
                    engine.switch_back(package, current, version, moves)
                engine.set_lineage(package, lineage_before)
                for member, _, member_lineage in together:
                    engine.set_lineage(member, member_lineage)
                with contextlib.suppress(IllegalTransition):  # abandoned already, or committed after all
                    await self.cluster.end(operation.id, Phase.ABORT)
                await engine.discard_moves(moves)
                await self._let_go(package, version, warm)
                for member in installed:
                    engine.forget(member)
                if first_install:
                    engine.forget(package)
                await self._fail(record, _as_error(exc, version))
            await self._converge(operation, record, done=False)
            try:
                with record.step("bake") as step:
                    for checked, previous in [(version, current), *((m.new, m.old) for m in set_moves)]:
                        await run_checks(
                            "hotdeploy_check_after_activate",
                            engine.managers(checked),
                            {"version": checked, "previous": previous},
                            timeout=engine.check_timeout,
                            package=checked.name,
                            version=checked.version,
                            step="bake",
                        )
                    await self._vote(operation, Vote.CHECKED)
                    set_versions = (version, *(move.new for move in set_moves))
                    managers = [manager for v in set_versions for manager in engine.managers(v)]
                    if implemented("hotdeploy_check_after_activate", managers):
                        # They run on every worker: a failure anywhere switches every one back.
                        result = await self.cluster.await_votes(operation, Vote.CHECKED, _reporter(record))
                        if not result.ok:
                            raise CheckFailed(
                                f"the post-activation checks did not pass everywhere: {result.describe()}",
                                check="workers",
                                package=version.name,
                                version=version.version,
                                step="bake",
                            )
                    if self.bake_time > 0:
                        with engine.resting():
                            await anyio.sleep(self.bake_time)
                    step.detail = (
                        f"post-activation checks passed; previous version kept warm {self.bake_time:g}s"
                    )
            except Exception as exc:
                error = _as_error(exc, version)
                await self._done(operation)
                before = [lineage_before, *(lineage for _, _, lineage in together)]
                await self._switch_back(
                    record,
                    package,
                    version,
                    current,
                    operation,
                    first_install,
                    error,
                    moves,
                    installed,
                    warm,
                    before,
                )
                raise DeploymentError(record, error) from exc
            await self._done(operation)
            record.decide(Outcome.SUCCEEDED)
            await self.records.save(record)
            for new, old in [(version, current), *((m.new, m.old) for m in set_moves)]:
                engine.runtime().start_soon(self._announce, new, old, record)
            engine.retire_moves(moves)  # before the version they were bound to
            if current is not None and current is not version:
                engine.retire(package, current, record)  # finishes the record once it is gone
            else:
                record.finish()
            for pruned in (package, *(m for m, _, _ in together)):
                await self._prune(pruned)
        return record

    async def _prepare_members(
        self,
        record: Deployment,
        first: PackageVersion,
        together: Sequence[tuple[Package, PackageVersion, list[tuple[str, str]]]],
    ) -> list[Move]:
        """Prepare the other packages of a set (each bound to the set's new versions of what it
        requires); all or nothing: on failure those prepared are discarded."""
        engine = self.engine
        moves: list[Move] = []
        moving = {first.name: first}
        for package, version, _ in together:
            try:
                with record.step(f"prepare {package.name} {version.version}") as step:
                    step.detail = describe_binding(await engine.prepare_bound(package, version, moving))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await engine.discard_moves(moves)
                raise
            moves.append(Move(package, package.active, version))
            moving[package.name] = version
        return moves

    async def _install_canary(
        self, record: Deployment, package: Package, unpacked: Unpacked, plan: CanaryPlan
    ) -> Deployment:
        """Prepare the version on every worker, then give it its first step's share of the
        requests everywhere, beside the active version; a CanaryRun takes it from there."""
        engine = self.engine
        current = package.active
        assert current is not None  # canary_plan refuses a first install
        record.from_version = current.version
        if current.sha256 == unpacked.sha256:
            await self._fail(
                record,
                CanaryRefused(
                    f"{package.name} {current.version} with this sha256 is already active: nothing to compare",
                    package=package.name,
                    version=current.version,
                ),
            )
        version = unpacked.new_version()
        record.sha256 = version.sha256
        # Its dependents follow it: instances bound to the canary take the same users. They are
        # the operation's members, so no operation on them begins anywhere while it runs.
        dependents = engine.dependents(package.name)
        operation = self.cluster.new_operation(
            record.id + CANARY_SUFFIX,
            package.name,
            OperationKind.CANARY,
            version.version,
            version.sha256,
            package.lineage_pairs(),
            members=tuple(
                Member(d.name, d.active.version, d.active.sha256, d.lineage_pairs())
                for d in dependents
                if d.active is not None
            ),
        )
        first = plan.steps[0]
        state = CanaryState(
            operation=operation.id,
            coordinator=self.cluster.worker_id,
            deployment=record.id,
            version=version.version,
            sha256=version.sha256,
            plan=plan,
            weight=first.weight,
        )
        record.canary = {"plan": plan.describe(), "key": plan.key, "thresholds": plan.thresholds.to_dict()}
        # The dependents are claimed while the canary is prepared; once its run is registered,
        # `_claim` refuses them as followers of a running canary.
        with anyio.CancelScope(shield=True), ExitStack() as claims:
            await self._check_requirements(record, version.manifest)
            for dependent in dependents:
                claims.enter_context(self._claim(dependent.name, record))
            await self._begin(operation, record)
            carried: list[Move] = []
            try:
                await engine.prepare(record, package, version)
                carried = await engine.prepare_dependents(record, dependents, version)
                record.moved = [str(move) for move in carried]
                await self._prepare_workers(operation, record, version)
                with record.step("commit") as step:
                    await self.cluster.commit(operation, state.to_dict())
                    step.detail = f"canary {plan.describe()}, users kept by {plan.key}"
                engine.start_canary(package, version, first.weight, plan.key, operation.id, carried)
            except BaseException as exc:
                await self.cluster.end(operation.id, Phase.ABORT)
                if engine.canary(package) is version:
                    engine.end_canary(package, None)
                else:
                    await engine.discard_moves(carried)
                    await engine.discard(package, version)
                if not isinstance(exc, Exception):
                    raise
                await self._fail(record, _as_error(exc, version))
            await self._vote(operation, Vote.SWITCHED)
            with record.step("converge") as step:
                result = await self.cluster.await_votes(operation, Vote.SWITCHED, _reporter(record))
                step.detail = f"{len(result.live)} worker(s) split the requests"
                if not result.ok:
                    step.detail += f"; {result.describe()}"
                    step.ok = False
            record.canary["state"] = state.status()
            await self.records.save(record)
            run = CanaryRun(self, package, version, current, operation, record, state)
            self.canaries[package.name] = run
            engine.hand_over_claim(package.name)  # the run holds it until the canary ends
            engine.runtime().start_soon(run.run, name=f"hotdeploy canary {package.name} {version.version}")
        return record

    def canary_ended(self, run: CanaryRun) -> None:
        if self.canaries.get(run.package.name) is run:
            del self.canaries[run.package.name]

    async def canary_command(self, name: str, command: str) -> dict[str, Any]:
        """Promote (next step, or all the way) or abort the package's canary, wherever it runs:
        here at once, or through the store for the worker that runs it. The canary's state."""
        run = self.canaries.get(name)
        if run is not None and run.ending is not None:
            raise CanaryRefused(
                f"no canary of {name} is running: {run.canary.version} is {run.ending}",
                package=name,
                step="canary",
            )
        if run is not None:
            run.command(command, "the admin API")
            return {**run.state.status(), "requested": command}
        desired = (await thread_hop(self.store.desired)).get(name)
        if desired is None or desired.canary is None:
            self.engine.package(name)  # UnknownPackage first
            raise CanaryRefused(f"no canary of {name} is running", package=name, step="canary")
        state = with_command(CanaryState.from_dict(desired.canary), command)
        await self.cluster.set_canary(name, state.to_dict())
        return {**state.status(), "requested": command}

    def canary_noticed(self, name: str, stored: dict[str, Any] | None) -> None:
        """The follower saw the store's canary of a package this worker is busy with."""
        run = self.canaries.get(name)
        if run is not None and stored is not None:
            run.noticed(stored)

    async def _switch_back(
        self,
        record: Deployment,
        package: Package,
        version: PackageVersion,
        current: PackageVersion | None,
        operation: Operation,
        first_install: bool,
        error: HotDeployError,
        moves: list[Move],
        installed: list[Package],
        warm: PackageVersion | None,
        lineages: list[list[tuple[str, str]]],
    ) -> None:
        """A post-activation check failed: the previous version again, everywhere (and the
        packages that switched with it: the dependents back to their instances bound to it, the
        other packages of a set to what they were, or unmounted where it `installed` them)."""
        engine = self.engine
        with record.step("switch back") as step:
            step.detail = f"back to {current.version}" if current is not None else "unmounted"
            # `current` (and the dependents' old instances) were kept warm since the switch.
            engine.switch_back(package, current, version, moves)
        back = self.cluster.new_operation(
            f"{record.id}-back",
            package.name,
            OperationKind.ACTIVATE if current is not None else OperationKind.REMOVE,
            current.version if current is not None else None,
            current.sha256 if current is not None else None,
            lineages[0],  # each package's lineage as it was before the switch
            members=tuple(
                Member(
                    m.package,
                    move.old.version if move.old is not None else None,
                    move.old.sha256 if move.old is not None else None,
                    lineage,
                )
                for m, move, lineage in zip(operation.members, moves, lineages[1:], strict=False)
            ),
        )
        other = await self.cluster.begin_operation(back)
        if other is not None:
            # Another worker began an operation in the instant since this one ended: the switch
            # back stands here; the store's desired state is theirs to decide.
            logger.warning(
                "%s: switch back not recorded: operation %s of %s under way",
                package.name,
                other.id,
                other.coordinator,
            )
        else:
            await self._commit(back, record)
        engine.set_lineage(package, lineages[0])
        for move, lineage in zip(moves, lineages[1:], strict=False):
            engine.set_lineage(move.package, lineage)
        await engine.discard_moves(moves)
        await self._let_go(package, version, warm)
        for forgotten in installed:
            engine.forget(forgotten)
        if first_install:
            engine.forget(package)
        error.message = engine.redact(error.message)
        record.conclude(Outcome.ROLLED_BACK, error)
        await self.records.save(record)
        if current is not None:
            await notify(
                "hotdeploy_rolled_back",
                engine.managers(current),
                {"version": version, "previous": current, "deployment": record},
            )
        await notify("hotdeploy_failed", engine.managers(None), {"deployment": record, "error": error})

    async def _let_go(self, package: Package, version: PackageVersion, warm: PackageVersion | None) -> None:
        """The version an operation switched to and back from: discarded, or, if it was a warm
        one (a draining version taken back), given back to its retirement, which waits for the
        dependents' instances still bound to it."""
        if version is warm:
            self.engine.release(package, version)
        else:
            await self.engine.discard(package, version)

    async def _announce(self, new: PackageVersion, old: PackageVersion | None, record: Deployment) -> None:
        await notify(
            "hotdeploy_activated",
            self.engine.managers(new),
            {"version": new, "previous": old, "deployment": record},
        )

    async def _fail(self, record: Deployment, error: HotDeployError) -> NoReturn:
        error.message = self.engine.redact(error.message)
        record.conclude(Outcome.FAILED, error)
        await self.records.save(record)
        await notify("hotdeploy_failed", self.engine.managers(None), {"deployment": record, "error": error})
        raise DeploymentError(record, error) from error

    async def _prune(self, package: Package) -> None:
        protect = set(package.lineage_pairs()[-2:])
        removed = await thread_hop(self.store.prune, package.name, self.keep_versions, protect)
        for archive in removed:
            self.engine.drop_available(package, archive.version, archive.sha256)
            if package.loaded_version(archive.version) is None:
                directory = (
                    self.engine.home / "packages" / package.name / f"{archive.version}-{archive.sha256[:12]}"
                )
                await thread_hop(_remove_tree, directory)


def canary_plan(
    manifest: Manifest, options: DeployOptions, current: PackageVersion | None
) -> CanaryPlan | None:
    """The plan of a canary deploy, or None for a plain one."""
    wanted = options.canary
    if wanted is None:
        wanted = manifest.strategy == "canary" or options.canary_steps is not None
    if not wanted:
        return None
    if manifest.strategy == "block":
        raise CanaryRefused(
            "strategy 'block' and a canary exclude each other: a canary serves both versions at once, "
            "'block' holds requests until one switch; deploy without canary, or change the strategy",
            package=manifest.name,
            version=manifest.version,
            step="canary",
        )
    if current is None:
        raise CanaryRefused(
            f"{manifest.name} has no active version to compare a canary with: deploy it without canary first",
            package=manifest.name,
            version=manifest.version,
            step="canary",
        )
    plan = manifest.canary or CanaryPlan(parse_steps(DEFAULT_STEPS))
    if options.canary_steps is not None:
        plan = replace(plan, steps=parse_steps(options.canary_steps, where="canary"))
    return plan


def _check_replacement(
    manifest: Manifest,
    sha256: str,
    options: DeployOptions,
    stored: Sequence[StoredArchive],
    loaded: set[tuple[str, str, str]],
) -> bool:
    """A different archive under a version number that already has one (in the store:
    `stored`, or loaded here: `loaded`, (name, version, sha256)) is refused unless forced: two
    different "1.0" would make every record and status ambiguous. True: forced."""
    known = {a.sha256 for a in stored if a.version == manifest.version}
    known |= {s for name, version, s in loaded if (name, version) == (manifest.name, manifest.version)}
    known.discard(sha256)
    if not known:
        return False
    if options.force:
        return True
    others = ", ".join(sorted(s[:12] for s in known))
    raise VersionConflict(
        f"{manifest.name} {manifest.version} was deployed before from a different archive "
        f"(sha256 {others}; this one is {sha256[:12]}): give it a new version number, or replace "
        "it on purpose with force (hotdeploy deploy --force, or ?force=true)",
        package=manifest.name,
        version=manifest.version,
        step="unpack",
    )


def _check_host_routes(manifest: Manifest, options: DeployOptions, routes: list[HostRoute] | None) -> None:
    """A mount over a route of the host app (`routes`) would take its requests without a word."""
    if routes is None or manifest.shadow_host_routes or options.shadow_host_routes:
        return
    hit = shadowed(manifest.mount, routes)
    if hit:
        raise MountConflict(
            f"mount {manifest.mount!r} would shadow the host app's {hit[0].describe()}"
            + (f" (and {len(hit) - 1} more)" if len(hit) > 1 else "")
            + "; choose another mount, or say it is intended: shadow_host_routes = true in "
            "hotdeploy.toml, or deploy with shadow_host_routes (?shadow_host_routes=true, "
            "hotdeploy deploy --shadow-host-routes)",
            package=manifest.name,
            version=manifest.version,
            step="manifest",
        )


def _remove_tree(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _as_error_for(exc: BaseException, package: str) -> HotDeployError:
    if isinstance(exc, HotDeployError):
        return exc
    return HotDeployError(f"unexpected {type(exc).__name__}: {exc}", package=package)


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


def _reporter(record: Deployment) -> Callable[[str, Vote, str | None], None]:
    """Writes each worker's vote into the record, with when it was seen."""

    def report(worker: str, vote: Vote, detail: str | None) -> None:
        record.saw_vote(worker, vote.value, detail)

    return report
