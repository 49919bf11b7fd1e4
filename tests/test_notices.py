"""Notices: wake-ups that say what was written (_notices), and the looks they save.

Unit level: what a worker remembers of the notices it received. Then the two waits they
shorten, each shown by a look in the store that the waiter is not allowed to need: the
coordinator counting the votes (two `Cluster`s on one home), and a worker switching to a
committed version (two deployers on one home, the second one's looks blocked from the commit
on). Every wait is bounded; events order the steps.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Container, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from packages import write_package
from starlette_hotdeploy import Deployer, DeploymentError, hookimpl
from starlette_hotdeploy import _cluster as cluster_module
from starlette_hotdeploy._cluster import RECONCILE_ENV, Cluster
from starlette_hotdeploy._follower import Follower
from starlette_hotdeploy._notices import KEEP_OPERATIONS, Notices, begin_message, commit_message, vote_message
from starlette_hotdeploy._operation import Member, Operation, OperationKind, Phase, Vote
from starlette_hotdeploy._sqlite_store import SQLiteStore
from test_dependencies import inventory, orders
from test_wakeup import answer, short_home, two_workers

pytestmark = pytest.mark.anyio

__all__ = ["short_home"]  # a fixture of test_wakeup's, used here


# -- Notices --------------------------------------------------------------------------------------


def test_a_vote_and_a_commit_are_remembered_and_the_latest_vote_wins() -> None:
    notices = Notices()
    notices.receive(vote_message("op-1", "host:1:a", Vote.PREPARED))
    notices.receive(vote_message("op-1", "host:2:b", Vote.PREPARED))
    notices.receive(vote_message("op-1", "host:1:a", Vote.SWITCHED))
    notices.receive(commit_message("op-1", 42))
    assert notices.votes("op-1") == {"host:1:a": Vote.SWITCHED, "host:2:b": Vote.PREPARED}
    assert notices.commit("op-1") == 42
    assert notices.votes("op-2") == {}
    assert notices.commit("op-2") is None


def told(begun: list[Operation]) -> Callable[[Operation], bool]:
    """An `on_begin` that keeps what it is told, and prepares it."""

    def on_begin(operation: Operation) -> bool:
        begun.append(operation)
        return True

    return on_begin


OPERATION = Operation(
    id="op",
    package="greeter",
    kind=OperationKind.ACTIVATE,
    version="2.0",
    sha256="a" * 64,
    lineage=[("1.0", "b" * 64), ("2.0", "a" * 64)],
    phase=Phase.PREPARE,
    coordinator="host:1:abc",
    created_at=1234.5,
    members=(Member("orders", "1.1", "c" * 64, [("1.1", "c" * 64)]),),
)


@pytest.mark.parametrize(
    "data",
    [
        b"!",
        b"",
        b"\xff\xfe",
        b"[]",
        b'["vote"]',
        b'["vote", "op", "w", "no-such-vote"]',
        b'{"a": 1}',
        b'["commit", "op", 1e400]',
        b'["other", "op", 1]',
        b'["begin", "op", []]',
        b'["begin", "op", {"id": "op"}]',
        begin_message(OPERATION).replace(b'["begin", "op"', b'["begin", "other-op"'),  # ids differ
        begin_message(replace(OPERATION, lineage=[("1.0", 5)])),  # type: ignore[list-item]
    ],
)
def test_anything_else_is_ignored(data: bytes) -> None:
    notices, begun = Notices(), list[Operation]()
    notices.on_begin = told(begun)
    assert notices.receive(data) is True  # a wake-up like any other: the follower looks
    assert notices.votes("op") == {}
    assert notices.commit("op") is None
    assert begun == []


def test_a_begun_operation_is_told_whole_and_a_vote_is_no_change_for_a_follower() -> None:
    notices, begun = Notices(), list[Operation]()
    notices.on_begin = told(begun)
    assert notices.receive(begin_message(OPERATION)) is False  # the follower prepares it as told
    assert begun == [OPERATION]
    assert notices.receive(vote_message("op", "w", Vote.PREPARED)) is False
    assert notices.receive(commit_message("op", 3)) is True
    notices.on_begin = lambda operation: False  # the follower is busy with it: it looks
    assert notices.receive(begin_message(OPERATION)) is True


def test_a_commit_is_told_at_once() -> None:
    notices, told = Notices(), list[str]()
    notices.on_commit = told.append
    notices.receive(vote_message("op-1", "w", Vote.PREPARED))
    notices.receive(commit_message("op-1", 7))
    assert told == ["op-1"]


def test_only_the_latest_operations_are_kept() -> None:
    notices = Notices()
    for n in range(KEEP_OPERATIONS + 10):
        notices.receive(vote_message(f"op-{n}", "w", Vote.PREPARED))
        notices.receive(commit_message(f"op-{n}", n))
    assert notices.votes("op-0") == {}
    assert notices.commit("op-0") is None
    last = f"op-{KEEP_OPERATIONS + 9}"
    assert notices.votes(last) == {"w": Vote.PREPARED}
    assert notices.commit(last) is not None
    assert sum(notices.commit(f"op-{n}") is not None for n in range(KEEP_OPERATIONS + 10)) == KEEP_OPERATIONS


# -- the coordinator's wait for votes -------------------------------------------------------------


class CountedVotes:
    """A store whose `votes` calls are counted; the first one, once read, is signalled."""

    def __init__(self, home: Path) -> None:
        self._store = SQLiteStore(home)
        self.home = home
        self.looks = 0
        self.first_look = threading.Event()

    def votes(self, op_id: str) -> Any:
        votes = self._store.votes(op_id)
        self.looks += 1
        self.first_look.set()  # after the read: a vote from now on is not in this look
        return votes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@asynccontextmanager
async def two_clusters(home: Path) -> AsyncIterator[tuple[Cluster, Cluster, CountedVotes]]:
    store = CountedVotes(home)
    one, two = Cluster(store), Cluster(SQLiteStore(home))
    async with anyio.create_task_group() as tasks:
        for cluster in (one, two):
            await tasks.start(cluster.listen)
            await cluster.heartbeat({})
        try:
            yield one, two, store
        finally:
            tasks.cancel_scope.cancel()
            for cluster in (one, two):
                cluster.wakeup.close()


def waits_signalled(cluster: Cluster) -> anyio.Event:
    """Set once `cluster` waits for a wake-up (in `await_votes`: for a vote still missing)."""
    waiting = anyio.Event()
    wait_change = cluster.wait_change

    async def signalled(seen: int, timeout: float, *, changes: bool = False) -> bool:
        waiting.set()
        return await wait_change(seen, timeout, changes=changes)

    cluster.wait_change = signalled  # type: ignore[method-assign]
    return waiting


async def answered_while_waiting(
    home: Path, vote: Vote, detail: str | None = None
) -> tuple[Any, int, str, str]:
    """The first worker begins an operation, votes PREPARED and waits for every PREPARED; once
    it waits, the second votes `vote`. Returns what the wait returned, how many looks at the
    votes it took, and the two worker ids."""
    async with two_clusters(home) as (one, two, store):
        operation = one.new_operation("op-1", "greeter", OperationKind.ACTIVATE, "2.0", "0" * 64)
        assert await one.begin_operation(operation) is None
        one.vote_with_commit(operation.id, Vote.PREPARED)
        result: list[Any] = []
        waiting = waits_signalled(one)

        async def wait() -> None:
            result.append(await one.await_votes(operation, Vote.PREPARED))

        with anyio.fail_after(10):  # without wake-ups, only the 30 s recheck would find the vote
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                await waiting.wait()
                await two.vote(operation.id, vote, detail)
        return result[0], store.looks, one.worker_id, two.worker_id


async def test_votes_announced_by_wake_ups_end_the_wait_without_a_look(
    short_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The coordinator began the operation: that look told who is live, and no vote could come
    # before it; its own vote waits for the commit, the other's comes with its wake-up.
    monkeypatch.setenv(RECONCILE_ENV, "30")
    monkeypatch.setattr(cluster_module, "VOTE_RECHECK", 30.0)  # only a wake-up ends the wait
    result, looks, one, two = await answered_while_waiting(short_home, Vote.PREPARED)
    assert result.ok
    assert result.live == {one, two}
    assert looks == 0


async def test_a_failure_announced_by_its_wake_up_is_read_with_its_detail(
    short_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RECONCILE_ENV, "30")
    monkeypatch.setattr(cluster_module, "VOTE_RECHECK", 30.0)
    result, looks, _, two = await answered_while_waiting(short_home, Vote.FAILED, "ImportError: no module x")
    assert not result.ok
    assert result.failed == {two: "ImportError: no module x"}
    assert looks == 1  # the notice says "failed", the store says why


async def test_a_worker_that_dies_without_voting_is_found_by_the_look_after_the_recheck(
    short_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No wake-up will announce its vote: the wait must not trust wake-ups for ever.
    monkeypatch.setenv(RECONCILE_ENV, "30")
    monkeypatch.setattr(cluster_module, "VOTE_RECHECK", 0.05)
    async with two_clusters(short_home) as (one, two, store):
        operation = one.new_operation("op-1", "greeter", OperationKind.ACTIVATE, "2.0", "0" * 64)
        assert await one.begin_operation(operation) is None
        one.vote_with_commit(operation.id, Vote.PREPARED)
        await anyio.to_thread.run_sync(store.remove_worker, two.worker_id)  # as if it died
        with anyio.fail_after(10):
            result = await one.await_votes(operation, Vote.PREPARED)
    assert result.ok
    assert result.live == {one.worker_id}
    assert store.looks == 1


async def test_a_worker_that_joins_after_the_begin_is_waited_for_too(short_home: Path) -> None:
    # Its wake-up on joining is a change: the begin's look is out of date, the wait looks.
    async with two_clusters(short_home) as (one, two, _):
        operation = one.new_operation("op-1", "greeter", OperationKind.ACTIVATE, "2.0", "0" * 64)
        assert await one.begin_operation(operation) is None
        one.vote_with_commit(operation.id, Vote.PREPARED)
        three = Cluster(SQLiteStore(short_home))
        try:
            with anyio.fail_after(10):
                changes = one.wakeup.changes
                await three.join()
                assert await one.wakeup.wait(changes, 10, changes=True)
                await two.vote(operation.id, Vote.PREPARED)
                result: list[Any] = []
                waiting = waits_signalled(one)

                async def wait() -> None:
                    result.append(await one.await_votes(operation, Vote.PREPARED))

                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(wait)
                    await waiting.wait()  # for the third worker's vote
                    assert result == []
                    await three.vote(operation.id, Vote.PREPARED)
        finally:
            three.wakeup.close()
    assert result[0].ok
    assert result[0].live == {one.worker_id, two.worker_id, three.worker_id}


async def test_a_begin_reads_the_live_workers_to_end_a_dead_ones_operation_or_defer_to_a_live_one(
    short_home: Path,
) -> None:
    # The begin's transaction asks who is live only when an operation under way overlaps.
    async with two_clusters(short_home) as (one, two, store):
        dead = replace(
            two.new_operation("op-dead", "greeter", OperationKind.ACTIVATE, "2.0", "0" * 64),
            coordinator="elsewhere:1:gone",
        )
        assert store.begin_operation(dead, {dead.coordinator}) is None
        first = one.new_operation("op-1", "greeter", OperationKind.ACTIVATE, "2.0", "1" * 64)
        assert await one.begin_operation(first) is None  # the dead worker's: abandoned
        assert [o.phase for o in store.operations() if o.id == "op-dead"] == [Phase.ABORT]
        second = two.new_operation("op-2", "greeter", OperationKind.ACTIVATE, "3.0", "2" * 64)
        other = await two.begin_operation(second)  # the live one's: under way
        assert other is not None
        assert other.id == "op-1"


class ListingStore(SQLiteStore):
    """A store of an application's that lists the live workers it is given, first thing."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.seen: list[list[str]] = []

    def begin_operation(self, operation: Operation, live: Container[str]) -> Operation | None:
        self.seen.append(sorted(live))  # type: ignore[call-overload]
        return super().begin_operation(operation, live)


