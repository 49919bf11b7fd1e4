"""Follower: this worker's part in the other workers' operations.

It keeps a heartbeat in the store, notices changes (a wake-up from the worker that wrote them,
see _wakeup, and a cheap look once a second: the desired generation and the operations under
way), votes on operations in their prepare phase by preparing the version here, and makes every
package serve exactly the store's desired state: at start-up (the restore, packages in parallel)
and whenever another worker committed a change. It changes nothing itself: every change goes
through the engine's named methods, under the engine's claim on the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from ._canary import figures_report
from ._cluster import Cluster
from ._engine import Engine, Move, requirements_first
from ._hooks import run_checks
from ._operation import Operation, OperationKind, Phase, Vote
from ._package import Package
from ._restore_order import RestoreOrder
from ._store import Desired, Store
from ._thread_hop import thread_hop
from ._version import PackageVersion, VersionState

logger = logging.getLogger("starlette_hotdeploy")

# Packages restored at once: their start-ups (lifespans, in the runtime's task group) overlap;
# their thread hops (reading, importing) take turns (`RestoreOrder.threads`).
RESTORE_CONCURRENCY = 8
# Even when nothing seems to have changed, a full converge this often (seconds): a safety net
# (a change of the desired state moves its generation, which every look reads).
FULL_LOOK_INTERVAL = 30.0
# The periodic heartbeat recomputes what this worker serves every this many beats.
SERVING_REFRESH_BEATS = 5
# How long a heartbeat or a periodic look waits at most for an operation here to end (seconds;
# see Engine.until_quiet): well within the liveness of 5 heartbeats.
CHORES_PATIENCE = 1.0

_Fingerprint = tuple[int, tuple[tuple[str, str], ...]]
_Look = tuple[_Fingerprint, set[str], list[Operation], dict[str, Desired]]


class Follower:
    def __init__(self, engine: Engine, cluster: Cluster, store: Store, *, bake_time: float) -> None:
        self.engine = engine
        self.cluster = cluster
        self.store = store
        self.bake_time = bake_time
        # operation id -> the version prepared (or held warm) for it here, with its package
        self._prepared: dict[str, tuple[Package, PackageVersion]] = {}
        # operation id -> the dependents prepared to move with that version (bound to it)
        self._moves: dict[str, list[Move]] = {}
        # operation id -> the operation, for those prepared here (a commit's notice names it)
        self._prepared_for: dict[str, Operation] = {}
        # package -> the generation of the commit this worker switched it to on its notice: a
        # look older than that must not undo it (see converge)
        self._noticed: dict[str, int] = {}
        self._checking: set[str] = set()  # operations whose post-activation checks run here
        self._preparing: dict[str, anyio.Event] = {}  # operation id -> set when prepared here
        # operation id -> the number of its begin's notice (counted by `_notice_seq`): a look
        # that started before it may not show it, yet it is under way (see converge)
        self._begun: dict[str, int] = {}
        self._notice_seq = 0
        # operations a converge found ended while their preparation (on a notice) still ran:
        # the end of that preparation makes the loop look again, to let go of what it made
        self._look_after: set[str] = set()
        self._voted: set[tuple[str, Vote]] = set()  # (operation id, vote) this worker cast
        # ...of which the store never got these (it failed): (detail, serving) to cast again
        self._unsent: dict[tuple[str, Vote], tuple[str | None, dict[str, str] | None]] = {}
        # What the last complete converge saw (desired generation, operations under way); None:
        # look again in full (never converged, or something was left to do).
        self._fingerprint: _Fingerprint | None = None
        self._last_full = 0.0
        # Told of the store's canary of a package this worker is busy with (its canary run).
        self.on_canary: Callable[[str, dict[str, Any]], None] | None = None

    @property
    def worker_id(self) -> str:
        return self.cluster.worker_id

    async def discard_prepared(self) -> None:
        """The server is stopping: what was prepared for unfinished operations goes."""
        prepared, self._prepared = self._prepared, {}
        moves, self._moves = self._moves, {}
        self._prepared_for.clear()
        for op_id, (package, version) in prepared.items():
            await self.engine.discard_moves(moves.get(op_id, []))
            await self._let_go(package, version)

    async def _let_go(self, package: Package, version: PackageVersion) -> None:
        if version is package.active or version is self.engine.canary(package):
            return
        if version.state is VersionState.DRAINING:
            self.engine.release(package, version)  # it was held warm: back to its retirement
        else:
            await self.engine.discard(package, version)

    async def heartbeats(self) -> None:
        beats = 0
        while True:
            try:
                # Every change of what is served is written with its vote or phase (and after
                # a converge); the periodic beat repeats the last map, recomputed only now and
                # then (with 1000 packages, computing it is most of an idle worker's CPU).
                fresh = self.cluster.serving is None or beats % SERVING_REFRESH_BEATS == 0
                await self.engine.until_quiet(CHORES_PATIENCE)
                await self.cluster.heartbeat(self.engine.serving() if fresh else None)
                await self.report_canaries()
                beats += 1
                if beats % 60 == 1:  # about once a minute: what is older than an hour goes
                    live = await self.cluster.live()

                    def housekeeping(live: set[str] = live) -> None:
                        self.store.forget_workers(3600.0)
                        self.store.prune_operations(3600.0)
                        self.store.finish_orphaned_records(live)

                    await thread_hop(housekeeping)
            except Exception:
                logger.exception("heartbeat failed")
            await anyio.sleep(self.cluster.heartbeat_interval)

    async def follow(self) -> None:
        """Converge whenever another worker wakes this one up (and look once a second anyway:
        a lost wake-up only delays). Without wake-ups, look every `poll_interval`."""
        cluster = self.cluster
        async with anyio.create_task_group() as tasks:

            def switch_now(op_id: str) -> None:
                # A commit's notice switches at once, whatever this loop is doing (a look, say).
                tasks.start_soon(self.switch_noticed, op_id)

            def prepare_now(operation: Operation) -> bool:
                # A begin's notice prepares at once too, if nothing here is busy with it.
                if not self._may_prepare(operation):
                    return False
                self._notice_seq += 1
                self._begun[operation.id] = self._notice_seq
                tasks.start_soon(self.prepare_noticed, operation)
                return True

            cluster.notices.on_commit = switch_now
            cluster.notices.on_begin = prepare_now
            try:
                if cluster.wakeup.is_open:
                    # Listening before the first look: a change after it wakes this loop.
                    await tasks.start(cluster.listen, name="hotdeploy wake-ups")
                woken = False
                while True:
                    # Before the look: a wake-up during it is not lost. Those that only
                    # announced votes are for the coordinator: they change nothing to look for.
                    seen = cluster.wakeup.changes
                    if not woken:  # the periodic look lets an operation here finish first
                        await self.engine.until_quiet(CHORES_PATIENCE)
                    # Woken up, this worker has a part in an operation (see Engine.operation);
                    # the periodic look is not one.
                    with self.engine.operation() if woken else contextlib.nullcontext():
                        try:
                            force = time.monotonic() - self._last_full > FULL_LOOK_INTERVAL
                            await self.converge(force=force)
                        except Exception:
                            logger.exception("converging on the desired state failed")
                    woken = await cluster.wait_change(seen, cluster.reconcile_interval, changes=True)
            finally:
                cluster.notices.on_commit = None
                cluster.notices.on_begin = None

    async def switch_noticed(self, op_id: str) -> None:
        """Switch at once to the version a wake-up announced committed (see _notices), if this
        worker prepared it for that operation and it changes that package alone: without the
        look in the store that would come first, a thread hop that waits behind a busy event
        loop. The next converge finds it done; anything else waits for that converge (as does
        a package this worker is busy with, the converge itself say)."""
        preparing = self._preparing.get(op_id)
        if preparing is not None:
            await preparing.wait()  # its vote's hop is not back yet: the claim is still held
        self._forget_unprepared()
        operation = self._prepared_for.get(op_id)
        generation = self.cluster.notices.commit(op_id)
        if (
            operation is None
            or generation is None
            or operation.kind is not OperationKind.ACTIVATE
            or operation.members
            or op_id in self._moves  # dependents move with it: the converge switches them all
            or operation.version is None
            or operation.sha256 is None
        ):
            return
        wanted = Desired(
            operation.package, operation.version, operation.sha256, list(operation.lineage), generation
        )
        committed = dataclasses.replace(operation, phase=Phase.COMMIT)
        # From now on a look older than this commit is stale for the package: the converge must
        # not switch it back (nor remove a new one) on such a look, even during this switch.
        self._noticed[operation.package] = max(generation, self._noticed.get(operation.package, -1))
        with self.engine.operation():
            try:
                await self._converge_package(
                    operation.package, wanted, committed, RestoreOrder([operation.package], 1)
                )
            except Exception:
                logger.exception("%s: switching to the committed version failed", operation.package)

    def _may_prepare(self, operation: Operation) -> bool:
        return (
            operation.coordinator != self.worker_id
            and operation.phase is Phase.PREPARE
            and operation.id not in self._preparing
            and not self._has_voted(operation, Vote.PREPARED, Vote.FAILED)
            and not self.engine.is_busy(operation.package)
        )

    async def prepare_noticed(self, operation: Operation) -> None:
        """Prepare an operation that a wake-up announced begun (see _notices), and vote: without
        the look in the store that would come first, a thread hop that waits behind a busy
        event loop. If it could not (the package became busy meanwhile), the next look does."""
        with self.engine.operation():
            try:
                await self._prepare_for(operation)
            except Exception:
                logger.exception("%s: preparing operation %s failed", operation.package, operation.id)
        if not self._has_voted(operation, Vote.PREPARED, Vote.FAILED):
            self.cluster.wakeup.poke()

    def _forget_unprepared(self) -> None:
        for stale in [op_id for op_id in self._prepared_for if op_id not in self._prepared]:
            del self._prepared_for[stale]  # switched, discarded or let go since

    def _look(self, force: bool) -> _Look | None:
        """Blocking, one thread hop: what converge reads. None: nothing changed since the last
        complete converge (only the generation and the operations under way are read)."""
        generation = self.store.generation()  # first: a commit after it makes the next look full
        operations = self.store.active_operations()
        fingerprint = (generation, tuple((o.id, o.phase.value) for o in operations))
        # Another worker's to vote on, or one of this worker's that its coordinator left open.
        to_act_on = any(o.coordinator != self.worker_id or self._left_open(o) for o in operations)
        if not force and not to_act_on and fingerprint == self._fingerprint:
            return None
        return fingerprint, self.cluster._live_ids(), operations, self.store.desired()

    async def converge(self, *, force: bool = True) -> None:
        """Vote on other workers' operations, then serve exactly the desired state. Without
        `force`, only if the store changed since the last complete converge."""
        force = force or self._fingerprint is None or bool(self._prepared) or bool(self._unsent)
        started = self._notice_seq
        look = await thread_hop(self._look, force)
        # Noticed begun since the look started: under way, although the look may not show them.
        self._begun = {op_id: seq for op_id, seq in self._begun.items() if seq > started}
        if look is None:
            return
        fingerprint, live, operations, desired = look
        # What this look already shows needs no guard against it any more (see _converge_package).
        self._noticed = {name: g for name, g in self._noticed.items() if g > fingerprint[0]}
        await self._send_unsent_votes(operations)
        if force:
            self._last_full = time.monotonic()
        settled = True
        # Only unfinished operations: finished ones are history (and would grow without bound).
        latest: dict[str, Operation] = {}  # per package, the committed operation to vote on
        for operation in operations:
            if operation.coordinator == self.worker_id:
                if self._left_open(operation):
                    logger.warning(
                        "%s: operation %s was left open by this worker (the store failed its last "
                        "write); it is ended now",
                        operation.package,
                        operation.id,
                    )
                    await self.cluster.abandon(operation)
                    settled = False
                continue
            if operation.coordinator not in live:
                logger.warning(
                    "%s: operation %s abandoned: its coordinator %s is gone (no heartbeat within %gs)",
                    operation.package,
                    operation.id,
                    operation.coordinator,
                    self.cluster.liveness,
                    extra={"package": operation.package, "worker": operation.coordinator},
                )
                await self.cluster.abandon(operation)
                settled = False
            elif operation.phase is Phase.COMMIT:
                latest[operation.package] = operation
            elif not self._has_voted(operation, Vote.PREPARED, Vote.FAILED):
                await self._prepare_for(operation)
        unfinished = {operation.id for operation in operations if operation.coordinator in live}
        unfinished.update(self._begun)
        # A preparation on a notice may still run beside this converge: what it makes is let go
        # of once it is done (it then makes the loop look again).
        self._look_after.update(op_id for op_id in self._preparing if op_id not in unfinished)
        unfinished.update(self._preparing)
        for op_id in [
            op_id for op_id in self._prepared.keys() | self._moves.keys() if op_id not in unfinished
        ]:
            # Aborted (or finished without this worker): what was prepared for it goes (unless
            # a commit's notice switched to it meanwhile, see switch_noticed).
            await self.engine.discard_moves(self._moves.pop(op_id, []))
            prepared = self._prepared.pop(op_id, None)
            if prepared is not None:
                await self._let_go(*prepared)
        self._voted = {vote for vote in self._voted if vote[0] in unfinished}
        to_converge: list[str] = []
        for name, wanted in desired.items():
            if self.engine.is_busy(name):
                settled = False  # an operation of this worker: the next round looks again
                if wanted.canary is not None and self.on_canary is not None:
                    self.on_canary(name, wanted.canary)  # a command for the canary run here?
            elif not self._serves(name, wanted) or name in latest:
                to_converge.append(name)
        # The other packages of a set switch with it (what this worker prepared for it).
        carried = {m.package for op in latest.values() if op.id in self._moves for m in op.members}
        to_converge = [name for name in to_converge if name not in carried]
        if len(to_converge) > 1:
            # A dependent whose only change is a requirement's new version moves with that
            # requirement's switch (or is bound anew once it has switched: the next look).
            changing = set(to_converge)
            waiting = [name for name in to_converge if self._moves_with(name, desired[name], changing)]
            to_converge = [name for name in to_converge if name not in waiting]
            settled = settled and not waiting
        if to_converge:  # (the idle look, once a second, allocates nothing here)
            order = RestoreOrder(to_converge, RESTORE_CONCURRENCY)
            work: dict[str, Callable[[], Awaitable[bool]]] = {
                name: functools.partial(self._converge_package, name, desired[name], latest.get(name), order)
                for name in to_converge
            }
            settled = await self._run_all(work, order) and settled
        switched = bool(to_converge)
        # Dependents first: a package is removed only once no loaded version is bound to it.
        for package in reversed(requirements_first(self.engine.packages())):
            name = package.name
            if any(version.dependents for version in package.loaded):
                settled = settled and name in desired
                continue
            if name in self._noticed:
                settled = False  # switched on a commit newer than this look: look again
                continue
            if name not in desired and not self.engine.is_busy(name) and package.active is not None:
                with self.engine.claim(name):
                    await self.engine.remove(package, None)
                switched = True
                removal = latest.get(name)
                if removal is not None:
                    await self.vote(removal, Vote.SWITCHED, serving=self.engine.serving())
        if switched and not latest:
            await self.cluster.heartbeat(self.engine.serving())  # the restore: the workers map
        self._fingerprint = fingerprint if settled else None

    def _left_open(self, operation: Operation) -> bool:
        """This worker's operation, yet no operation on its package runs here: its coordinator
        ended without the closing write (`Cluster.end` gave up on an unreachable store). It is
        ended as a dead coordinator's would be. (One that finished meanwhile is left as it is:
        `abandon` reads the stored phase.)"""
        return operation.coordinator == self.worker_id and not self.engine.is_busy(operation.package)

    def _serves(self, name: str, wanted: Desired) -> bool:
        package = self.engine.get(name)
        active = package.active if package is not None else None
        if active is None or (active.version, active.sha256) != (wanted.version, wanted.sha256):
            return False
        assert package is not None
        return self._splits(package, wanted) and self.engine.is_bound_current(active)

    def _moves_with(self, name: str, wanted: Desired, changing: set[str]) -> bool:
        """The package serves its desired version, bound to a requirement that changes now."""
        package = self.engine.get(name)
        active = package.active if package is not None else None
        return (
            active is not None
            and (active.version, active.sha256) == (wanted.version, wanted.sha256)
            and bool(changing & active.bound_to.keys())
        )

    def _splits(self, package: Package, wanted: Desired) -> bool:
        """Whether the package's canary (or its absence) and weight are the desired ones."""
        mount = package.mount
        split = mount.split if mount is not None else None
        if split is not None and split.leader is not None:
            # It follows a canary of what it requires: right while that canary runs.
            if not self.engine.follows_a_canary(package):
                return False  # its leader ended without it (converging ends it)
            split = None
        elif split is None and self.engine.canary_to_follow(package) is not None:
            return False  # restored (or deployed) after that canary began here: it must follow
        canary = wanted.canary
        if canary is None or split is None:
            return canary is None and split is None
        return (split.canary.version, split.canary.sha256, split.weight) == (
            canary["version"],
            canary["sha256"],
            canary["weight"],
        )

    async def _run_all(self, work: dict[str, Callable[[], Awaitable[bool]]], order: RestoreOrder) -> bool:
        """Run the packages' convergence, several at once (the restore of many packages), each
        after those it requires (`order`); True if every one settled. Those that failed are run
        again one at a time: a load refused because another one, overlapping it, touched
        `sys.modules` (see _loader.audited) must not keep an innocent package down. The first
        error is raised once all have finished."""
        if len(work) == 1:
            [job] = work.values()
            return await job()
        failed: list[Callable[[], Awaitable[bool]]] = []

        async def one(name: str, job: Callable[[], Awaitable[bool]]) -> None:
            async with order.limiter:
                try:
                    settled = await job()
                except Exception:
                    settled = False
                finally:
                    order.finished(name)
                if not settled:
                    failed.append(job)

        async with anyio.create_task_group() as tasks:
            for name, job in work.items():
                tasks.start_soon(one, name, job)
        if not failed:
            return True
        settled = True
        errors: list[Exception] = []
        for job in failed:  # alone this time (every restore of the batch has finished: no waits)
            try:
                settled = await job() and settled
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return settled

    def _has_voted(self, operation: Operation, *votes: Vote) -> bool:
        return any((operation.id, vote) in self._voted for vote in votes)

    async def vote(
        self,
        operation: Operation,
        vote: Vote,
        detail: str | None = None,
        *,
        serving: dict[str, str] | None = None,
    ) -> None:
        """Cast this worker's vote (once): the coordinator votes through here too. With
        `serving`, the heartbeat goes first, in the same thread hop."""
        if (operation.id, vote) not in self._voted:
            self._voted.add((operation.id, vote))
            try:
                await self.cluster.vote(operation.id, vote, detail, serving=serving)
            except Exception:
                # Not in the store (it could not be reached): cast again on the next converge,
                # or the coordinator waits for it until its timeout.
                self._unsent[(operation.id, vote)] = (detail, serving)
                raise

    async def _send_unsent_votes(self, operations: list[Operation]) -> None:
        under_way = {operation.id for operation in operations}
        for (op_id, vote), (detail, serving) in list(self._unsent.items()):
            if op_id in under_way:
                await self.cluster.vote(op_id, vote, detail, serving=serving)
            del self._unsent[(op_id, vote)]

    async def _prepare_for(self, operation: Operation) -> None:
        """Prepare another worker's change here, and vote."""
        if operation.kind not in (OperationKind.ACTIVATE, OperationKind.CANARY):
            await self.vote(operation, Vote.PREPARED)
            return
        if self.engine.is_busy(operation.package):
            return  # this worker is busy with the package: the next round votes
        assert operation.version is not None
        assert operation.sha256 is not None
        # Its vote is cast under the claim: a commit's notice that arrives before the vote's
        # thread hop is back waits for this (see switch_noticed), not for the next look.
        done = self._preparing[operation.id] = anyio.Event()
        try:
            await self._prepare_claimed(operation)
        finally:
            self._preparing.pop(operation.id, None)
            done.set()
            if operation.id in self._look_after:
                self._look_after.discard(operation.id)
                self.cluster.wakeup.poke()

    async def _prepare_claimed(self, operation: Operation) -> None:
        assert operation.version is not None
        assert operation.sha256 is not None
        with self.engine.claim(operation.package):
            package = self.engine.get(operation.package)
            warm = package.loaded_version(operation.version) if package is not None else None
            if package is not None and warm is not None and warm.sha256 == operation.sha256:
                if warm is package.active:
                    await self.vote(operation, Vote.PREPARED)
                    return
                if warm is self.engine.canary(package):  # a canary's promotion: warm already
                    self._prepared[operation.id] = (package, warm)
                    await self._prepare_moves(operation, package, warm)
                    return
                if self.engine.hold(warm):  # draining: now it cannot be unloaded under us
                    self._prepared[operation.id] = (package, warm)
                    await self._prepare_moves(operation, package, warm)
                    return
            try:
                unpacked = await self.engine.unpack_stored(
                    operation.package, operation.version, operation.sha256
                )
                if package is None:
                    package = await thread_hop(
                        self.engine.new_package, operation.package, unpacked.manifest.mount
                    )
                version = unpacked.new_version()
                await self.engine.prepare_bound(package, version)
            except Exception as exc:
                await self.vote(operation, Vote.FAILED, str(exc))
                return
            self._prepared[operation.id] = (package, version)
            await self._prepare_moves(operation, package, version)

    async def _prepare_moves(self, operation: Operation, package: Package, version: PackageVersion) -> None:
        """What switches with `version`, prepared here too: the other packages of its set, then
        the dependents that move with them, bound to the new versions; then the vote."""
        engine = self.engine
        self._prepared_for[operation.id] = operation  # prepared: a commit's notice may switch
        moves: list[Move] = []
        try:
            names = {operation.package}
            if operation.kind is not OperationKind.CANARY:  # a canary's members follow it
                moves = await self._prepare_members(operation, version)
                names = set(operation.packages)
            if version is engine.canary(package):  # its promotion: its followers are ready
                names |= {move.package.name for move in engine.carried(package)}
            dependents = [d for d in engine.dependents(*names) if d.name not in names]
            moves += await engine.prepare_dependents(None, dependents, version, *(m.new for m in moves))
        except Exception as exc:
            with anyio.CancelScope(shield=True):
                await engine.discard_moves(moves)
            await self.vote(operation, Vote.FAILED, str(exc))
            return
        if moves:
            self._moves[operation.id] = moves
        await self.vote(operation, Vote.PREPARED)

    async def _prepare_members(self, operation: Operation, first: PackageVersion) -> list[Move]:
        """The other packages of a set, in its order, each bound to the set's new versions (a
        draining one held warm, as for a switch back); all or nothing."""
        engine = self.engine
        moves: list[Move] = []
        moving = {first.name: first}
        try:
            for member in operation.members:
                if member.version is None or member.sha256 is None:
                    continue  # removed by the commit: the converge that follows removes it
                package = engine.get(member.package) or self._prepared_package(member.package)
                warm = package.loaded_version(member.version) if package is not None else None
                if package is not None and warm is not None and warm.sha256 == member.sha256:
                    if warm is package.active:
                        continue
                    if engine.hold(warm):
                        moves.append(Move(package, package.active, warm))
                        moving[member.package] = warm
                        continue
                unpacked = await engine.unpack_stored(member.package, member.version, member.sha256)
                if package is None:
                    package = await thread_hop(engine.new_package, member.package, unpacked.manifest.mount)
                version = unpacked.new_version()
                await engine.prepare_bound(package, version, moving)
                moves.append(Move(package, package.active, version))
                moving[member.package] = version
        except BaseException:
            with anyio.CancelScope(shield=True):
                await engine.discard_moves(moves)
            raise
        return moves

    async def _converge_package(
        self, name: str, wanted: Desired, operation: Operation | None, order: RestoreOrder
    ) -> bool:
        """Make this worker serve the desired version of one package (restore or follow); False
        if it could not (the next full look tries again)."""
        engine = self.engine
        if self._noticed.get(name, -1) > wanted.generation:
            return False  # a look older than the commit this worker switched to on its notice
        package = engine.get(name)
        active = package.active if package is not None else None
        if active is not None and (active.version, active.sha256) == (wanted.version, wanted.sha256):
            assert package is not None
            if not self._splits(package, wanted):
                if engine.is_busy(name):
                    return False
                with engine.claim(name):
                    if not await self._converge_canary(package, wanted):
                        return False
            if not engine.is_bound_current(active):
                if engine.is_busy(name):
                    return False
                with engine.claim(name):
                    if not await self._rebind(package, active):
                        return False
            if operation is not None:
                await self.vote(operation, Vote.SWITCHED, serving=engine.serving())
                await self._check_after_activate(operation, active, None)
            return True
        if engine.is_busy(name):
            return False
        if package is None:
            # A worker that starts while another one's operation is being prepared prepares
            # its version first: restore into that same Package, or the switch to the
            # prepared version would leave a second one behind, still pointing at this one.
            package = self._prepared_package(name)
        moves = self._moves.pop(operation.id, []) if operation is not None else []
        with engine.claim(name), contextlib.ExitStack() as claims:
            target: PackageVersion | None = None
            prepared = self._prepared.pop(operation.id, None) if operation is not None else None
            if prepared is not None and package is not None and prepared[0] is not package:
                await self._let_go(*prepared)  # prepared for a Package that was never adopted
                prepared = None
            if prepared is not None:
                package, target = prepared
            elif package is not None:
                warm = package.loaded_version(wanted.version)
                if (
                    warm is not None
                    and warm.sha256 == wanted.sha256
                    and (warm is engine.canary(package) or engine.hold(warm))  # promoted, or held
                ):
                    target = warm
            if target is None:
                target, package = await engine.restore(
                    name, wanted, package, order.before_load, order.threads
                )
            if target is None:
                await self._drop_moves(moves)
                return False
            assert package is not None
            engine.adopt(package)
            if prepared is None and moves:
                await engine.discard_moves(moves)  # prepared for another Package: never switched
                moves = []
            if not moves and active is not None and target.state is VersionState.DRAINING:
                moves = self._warm_moves(package, target, active)  # a switch back: theirs too
            if target is engine.canary(package):  # a promotion: its followers' instances too
                moves = [*engine.carried(package), *moves]
            if moves and not self._claim_moves(moves, claims):
                if operation is not None and operation.members and prepared is not None:
                    # A set switches whole here too: not yet (the next look tries again).
                    self._prepared[operation.id], self._moves[operation.id] = prepared, moves
                    return False
                await self._drop_moves(moves)  # the dependents are bound anew on a later look
                moves = []
            set_moves = [m for m in moves if operation is not None and m.package.name in operation.packages]
            if package.mount is not None and any(
                new.manifest.strategy == "block" and old is not None
                for new, old in [(target, active), *((m.new, m.old) for m in set_moves)]
            ):
                await engine.switch_blocking(package, target, active, moves, force=True)
            else:
                engine.switch(package, target, active, moves)
            engine.confirm(package, wanted.version, wanted.sha256, wanted.lineage)
            for member in operation.members if operation is not None and moves else ():
                moved = next((m.package for m in moves if m.package.name == member.package), None)
                if moved is not None and member.version is not None and member.sha256 is not None:
                    engine.adopt(moved)
                    engine.confirm(moved, member.version, member.sha256, member.lineage)
            engine.retire_moves(moves, delay=self.bake_time)
            if active is not None and active is not target:
                engine.retire(package, active, None, delay=self.bake_time)
            if not self._splits(package, wanted) and not await self._converge_canary(package, wanted):
                return False
            if operation is not None:
                # Heartbeat first: once the vote is in, the workers map must show the new version.
                await self.vote(operation, Vote.SWITCHED, serving=engine.serving())
        if operation is not None:  # outside the claim: a switch back may need the package
            await self._check_after_activate(operation, target, active, [(m.new, m.old) for m in set_moves])
        return True

    def _prepared_package(self, name: str) -> Package | None:
        """The Package that something prepared here for an operation belongs to (a worker that
        starts while it is prepared must restore into that same one)."""
        for package, _ in self._prepared.values():
            if package.name == name:
                return package
        for moves in self._moves.values():
            for move in moves:
                if move.package.name == name:
                    return move.package
        return None

    def _warm_moves(self, package: Package, target: PackageVersion, active: PackageVersion) -> list[Move]:
        """Switching back to a draining version: the dependents' instances still bound to it
        (draining too, since they moved away with it), taken back from their retirement."""
        engine = self.engine
        moves: list[Move] = []
        for dependent in engine.dependents(package.name):
            current = dependent.active
            if current is None or current.bound_to.get(package.name) is not active:
                continue
            earlier = next(
                (
                    v
                    for v in dependent.loaded
                    if v.sha256 == current.sha256 and v.bound_to.get(package.name) is target
                ),
                None,
            )
            if earlier is not None and engine.hold(earlier):
                moves.append(Move(dependent, current, earlier))
        return moves

    async def _drop_moves(self, moves: list[Move]) -> None:
        """Moves that will not switch: prepared instances discarded, warm ones given back (a
        canary's follower is its canary's to end)."""
        for move in reversed(moves):
            if move.new is self.engine.canary(move.package):
                continue
            if move.new.state is VersionState.DRAINING:
                self.engine.release(move.package, move.new)
            else:
                await self.engine.discard(move.package, move.new)

    def _claim_moves(self, moves: list[Move], claims: contextlib.ExitStack) -> bool:
        """Claim the dependents that move with this switch; False (nothing claimed) if one of
        them changed or is busy since they were prepared."""
        engine = self.engine
        if any(
            m.package.active is not m.old
            or engine.is_busy(m.package.name)
            or engine.get(m.package.name) not in (None, m.package)  # another one restored meanwhile
            for m in moves
        ):
            return False
        for move in moves:
            claims.enter_context(engine.claim(move.package.name))
        return True

    async def _rebind(self, package: Package, active: PackageVersion) -> bool:
        """Under the claim: the active version is bound to a requirement's version that is no
        longer active (it switched without moving it: a worker that was busy, or started late):
        a new instance of it, bound to the active versions, takes its place."""
        engine = self.engine
        version = active.twin()
        try:
            await engine.prepare_bound(package, version)
        except Exception:
            logger.exception(
                "%s %s: cannot bind it to its requirements' new versions", package.name, active.version
            )
            return False
        engine.switch(package, version, active)
        engine.retire(package, active, None)
        return True

    async def _converge_canary(self, package: Package, wanted: Desired) -> bool:
        """Under the claim, the active version right: split the requests as the store's canary
        says (start it, from what was prepared for its operation or its archive; set its
        weight; or end it). False if its version could not be loaded here."""
        engine = self.engine
        canary = wanted.canary
        current = engine.canary(package)
        if current is not None and (
            canary is None or (current.version, current.sha256) != (canary["version"], canary["sha256"])
        ):
            engine.end_canary(package, None)  # aborted (or another canary): it drains and goes
            current = None
        if canary is None:
            return await self._follow_canary(package)
        if current is not None:
            engine.set_canary_weight(package, int(canary["weight"]))
            return True
        prepared = self._prepared.pop(canary["operation"], None)
        carried = self._moves.pop(canary["operation"], [])  # its dependents, bound to it
        version = prepared[1] if prepared is not None and prepared[0] is package else None
        if prepared is not None and version is None:
            await engine.discard_moves(carried)
            await self._let_go(*prepared)
            carried = []
        if version is None or version.state is not VersionState.READY:
            await engine.discard_moves(carried)
            try:
                unpacked = await engine.unpack_stored(package.name, canary["version"], canary["sha256"])
                version = unpacked.new_version()
                await engine.prepare_bound(package, version)
                carried = await engine.prepare_dependents(None, engine.dependents(package.name), version)
            except Exception:
                logger.exception("%s: cannot load its canary %s here", package.name, canary["version"])
                return False
        if any(move.package.active is not move.old for move in carried):
            await engine.discard_moves(carried)  # a dependent changed since: it does not follow
            carried = []
        plan_key = str(canary.get("plan", {}).get("key", "cookie"))
        engine.start_canary(package, version, int(canary["weight"]), plan_key, canary["operation"], carried)
        return True

    async def _follow_canary(self, package: Package) -> bool:
        """Under the claim: a package that imports one whose canary runs here follows it, with
        an instance bound to the canary (it was restored, or deployed, after the canary began)."""
        engine = self.engine
        leader = engine.canary_to_follow(package)
        canary = engine.canary(leader) if leader is not None else None
        if leader is None or canary is None:
            return True
        try:
            moves = await engine.prepare_dependents(None, [package], canary)
        except Exception:
            logger.exception("%s: cannot follow the canary of %s here", package.name, leader.name)
            return False
        if engine.canary(leader) is not canary:  # it ended meanwhile
            await engine.discard_moves(moves)
            return True
        engine.add_followers(leader, moves)
        return True

    async def report_canaries(self) -> None:
        """This worker's figures of each canary's two versions, in its vote on the canary's
        operation: what the canary's coordinator analyses (with every other worker's)."""
        for package in self.engine.packages():
            mount = package.mount
            split = mount.split if mount is not None else None
            active = package.active
            if split is None or active is None or split.leader is not None:
                continue
            report = json.dumps(figures_report(active, split.canary), separators=(",", ":"))
            with contextlib.suppress(Exception):  # a lost report only makes the analysis wait
                await self.cluster.vote(split.operation, Vote.SWITCHED, report)

    async def _check_after_activate(
        self,
        operation: Operation,
        version: PackageVersion,
        previous: PackageVersion | None,
        also: Sequence[tuple[PackageVersion, PackageVersion | None]] = (),
    ) -> None:
        """The post-activation checks, here too, while the coordinator bakes the change (the
        operation is still in COMMIT); the vote tells it whether they passed. A failure
        anywhere makes it switch every worker back."""
        if (
            operation.kind is not OperationKind.ACTIVATE
            or operation.phase is not Phase.COMMIT
            or self._has_voted(operation, Vote.CHECKED, Vote.FAILED)
            or operation.id in self._checking  # a switch on the commit's notice runs them now
        ):
            return
        self._checking.add(operation.id)
        try:
            for checked, before in [(version, previous), *also]:  # and the rest of its set
                await run_checks(
                    "hotdeploy_check_after_activate",
                    self.engine.managers(checked),
                    {"version": checked, "previous": before},
                    timeout=self.engine.check_timeout,
                    package=checked.name,
                    version=checked.version,
                    step="bake",
                )
        except Exception as exc:
            await self.vote(operation, Vote.FAILED, self.engine.redact(str(exc)))
        else:
            await self.vote(operation, Vote.CHECKED)
        finally:
            self._checking.discard(operation.id)