async def test_a_store_that_lists_the_live_workers_gets_them(short_home: Path) -> None:
    store = ListingStore(short_home)
    cluster = Cluster(store)
    try:
        await cluster.heartbeat({})
        operation = cluster.new_operation("op-1", "greeter", OperationKind.ACTIVATE, "2.0", "0" * 64)
        assert await cluster.begin_operation(operation) is None
    finally:
        cluster.wakeup.close()
    assert store.seen == [[cluster.worker_id]]  # asked again, with them read


async def test_the_coordinators_own_prepared_vote_is_written_with_the_commit(short_home: Path) -> None:
    async with two_clusters(short_home) as (one, _, store):
        operation = one.new_operation("op-1", "greeter", OperationKind.ACTIVATE, "2.0", "0" * 64)
        assert await one.begin_operation(operation) is None
        one.vote_with_commit(operation.id, Vote.PREPARED)
        assert await anyio.to_thread.run_sync(store.votes, operation.id) == {}
        await one.commit(operation)
        stored = await anyio.to_thread.run_sync(store.votes, operation.id)
    assert stored == {one.worker_id: (Vote.PREPARED, None)}


# -- a worker switching on the commit's notice ----------------------------------------------------


@asynccontextmanager
async def both_serving_1_0(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Deployer, Deployer]]:
    """Two workers on one home, both serving greeter 1.0; they look at the store only when
    woken (a 30 s reconcile interval)."""
    monkeypatch.setenv(RECONCILE_ENV, "30")
    async with two_workers(tmp_path) as (one, two):
        with anyio.fail_after(10):
            await one.deploy(write_package(sources, version="1.0"))
            assert await answer(two, "/greeter/") == "1.0"
        yield one, two


class LookGate:
    """Once armed, from the moment a store commits an operation (or, with
    `on = "begin_operation"`, begins one), every follower's look at the store waits (bounded) until `release` is set: a
    worker that switches (or prepares) meanwhile did so without a look."""

    def __init__(self) -> None:
        self.armed, self.closed, self.release = threading.Event(), threading.Event(), threading.Event()
        self.on = "commit"
        self.waited_out = False  # a look waited until the bound: something needed it


@pytest.fixture
def look_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[LookGate]:
    gate = LookGate()
    look = Follower._look

    def watched(name: str) -> Callable[..., Any]:
        write = getattr(SQLiteStore, name)

        def call(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
            if gate.armed.is_set() and gate.on == name:
                gate.closed.set()
            return write(self, *args, **kwargs)

        return call

    def gated_look(self: Follower, force: bool) -> Any:
        if gate.closed.is_set() and not gate.release.wait(10):
            gate.waited_out = True
        return look(self, force)

    monkeypatch.setattr(SQLiteStore, "commit", watched("commit"))
    monkeypatch.setattr(SQLiteStore, "begin_operation", watched("begin_operation"))
    monkeypatch.setattr(Follower, "_look", gated_look)
    try:
        yield gate
    finally:
        gate.release.set()


@pytest.mark.parametrize("closed_on", ["commit", "begin_operation"])
async def test_a_worker_prepares_and_switches_on_notices_without_looking(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch, look_gate: LookGate, closed_on: str
) -> None:
    # Its looks wait from the commit on (it switches on the commit's notice), or from the begin
    # on (it prepares on the begin's notice too).
    async with both_serving_1_0(tmp_path, sources, monkeypatch) as (one, two):
        look_gate.on = closed_on
        look_gate.armed.set()
        try:
            record = await one.deploy(write_package(sources, version="2.0"))
            assert await answer(two, "/greeter/") == "2.0"
            assert not look_gate.waited_out  # (the deployment is shielded: no fail_after)
        finally:
            look_gate.release.set()
    for name in ("prepare workers", "converge"):
        step = next(step for step in record.steps if step.name == name)
        assert step.ok, step.detail


class StaleLook:
    """Once armed, every look of one follower returns its last look from before (as a look
    that started before the commit and ended after the switch would)."""

    def __init__(self, follower: Follower) -> None:
        self.follower, self.armed = follower, False
        self.last: Any = None
        self._look = follower._look

    def look(self, force: bool) -> Any:
        if not self.armed:
            self.last = self._look(True)
        return self.last


async def test_a_look_older_than_the_commit_does_not_undo_the_switch_on_its_notice(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both_serving_1_0(tmp_path, sources, monkeypatch) as (one, two):
        follower, store = two._running().follower, one._running().store
        stale, commit = StaleLook(follower), store.commit

        def commit_then_stale(*args: Any, **kwargs: Any) -> int:
            stale.armed = True  # the other worker's last look is from before this commit
            return commit(*args, **kwargs)

        monkeypatch.setattr(follower, "_look", stale.look)
        monkeypatch.setattr(store, "commit", commit_then_stale)
        with anyio.fail_after(10):
            await one.deploy(write_package(sources, version="2.0"))
            assert await answer(two, "/greeter/") == "2.0"  # switched on the commit's notice
            assert stale.armed
            await follower.converge()  # with a look from before the commit
            assert await answer(two, "/greeter/") == "2.0"


class SlowCheck:
    """An after-activation check that waits until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.entered = anyio.Event()
        self.release = anyio.Event()

    @hookimpl
    async def hotdeploy_check_after_activate(self) -> None:
        self.runs += 1
        self.entered.set()
        await self.release.wait()


async def test_the_post_activation_checks_of_an_operation_run_once_at_a_time(
    tmp_path: Path, sources: Path
) -> None:
    check = SlowCheck()
    deployer = Deployer(home=tmp_path / "home", plugins=[check], entry_points=False)
    async with deployer.running():
        check.release.set()
        await deployer.deploy(write_package(sources, version="1.0"))
        check.runs, check.entered, check.release = 0, anyio.Event(), anyio.Event()
        runtime = deployer._running()
        cluster, follower = runtime.cluster, runtime.follower
        version = runtime.coordinator.engine.package("greeter").active
        assert version is not None
        operation = cluster.new_operation("op-x", "greeter", OperationKind.ACTIVATE, "1.0", version.sha256)
        assert await cluster.begin_operation(operation) is None
        committed = replace(operation, phase=Phase.COMMIT)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(follower._check_after_activate, committed, version, None)
                await check.entered.wait()
                await follower._check_after_activate(committed, version, None)  # returns at once
                check.release.set()
    assert check.runs == 1


async def test_a_commit_noticed_before_the_vote_is_back_switches_once_it_is(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch, look_gate: LookGate
) -> None:
    """Under load the commit's datagram can arrive before the thread hop of this worker's own
    PREPARED vote is back on its loop, while the preparation still holds the package's claim:
    the switch waits for that, not for a look."""
    async with both_serving_1_0(tmp_path, sources, monkeypatch) as (one, two):
        follower = two._running().follower
        switching = anyio.Event()
        switch, vote = follower.switch_noticed, follower.vote

        async def switch_noticed(op_id: str) -> None:
            switching.set()  # this task goes on until it waits: past its look at the claim
            await switch(op_id)

        async def vote_back_after_the_commit(operation: Any, cast: Vote, *args: Any, **kwargs: Any) -> None:
            await vote(operation, cast, *args, **kwargs)
            if cast is Vote.PREPARED:
                with anyio.move_on_after(10):
                    await switching.wait()

        monkeypatch.setattr(follower, "switch_noticed", switch_noticed)
        monkeypatch.setattr(follower, "vote", vote_back_after_the_commit)
        look_gate.armed.set()
        try:
            await one.deploy(write_package(sources, version="2.0"))
            assert switching.is_set()
            assert await answer(two, "/greeter/") == "2.0"
            assert not look_gate.waited_out
        finally:
            look_gate.release.set()


# -- a worker preparing on the begin's notice ----------------------------------------------------


async def test_a_look_from_before_the_begin_does_not_drop_what_its_notice_prepared(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch, look_gate: LookGate
) -> None:
    """A converge whose look read the store before the operation began, and ends after the
    begin's notice prepared it here, must not take it for an operation that ended without
    this worker (and drop the version prepared for it)."""
    async with both_serving_1_0(tmp_path, sources, monkeypatch) as (one, two):
        follower = two._running().follower
        looked, go = threading.Event(), threading.Event()
        prepared, stale_done = anyio.Event(), anyio.Event()
        look, vote = follower._look, follower.vote

        def look_then_wait(force: bool) -> Any:
            seen = look(force)
            looked.set()
            go.wait(10)
            return seen

        async def vote_once_the_stale_look_is_done(
            operation: Any, cast: Vote, *args: Any, **kwargs: Any
        ) -> None:
            if cast is Vote.PREPARED:
                prepared.set()
                with anyio.move_on_after(10):
                    await stale_done.wait()
            await vote(operation, cast, *args, **kwargs)

        async def stale_converge() -> None:
            await follower.converge()
            del follower._look  # back to the class's (gated) look
            stale_done.set()

        monkeypatch.setattr(follower, "vote", vote_once_the_stale_look_is_done)
        follower._look = look_then_wait  # type: ignore[method-assign]
        look_gate.armed.set()  # from the commit on, a switch must not need a look
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(stale_converge)
                await anyio.to_thread.run_sync(looked.wait, 10)  # it read the store: no operation
                tasks.start_soon(one.deploy, write_package(sources, version="2.0"))
                with anyio.fail_after(10):
                    await prepared.wait()  # prepared here on the begin's notice
                go.set()
            assert await answer(two, "/greeter/") == "2.0"
            assert not look_gate.waited_out
        finally:
            go.set()
            look_gate.release.set()


async def test_a_follower_does_not_look_in_the_store_for_a_vote(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A vote is news for its coordinator only: the other workers' follow loops sleep on.
    async with both_serving_1_0(tmp_path, sources, monkeypatch) as (one, two):
        follower, cluster = two._running().follower, two._running().cluster
        converges, converged = 0, anyio.Event()
        converge, receive = follower.converge, cluster.wakeup.on_message
        received = anyio.Event()
        assert receive is not None

        async def counted(*, force: bool = True) -> None:
            nonlocal converges
            converges += 1
            await converge(force=force)
            converged.set()

        def told(data: bytes) -> bool:
            received.set()
            return receive(data)

        monkeypatch.setattr(follower, "converge", counted)
        cluster.wakeup.on_message = told
        wake = one._running().cluster.wakeup.notify
        with anyio.fail_after(10):
            # First the wake-ups still on their way (the last deployment's) are taken in.
            await anyio.to_thread.run_sync(wake)
            await converged.wait()
            await anyio.wait_all_tasks_blocked()
            converges, converged, received = 0, anyio.Event(), anyio.Event()
            await one._running().cluster.vote("op-x", Vote.PREPARED)
            await received.wait()
            await anyio.wait_all_tasks_blocked()  # a loop woken up has called converge by now
            assert converges == 0
            await anyio.to_thread.run_sync(wake)  # a change: the loop looks
            await converged.wait()
        assert converges == 1


class Check:
    """A before-activation check that vetoes the versions `vetoes` picks, and holds those
    `holds` picks until released."""

    def __init__(
        self,
        *,
        vetoes: Callable[[Any], bool] = lambda v: False,
        holds: Callable[[Any], bool] = lambda v: False,
    ) -> None:
        self.vetoes, self.holds = vetoes, holds
        self.entered, self.release = anyio.Event(), anyio.Event()

    @hookimpl
    async def hotdeploy_check_before_activate(self, version: Any) -> str | None:
        if self.vetoes(version):
            return "vetoed by the test"
        if self.holds(version):
            self.entered.set()
            await self.release.wait()
        return None


def version_of(name: str, version: str) -> Callable[[Any], bool]:
    return lambda v: (v.name, v.version) == (name, version)


def bound_to_version(name: str, version: str) -> Callable[[Any], bool]:
    """A dependent's instance bound to `name` `version`."""
    return lambda v: name in v.bound_to and v.bound_to[name].version == version


@asynccontextmanager
async def converges_signalled(
    follower: Follower, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[], anyio.Event]]:
    """`next()` gives an event set at the end of the follower's next converge."""
    events: list[anyio.Event] = []
    converge = follower.converge

    async def signalled(*, force: bool = True) -> None:
        await converge(force=force)
        for event in events:
            event.set()

    def next_converge() -> anyio.Event:
        events.append(anyio.Event())
        return events[-1]

    monkeypatch.setattr(follower, "converge", signalled)
    yield next_converge


async def converged_until(next_converge: Callable[[], anyio.Event], holds: Callable[[], bool]) -> None:
    """Wait for the follower's converges until `holds()` (checked before each one's end is
    awaited: one that ends meanwhile is not missed). The preparation may have been the loop's
    own converge (woken by an earlier wake-up, it saw the begin first): the look that lets go
    is then the one after it."""
    while True:
        converged = next_converge()
        if holds():
            return
        await converged.wait()


async def test_an_operation_that_ends_while_its_notice_is_prepared_is_let_go_of_once_it_is(
    short_home: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator vetoes 2.0 while the other worker still prepares it on the begin's
    notice: the converge that sees the abort leaves that preparation alone, and its end makes
    the loop look again and let go of 2.0 (not the next reconcile, 30 s away)."""
    monkeypatch.setenv(RECONCILE_ENV, "30")
    veto, slow = Check(vetoes=version_of("greeter", "2.0")), Check(holds=version_of("greeter", "2.0"))
    one = Deployer(home=short_home, plugins=[veto], entry_points=False)
    two = Deployer(home=short_home, plugins=[slow], entry_points=False)
    async with one.running(), two.running():
        follower = two._running().follower
        with anyio.fail_after(10):
            await one.deploy(write_package(sources, version="1.0"))
            assert await answer(two, "/greeter/") == "1.0"
            async with (
                converges_signalled(follower, monkeypatch) as next_converge,
                anyio.create_task_group() as tasks,
            ):

                async def refused() -> None:
                    with pytest.raises(DeploymentError, match="vetoed by the test"):
                        await one.deploy(write_package(sources, version="2.0"))

                tasks.start_soon(refused)
                await slow.entered.wait()  # two prepares 2.0 on the begin's notice
            await follower.converge()  # the operation ended: a look sees nothing under way
            assert [v.version for v in two.package("greeter").loaded] == ["1.0", "2.0"]
            slow.release.set()
            # The look its end asks for (within the bound; the reconcile is 30 s away).
            await converged_until(next_converge, lambda: len(two.package("greeter").loaded) == 1)
        assert [v.version for v in two.package("greeter").loaded] == ["1.0"]
        assert follower._prepared == {}
        assert await answer(one, "/greeter/") == "1.0"


async def test_a_converge_beside_a_preparation_does_not_let_go_of_the_version_its_dependents_bind_to(
    short_home: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the preparation is binding a dependent to the new version when the
    converge runs: that version stays loaded until the preparation is done, then it and the
    dependent's new instance go."""
    monkeypatch.setenv(RECONCILE_ENV, "30")
    veto = Check(vetoes=version_of("inventory", "2.0"))
    slow = Check(holds=lambda v: v.name == "orders" and bound_to_version("inventory", "2.0")(v))
    one = Deployer(home=short_home, plugins=[veto], entry_points=False)
    two = Deployer(home=short_home, plugins=[slow], entry_points=False)
    async with one.running(), two.running():
        follower = two._running().follower
        with anyio.fail_after(10):
            await one.deploy(inventory(sources, "1.0"))
            await one.deploy(orders(sources))
            async with (
                converges_signalled(follower, monkeypatch) as next_converge,
                anyio.create_task_group() as tasks,
            ):

                async def refused() -> None:
                    with pytest.raises(DeploymentError, match="vetoed by the test"):
                        await one.deploy(inventory(sources, "2.0"))

                tasks.start_soon(refused)
                await slow.entered.wait()  # two binds orders to inventory 2.0
            await follower.converge()
            assert [v.version for v in two.package("inventory").loaded] == ["1.0", "2.0"]
            slow.release.set()
            await converged_until(next_converge, lambda: len(two.package("inventory").loaded) == 1)
        assert [v.version for v in two.package("inventory").loaded] == ["1.0"]
        assert len(two.package("orders").loaded) == 1
        assert (follower._prepared, follower._moves) == ({}, {})
