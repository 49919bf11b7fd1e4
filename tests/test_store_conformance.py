"""Conformance: what every `Store` implementation must do, written against the protocol only.

Each test runs once per implementation: SQLite, and PostgreSQL on a throwaway server (see
tests/postgres.py). To add one, add a factory `home -> Store`: two calls with the same home must
share one state, as two workers do. No processes here: two store objects stand for two workers.

The last section (schema migrations) is SQLite's own: it builds old homes with raw sqlite3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from postgres import schema_url
from starlette_hotdeploy._errors import HotDeployError, IllegalTransition
from starlette_hotdeploy._operation import PHASE_TRANSITIONS, Member, Operation, OperationKind, Phase, Vote
from starlette_hotdeploy._postgres_store import PostgresStore
from starlette_hotdeploy._sqlite_store import _MIGRATIONS, SQLiteStore
from starlette_hotdeploy._store import Store

StoreFactory = Callable[[Path], Store]

Connect = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param == "sqlite":
        return SQLiteStore
    url: str = request.getfixturevalue("postgres_url")
    return lambda home: PostgresStore(schema_url(url, home), home)


@pytest.fixture
def connect(factory: StoreFactory, tmp_path: Path) -> Iterator[Connect]:
    """Opens another store object on the test's home: another worker. All closed at the end."""
    opened: list[Store] = []

    def open_one() -> Store:
        store = factory(tmp_path / "home")
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(connect: Connect) -> Store:
    return connect()


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def activation(
    op_id: str,
    *,
    package: str = "greeter",
    version: str = "2.0",
    coordinator: str = "w1",
    created_at: float | None = None,
) -> Operation:
    return Operation(
        id=op_id,
        package=package,
        kind=OperationKind.ACTIVATE,
        version=version,
        sha256=sha(version),
        lineage=[("1.0", sha("1.0")), (version, sha(version))],
        phase=Phase.PREPARE,
        coordinator=coordinator,
        created_at=time.time() if created_at is None else created_at,
    )


def removal(op_id: str, *, package: str = "greeter", coordinator: str = "w1") -> Operation:
    return Operation(
        id=op_id,
        package=package,
        kind=OperationKind.REMOVE,
        version=None,
        sha256=None,
        lineage=[],
        phase=Phase.PREPARE,
        coordinator=coordinator,
        created_at=time.time(),
    )


def pending_record(
    record_id: str,
    *,
    worker: str | None = "w-dead",
    package: str = "greeter",
    started_at: float | None = None,
    steps: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A deployment record as the deployer writes it while the deployment runs."""
    return {
        "id": record_id,
        "operation": "deploy",
        "package": package,
        "to_version": "2.0",
        "started_at": time.time() if started_at is None else started_at,
        "finished_at": None,
        "outcome": "pending",
        "error": None,
        "worker": worker,
        "steps": [{"name": "unpack", "ok": True}, {"name": "prepare", "ok": None}]
        if steps is None
        else steps,
    }


# Following PHASE_TRANSITIONS from PREPARE: the moves that bring a new operation to each phase.
PATH_TO: dict[Phase, list[Phase]] = {
    Phase.PREPARE: [],
    Phase.COMMIT: [Phase.COMMIT],
    Phase.DONE: [Phase.COMMIT, Phase.DONE],
    Phase.ABORT: [Phase.ABORT],
}


def begun_in(
    store: Store, phase: Phase, op_id: str = "op1", coordinator: str = "w1", **fields: Any
) -> Operation:
    """An operation begun, then moved to `phase` the legal way; as stored."""
    operation = activation(op_id, coordinator=coordinator, **fields)
    assert store.begin_operation(operation, {coordinator}) is None
    for step in PATH_TO[phase]:
        if step is Phase.COMMIT:
            store.commit(operation)
        else:
            store.set_phase(op_id, step)
    stored = store.operation(op_id)
    assert stored is not None
    assert stored.phase is phase
    return stored


# -- archives -----------------------------------------------------------------------------------


def uploaded(store: Store, version: str, *, package: str = "greeter") -> str:
    """An archive saved as an upload saves it (before its prepare); its sha256."""
    store.save_archive(package, version, sha(version), version.encode())
    return sha(version)


def activated(store: Store, version: str, *, package: str = "greeter") -> None:
    """Confirm `version` active, as a commit would."""
    store.set_desired(package, version, sha(version), [(version, sha(version))])


def listed(store: Store, package: str = "greeter") -> list[str]:
    return [a.version for a in store.archives(package)]


def test_a_saved_archive_is_kept_and_indexed(store: Store) -> None:
    path = store.save_archive("greeter", "1.0", sha(b"one"), b"one")
    assert path.read_bytes() == b"one"
    stored = store.archive("greeter", "1.0")
    assert stored is not None
    assert (stored.name, stored.version, stored.sha256, stored.path) == ("greeter", "1.0", sha(b"one"), path)
    assert stored.created_at == pytest.approx(time.time(), abs=60)
    assert stored.activated_at is None  # an upload, not (yet) activated
    assert store.archive("greeter", "9.9") is None
    assert store.archive("other", "1.0") is None


def test_saving_the_same_archive_again_keeps_one_file_and_its_activation(store: Store) -> None:
    path = store.save_archive("greeter", "1.0", sha("1.0"), b"one")
    activated(store, "1.0")
    first = store.archive("greeter", "1.0")
    assert store.save_archive("greeter", "1.0", sha("1.0"), b"one") == path
    assert store.archive("greeter", "1.0") == first
    assert listed(store) == ["1.0"]
    assert path.read_bytes() == b"one"


def test_an_archive_by_version_is_the_newest_unless_a_sha_is_given(store: Store) -> None:
    store.save_archive("greeter", "1.0", sha(b"one"), b"one")
    store.save_archive("greeter", "1.0", sha(b"fixed"), b"fixed")  # same version, new content
    newest = store.archive("greeter", "1.0")
    assert newest is not None
    assert newest.sha256 == sha(b"fixed")
    assert newest.path.read_bytes() == b"fixed"
    first = store.archive("greeter", "1.0", sha(b"one"))
    assert first is not None
    assert first.path.read_bytes() == b"one"
    assert store.archive("greeter", "1.0", sha(b"never saved")) is None


def test_an_upload_is_listed_only_once_a_commit_activated_it(connect: Connect) -> None:
    coordinator, follower = connect(), connect()
    uploaded(coordinator, "1.0")
    uploaded(coordinator, "2.0")
    assert listed(follower) == []  # uploads, not yet activated: nothing to offer
    operation = activation("op1", version="2.0")
    assert coordinator.begin_operation(operation, {"w1"}) is None
    # While it is prepared, the other workers fetch the upload by its sha256.
    preparing = follower.archive("greeter", "2.0", sha("2.0"))
    assert preparing is not None
    assert preparing.activated_at is None
    assert listed(follower) == []
    coordinator.commit(operation)
    assert listed(follower) == ["2.0"]
    committed = follower.archive("greeter", "2.0", sha("2.0"))
    assert committed is not None
    assert committed.activated_at == pytest.approx(time.time(), abs=60)
    activated(coordinator, "1.0")  # set_desired activates too
    assert listed(follower) == ["2.0", "1.0"]


def test_a_set_commits_every_package_of_it_in_one_generation(connect: Connect) -> None:
    coordinator, follower = connect(), connect()
    activated(coordinator, "1.0")
    for name, version in (("greeter", "2.0"), ("orders", "3.0"), ("billing", "1.0")):
        uploaded(coordinator, version, package=name)
    activated(coordinator, "1.0", package="billing")
    members = (
        Member("orders", "3.0", sha("3.0"), [("3.0", sha("3.0"))]),
        Member("billing", None, None, []),  # a set's switch back removes what it installed
    )
    operation = dataclasses.replace(activation("set1"), members=members)
    assert coordinator.begin_operation(operation, {"w1"}) is None
    stored = follower.operation("set1")
    assert stored is not None
    assert stored.members == members
    assert stored.packages == {"greeter", "orders", "billing"}
    # Another operation on any package of the set waits for it, and the other way round.
    assert follower.begin_operation(activation("op2", package="orders"), {"w1", "w2"}) == stored
    assert follower.begin_operation(dataclasses.replace(activation("op3", package="other"), members=(
        Member("billing", "2.0", sha("2.0"), []),)), {"w1", "w2"}) == stored  # fmt: skip
    # Their archives are protected while it is under way, as the package's own are.
    assert follower.prune("orders", 0, set()) == []
    before = follower.generation()
    coordinator.commit(operation)
    desired = follower.desired()
    assert (desired["greeter"].version, desired["orders"].version) == ("2.0", "3.0")
    assert desired["greeter"].generation == desired["orders"].generation == follower.generation()
    assert follower.generation() == before + 1
    assert "billing" not in desired
    assert listed(follower, "orders") == ["3.0"]


def test_an_aborted_or_refused_activation_and_a_removal_activate_nothing(store: Store) -> None:
    uploaded(store, "2.0")
    aborted = begun_in(store, Phase.ABORT, "op1")
    with pytest.raises(IllegalTransition):
        store.commit(aborted)
    gone = removal("op2")
    assert store.begin_operation(gone, {"w1"}) is None
    store.commit(gone)
    assert listed(store) == []


def test_archives_are_listed_by_last_activation_oldest_first_per_package(store: Store) -> None:
    for version in ("1.0", "2.0", "3.0"):
        uploaded(store, version)
    uploaded(store, "1.0", package="inventory")
    for version in ("3.0", "1.0", "2.0"):  # not the upload order
        activated(store, version)
    activated(store, "1.0", package="inventory")
    assert listed(store) == ["3.0", "1.0", "2.0"]
    activated(store, "3.0")  # activated again (a rollback, a switch back): last
    assert listed(store) == ["1.0", "2.0", "3.0"]
    times = [a.activated_at or 0.0 for a in store.archives("greeter")]
    assert 0.0 not in times  # every listed one has its activation time
    assert times == sorted(times)
    assert len(set(times)) == 3
    assert listed(store, "inventory") == ["1.0"]
    assert listed(store, "nothing") == []


def test_prune_keeps_the_protected_then_the_most_recently_activated(store: Store) -> None:
    for n in range(5):
        uploaded(store, f"{n}.0")
    for n in (0, 1, 2, 3, 4, 1):  # 1.0 activated again: it is among the most recent
        activated(store, f"{n}.0")
    uploaded(store, "5.0")  # an upload under way: neither counted nor pruned (not stale)
    uploaded(store, "0.0", package="inventory")
    activated(store, "0.0", package="inventory")
    removed = store.prune("greeter", keep=3, protect={("0.0", sha("0.0"))})
    assert [a.version for a in removed] == ["2.0", "3.0"]  # oldest activation first
    assert all(not a.path.exists() for a in removed)
    # The protected one counts toward `keep`: never more than `keep` are offered.
    assert listed(store) == ["0.0", "4.0", "1.0"]
    assert all(a.path.exists() for a in store.archives("greeter"))
    assert store.archive("greeter", "5.0", sha("5.0")) is not None
    assert listed(store, "inventory") == ["0.0"]  # another package: untouched
    assert store.prune("greeter", keep=10, protect=set()) == []


def test_prune_keeps_every_protected_one_even_beyond_keep(store: Store) -> None:
    for version in ("1.0", "2.0", "3.0"):
        uploaded(store, version)
        activated(store, version)
    protect = {("1.0", sha("1.0")), ("2.0", sha("2.0"))}
    assert [a.version for a in store.prune("greeter", keep=1, protect=protect)] == ["3.0"]
    assert listed(store) == ["1.0", "2.0"]


def test_prune_deletes_never_activated_uploads_once_stale(store: Store) -> None:
    uploaded(store, "1.0")
    activated(store, "1.0")
    failed = uploaded(store, "2.0")
    uploaded(store, "3.0")
    assert store.prune("greeter", keep=5, protect=set()) == []  # by default: an hour's grace
    # stale_after=-1: everything saved so far is stale, without a test that sleeps.
    removed = store.prune("greeter", keep=5, protect={("3.0", sha("3.0"))}, stale_after=-1)
    assert [(a.version, a.sha256) for a in removed] == [("2.0", failed)]
    assert not removed[0].path.exists()
    assert store.archive("greeter", "2.0") is None
    assert store.archive("greeter", "3.0") is not None  # protected: never deleted
    assert listed(store) == ["1.0"]  # an activated one is never stale


def test_prune_spares_what_an_operation_under_way_activates(store: Store) -> None:
    for version in ("1.0", "2.0"):
        uploaded(store, version)
        activated(store, version)
    uploaded(store, "3.0")
    rollback = activation("op1", version="1.0")
    deploy = activation("op2", version="3.0", package="greeter")
    assert store.begin_operation(rollback, {"w1"}) is None
    store.set_phase("op1", Phase.ABORT)
    assert store.begin_operation(deploy, {"w1"}) is None
    # 3.0 is being prepared: its archive stays whatever its age. 1.0's operation ended.
    removed = store.prune("greeter", keep=1, protect=set(), stale_after=-1)
    assert [a.version for a in removed] == ["1.0"]
    assert store.archive("greeter", "3.0", sha("3.0")) is not None


def test_discard_deletes_only_a_never_activated_archive(store: Store) -> None:
    uploaded(store, "1.0")
    activated(store, "1.0")
    failed = uploaded(store, "2.0")
    path = store.save_archive("greeter", "2.0", failed, b"2.0")
    assert store.discard_archive("greeter", "1.0", sha("1.0")) is False  # active once: it stays
    assert listed(store) == ["1.0"]
    assert store.discard_archive("greeter", "2.0", failed) is True
    assert store.archive("greeter", "2.0") is None
    assert not path.exists()
    assert store.discard_archive("greeter", "2.0", failed) is False  # already gone
    assert store.discard_archive("greeter", "9.0", sha("9.0")) is False
    assert listed(store) == ["1.0"]


def test_discard_spares_an_upload_an_operation_under_way_activates(connect: Connect) -> None:
    """Two workers got the same archive: one's failure must not delete what the other prepares."""
    failing, preparing = connect(), connect()
    uploaded(failing, "2.0")
    operation = activation("op1", coordinator="w2")
    assert preparing.begin_operation(operation, {"w2"}) is None
    assert failing.discard_archive("greeter", "2.0", sha("2.0")) is False
    assert preparing.archive("greeter", "2.0", sha("2.0")) is not None
    preparing.set_phase("op1", Phase.ABORT)  # its own failure: aborted first, then discarded
    assert preparing.discard_archive("greeter", "2.0", sha("2.0")) is True


# -- desired state and generation ----------------------------------------------------------------


def test_the_generation_grows_by_one_on_every_change(store: Store) -> None:
    assert store.generation() == 0
    assert store.desired() == {}
    assert store.set_desired("inventory", "3.0", sha("3.0"), [("3.0", sha("3.0"))]) == 1
    assert store.set_desired("greeter", "1.0", sha("1.0"), [("1.0", sha("1.0"))]) == 2
    lineage = [("1.0", sha("1.0")), ("2.0", sha("2.0"))]
    assert store.set_desired("greeter", "2.0", sha("2.0"), lineage) == 3
    desired = store.desired()
    assert list(desired) == ["greeter", "inventory"]
    greeter = desired["greeter"]
    assert (greeter.name, greeter.version, greeter.sha256, greeter.generation) == (
        "greeter",
        "2.0",
        sha("2.0"),
        3,
    )
    assert greeter.lineage == lineage
    assert desired["inventory"].generation == 1
    assert store.remove_desired("inventory") == 4
    assert list(store.desired()) == ["greeter"]
    assert store.generation() == 4


def test_the_desired_state_survives_a_reopen_and_is_shared(connect: Connect) -> None:
    first = connect()
    first.set_desired("greeter", "1.0", sha("1.0"), [("1.0", sha("1.0"))])
    other = connect()
    assert other.desired()["greeter"].version == "1.0"
    first.close()
    reopened = connect()
    assert reopened.generation() == 1
    assert reopened.desired()["greeter"].lineage == [("1.0", sha("1.0"))]


def test_commit_changes_the_desired_state_and_the_phase_in_one_step(connect: Connect) -> None:
    coordinator, follower = connect(), connect()
    operation = activation("op1")
    assert coordinator.begin_operation(operation, {"w1"}) is None
    assert follower.desired() == {}  # preparing changes nothing
    generation = coordinator.commit(operation)
    assert generation == 1 == follower.generation()
    greeter = follower.desired()["greeter"]
    assert (greeter.version, greeter.sha256, greeter.lineage, greeter.generation) == (
        "2.0",
        sha("2.0"),
        operation.lineage,
        1,
    )
    committed = follower.operation("op1")
    assert committed is not None
    assert committed.phase is Phase.COMMIT

    coordinator.set_phase("op1", Phase.DONE)
    gone = removal("op2")
    assert coordinator.begin_operation(gone, {"w1"}) is None
    assert coordinator.commit(gone) == 2
    assert follower.desired() == {}
    assert follower.generation() == 2


def test_a_refused_commit_changes_neither_the_desired_state_nor_the_generation(store: Store) -> None:
    operation = begun_in(store, Phase.ABORT)
    with pytest.raises(IllegalTransition):
        store.commit(operation)
    assert store.desired() == {}
    assert store.generation() == 0
    aborted = store.operation("op1")
    assert aborted is not None
    assert aborted.phase is Phase.ABORT


def canary_of(op_id: str, version: str = "2.0") -> tuple[Operation, dict[str, Any]]:
    operation = dataclasses.replace(activation(op_id, version=version), kind=OperationKind.CANARY)
    return operation, {"operation": op_id, "version": version, "sha256": sha(version), "weight": 500}


def test_a_canary_is_committed_beside_the_desired_version_and_shared(connect: Connect) -> None:
    coordinator, follower = connect(), connect()
    coordinator.set_desired("greeter", "1.0", sha("1.0"), [("1.0", sha("1.0"))])
    operation, canary = canary_of("op1")
    assert coordinator.begin_operation(operation, {"w1"}) is None
    assert follower.desired()["greeter"].canary is None
    generation = coordinator.commit(operation, canary)
    greeter = follower.desired()["greeter"]
    assert (greeter.version, greeter.canary, greeter.generation) == ("1.0", canary, generation)
    assert follower.generation() == generation
    # A weight change moves the generation (the followers' cheap look sees it).
    assert coordinator.set_canary("greeter", {**canary, "weight": 2500}) == generation + 1
    assert follower.desired()["greeter"].canary == {**canary, "weight": 2500}
    # Activating a version ends the canary (its promotion, or any other activation).
    coordinator.set_phase("op1", Phase.DONE)
    coordinator.set_desired("greeter", "2.0", sha("2.0"), [("1.0", sha("1.0")), ("2.0", sha("2.0"))])
    assert follower.desired()["greeter"].canary is None
    assert coordinator.set_canary("greeter", canary) > 0
    assert coordinator.set_canary("greeter", None) > 0
    assert follower.desired()["greeter"].canary is None


def test_a_canary_needs_a_desired_version_and_its_state(store: Store) -> None:
    with pytest.raises(HotDeployError, match="no desired version"):
        store.set_canary("greeter", {"weight": 1})
    operation, canary = canary_of("op1")
    assert store.begin_operation(operation, {"w1"}) is None
    with pytest.raises(HotDeployError, match="a canary is committed with its state"):
        store.commit(operation, canary)  # no desired version beside it
    store.set_desired("greeter", "1.0", sha("1.0"), [("1.0", sha("1.0"))])
    with pytest.raises(HotDeployError, match="a canary is committed with its state"):
        store.commit(operation)
    assert store.desired()["greeter"].canary is None


def test_an_abandoned_canary_ends_with_its_operation(store: Store) -> None:
    store.set_desired("greeter", "1.0", sha("1.0"), [("1.0", sha("1.0"))])
    operation, canary = canary_of("d1-canary")  # a canary's operation: its record's id + "-canary"
    store.begin_operation(operation, {"w1"})
    store.record(pending_record("d1"))
    store.commit(operation, canary)
    before = store.generation()
    store.abandon(operation)
    assert store.desired()["greeter"].canary is None
    assert store.desired()["greeter"].version == "1.0"  # the stable version was never replaced
    assert store.generation() == before + 1
    abandoned = store.operation("d1-canary")
    assert abandoned is not None
    assert abandoned.phase is Phase.DONE
    record = store.deployment("d1")
    assert record is not None
    assert record["outcome"] == "interrupted"


# -- history --------------------------------------------------------------------------------------


def test_a_record_is_inserted_then_replaced(store: Store) -> None:
    record = pending_record("d1")
    store.record(record)
    assert store.deployment("d1") == record
    finished = dict(record, outcome="succeeded", finished_at=time.time())
    store.record(finished)
    assert store.deployment("d1") == finished
    assert [r["id"] for r in store.history()] == ["d1"]


def test_history_is_newest_first_with_a_limit_and_a_package_filter(store: Store) -> None:
    for n, package in enumerate(["a", "b", "a", "c"]):
        store.record({"id": f"d{n}", "package": package, "started_at": 100.0 + n, "outcome": "succeeded"})
    assert [r["id"] for r in store.history()] == ["d3", "d2", "d1", "d0"]
    assert [r["id"] for r in store.history(limit=2)] == ["d3", "d2"]
    assert [r["id"] for r in store.history(package="a")] == ["d2", "d0"]
    assert [r["id"] for r in store.history(package="a", limit=1)] == ["d2"]
    assert store.history(package="nothing") == []


def test_a_deployment_by_id(store: Store) -> None:
    store.record({"id": "d0", "package": "a", "started_at": 1.0, "outcome": "succeeded", "steps": []})
    store.record({"id": "d1", "package": None, "started_at": 2.0, "outcome": "failed"})
    assert store.deployment("d0") == {
        "id": "d0",
        "package": "a",
        "started_at": 1.0,
        "outcome": "succeeded",
        "steps": [],
    }
    assert store.deployment("d1") == {"id": "d1", "package": None, "started_at": 2.0, "outcome": "failed"}
    assert store.deployment("nope") is None


# -- finishing the records of a worker that stopped -----------------------------------------------


@pytest.mark.parametrize(
    ("phase", "outcome", "after"),
    [
        (None, "interrupted", None),  # stopped before it began the operation
        (Phase.PREPARE, "interrupted", Phase.ABORT),  # under way: it is abandoned as well
        (Phase.ABORT, "interrupted", Phase.ABORT),
        (Phase.COMMIT, "succeeded", Phase.DONE),  # committed: the change stands
        (Phase.DONE, "succeeded", Phase.DONE),
    ],
)
def test_an_orphaned_pending_record_follows_its_operation(
    store: Store, phase: Phase | None, outcome: str, after: Phase | None
) -> None:
    if phase is not None:
        begun_in(store, phase, "d1", coordinator="w-dead")
    store.record(pending_record("d1"))
    assert store.finish_orphaned_records({"w-live"}) == 1
    record = store.deployment("d1")
    assert record is not None
    assert record["outcome"] == outcome
    assert record["finished_at"] == pytest.approx(time.time(), abs=60)
    consequence = "the change had been committed" if outcome == "succeeded" else "nothing changed"
    assert record["error"] == f"worker w-dead stopped during step prepare; {consequence}"
    operation = store.operation("d1")
    assert (operation.phase if operation is not None else None) is after
    assert store.finish_orphaned_records({"w-live"}) == 0  # finished: not found again


def test_an_interrupted_record_cannot_be_committed_afterwards(connect: Connect) -> None:
    """A coordinator wrongly thought dead finds its operation aborted: its commit is refused."""
    coordinator, other = connect(), connect()
    operation = activation("d1", coordinator="w-slow")
    coordinator.begin_operation(operation, {"w-slow"})
    coordinator.record(pending_record("d1", worker="w-slow"))
    assert other.finish_orphaned_records({"w-other"}) == 1
    with pytest.raises(IllegalTransition):
        coordinator.commit(operation)
    assert other.desired() == {}


def test_records_of_live_workers_and_without_a_worker_are_left_alone(store: Store) -> None:
    live = pending_record("live", worker="w-live")
    anonymous = pending_record("anonymous", worker=None)
    store.record(live)
    store.record(anonymous)
    assert store.finish_orphaned_records({"w-live"}) == 0
    assert store.deployment("live") == live
    assert store.deployment("anonymous") == anonymous


def test_a_finished_record_is_left_alone(store: Store) -> None:
    finished = dict(pending_record("d1"), outcome="failed", finished_at=123.0, error="boom")
    store.record(finished)
    assert store.finish_orphaned_records(set()) == 0
    assert store.deployment("d1") == finished


def test_an_unfinished_record_keeps_an_outcome_other_than_pending(store: Store) -> None:
    store.record(dict(pending_record("failed"), outcome="failed", error="boom"))
    store.record(dict(pending_record("rolled back"), outcome="rolled_back"))
    assert store.finish_orphaned_records(set()) == 2
    failed = store.deployment("failed")
    assert failed is not None
    assert (failed["outcome"], failed["error"]) == ("failed", "boom")  # its own error is kept
    assert failed["finished_at"] is not None
    rolled_back = store.deployment("rolled back")
    assert rolled_back is not None
    assert rolled_back["outcome"] == "rolled_back"
    assert rolled_back["error"] == "worker w-dead stopped during step prepare; nothing changed"


@pytest.mark.parametrize(
    ("steps", "where"),
    [
        (
            [{"name": "unpack", "ok": True}, {"name": "start", "ok": None}, {"name": "x", "ok": True}],
            "during step start",
        ),
        ([{"name": "unpack", "ok": True}, {"name": "checks", "ok": False}], "during step checks"),
        ([], "before its first step"),
    ],
)
def test_the_error_names_the_worker_and_the_step_it_stopped_in(
    store: Store, steps: list[dict[str, Any]], where: str
) -> None:
    store.record(pending_record("d1", worker="host:123:abc", steps=steps))
    store.finish_orphaned_records(set())
    record = store.deployment("d1")
    assert record is not None
    assert record["error"] == f"worker host:123:abc stopped {where}; nothing changed"
    assert record["steps"] == steps


# -- workers --------------------------------------------------------------------------------------


def test_a_heartbeat_registers_then_refreshes_a_worker(store: Store) -> None:
    store.heartbeat("w1", {})
    [first] = store.workers()
    time.sleep(0.01)
    store.heartbeat("w1", {"greeter": "2.0"})
    [again] = store.workers()
    assert again.id == "w1"
    assert again.started_at == first.started_at
    assert again.heartbeat_at > first.heartbeat_at
    assert again.serving == {"greeter": "2.0"}
    assert again.pid > 0


def test_workers_are_listed_oldest_first_and_filtered_by_heartbeat_age(connect: Connect) -> None:
    first, second = connect(), connect()
    first.heartbeat("old", {"greeter": "1.0"})
    time.sleep(0.3)
    second.heartbeat("new", {})
    assert [w.id for w in first.workers()] == ["old", "new"]
    assert [w.id for w in first.workers(max_age=0.2)] == ["new"]
    assert [w.id for w in first.workers(max_age=60)] == ["old", "new"]


def test_forget_workers_drops_only_the_silent_ones(store: Store) -> None:
    store.heartbeat("silent", {})
    time.sleep(0.3)
    store.heartbeat("talking", {})
    store.forget_workers(0.2)
    assert [w.id for w in store.workers()] == ["talking"]


def test_remove_worker_unregisters_only_that_worker(store: Store) -> None:
    store.heartbeat("w1", {})
    store.heartbeat("w2", {})
    store.remove_worker("w1")
    store.remove_worker("never registered")
    assert [w.id for w in store.workers()] == ["w2"]


# -- cluster operations ---------------------------------------------------------------------------


def test_a_begun_operation_is_recorded_as_given(connect: Connect) -> None:
    coordinator, follower = connect(), connect()
    operation = activation("op1")
    assert coordinator.begin_operation(operation, {"w1"}) is None
    assert follower.operation("op1") == operation
    assert follower.operation("nope") is None
    gone = removal("op2", package="inventory")
    assert coordinator.begin_operation(gone, {"w1"}) is None  # another package: independent
    stored = follower.operation("op2")
    assert stored == gone
    assert stored is not None
    assert stored.kind is OperationKind.REMOVE


def test_an_operation_begins_in_its_prepare_phase(store: Store) -> None:
    late = dataclasses.replace(activation("op1"), phase=Phase.COMMIT)
    with pytest.raises(IllegalTransition):
        store.begin_operation(late, {"w1"})
    assert store.operation("op1") is None


def test_a_second_operation_on_a_package_is_refused_while_the_first_coordinator_lives(
    connect: Connect,
) -> None:
    first, second = connect(), connect()
    running = activation("op1", coordinator="w1")
    assert first.begin_operation(running, {"w1"}) is None
    assert second.begin_operation(activation("op2", coordinator="w2"), {"w1", "w2"}) == running
    assert second.operation("op2") is None
    assert [op.id for op in second.active_operations()] == ["op1"]


def test_a_dead_coordinators_operation_is_abandoned_by_the_next_one(connect: Connect) -> None:
    first, second = connect(), connect()
    first.begin_operation(activation("op1", coordinator="w1"), {"w1"})
    first.record(pending_record("op1", worker="w1"))
    assert second.begin_operation(activation("op2", coordinator="w2"), {"w2"}) is None
    abandoned = second.operation("op1")
    assert abandoned is not None
    assert abandoned.phase is Phase.ABORT
    record = second.deployment("op1")
    assert record is not None
    assert record["outcome"] == "interrupted"
    assert record["error"] == "worker w1 stopped during step prepare; nothing changed"
    assert [op.id for op in second.active_operations()] == ["op2"]


def test_abandon_before_the_commit_aborts_and_interrupts_the_record(store: Store) -> None:
    operation = begun_in(store, Phase.PREPARE, coordinator="w-dead")
    store.record(pending_record("op1"))
    store.abandon(operation)
    abandoned = store.operation("op1")
    assert abandoned is not None
    assert abandoned.phase is Phase.ABORT
    record = store.deployment("op1")
    assert record is not None
    assert (record["outcome"], record["error"]) == (
        "interrupted",
        "worker w-dead stopped during step prepare; nothing changed",
    )
    assert record["finished_at"] is not None
    assert store.desired() == {}


def test_abandon_after_the_commit_finishes_and_the_change_stands(store: Store) -> None:
    operation = begun_in(store, Phase.COMMIT, coordinator="w-dead")
    store.record(
        pending_record("op1", steps=[{"name": "commit", "ok": True}, {"name": "converge", "ok": None}])
    )
    store.abandon(operation)
    done = store.operation("op1")
    assert done is not None
    assert done.phase is Phase.DONE
    record = store.deployment("op1")
    assert record is not None
    assert (record["outcome"], record["error"]) == (
        "succeeded",
        "worker w-dead stopped during step converge; the change had been committed",
    )
    assert store.desired()["greeter"].version == "2.0"


@pytest.mark.parametrize("phase", [Phase.DONE, Phase.ABORT])
def test_abandoning_a_finished_operation_changes_nothing(store: Store, phase: Phase) -> None:
    operation = begun_in(store, phase)
    finished = dict(pending_record("op1"), outcome="failed", finished_at=1.0, error="boom")
    store.record(finished)
    store.abandon(operation)
    still = store.operation("op1")
    assert still is not None
    assert still.phase is phase
    assert store.deployment("op1") == finished


def test_active_operations_are_those_in_prepare_or_commit(store: Store) -> None:
    for phase in Phase:
        begun_in(store, phase, f"op-{phase}", package=f"p-{phase}")
    active = store.active_operations()
    assert [op.id for op in active] == ["op-prepare", "op-commit"]
    assert [op.phase for op in active] == [Phase.PREPARE, Phase.COMMIT]
    assert all(isinstance(op.phase, Phase) and isinstance(op.kind, OperationKind) for op in active)
    assert [op.id for op in store.operations()] == [f"op-{phase}" for phase in Phase]


def test_operations_since_a_time_oldest_first(store: Store) -> None:
    now = time.time()
    for n, created_at in enumerate([now - 30, now - 20, now - 10]):
        operation = activation(f"op{n}", package=f"p{n}", created_at=created_at)
        store.begin_operation(operation, {"w1"})
    assert [op.id for op in store.operations()] == ["op0", "op1", "op2"]
    assert [op.id for op in store.operations(since=now - 20)] == ["op1", "op2"]
    assert store.operations(since=now) == []


def test_prune_operations_removes_only_old_finished_ones_and_their_votes(store: Store) -> None:
    old = time.time() - 7200
    cases = {
        "old-done": Phase.DONE,
        "old-abort": Phase.ABORT,
        "old-prepare": Phase.PREPARE,
        "old-commit": Phase.COMMIT,
    }
    for op_id, phase in cases.items():
        begun_in(store, phase, op_id, package=op_id, created_at=old)
    recent = begun_in(store, Phase.DONE, "recent-done")
    for op_id in [*cases, recent.id]:
        store.vote(op_id, "w2", Vote.PREPARED)
    store.prune_operations(3600)
    assert sorted(op.id for op in store.operations()) == ["old-commit", "old-prepare", "recent-done"]
    assert store.votes("old-done") == {}
    assert store.votes("old-abort") == {}
    for op_id in ("old-commit", "old-prepare", "recent-done"):
        assert store.votes(op_id) == {"w2": (Vote.PREPARED, None)}


# -- votes ----------------------------------------------------------------------------------------


def test_votes_are_kept_per_worker_and_replaced(connect: Connect) -> None:
    coordinator, follower = connect(), connect()
    coordinator.begin_operation(activation("op1"), {"w1"})
    coordinator.begin_operation(activation("op2", package="other"), {"w1"})
    follower.vote("op1", "w2", Vote.PREPARED)
    follower.vote("op1", "w3", Vote.FAILED, "ImportError: no module named greeter")
    coordinator.vote("op2", "w2", Vote.FAILED, "elsewhere")
    assert coordinator.votes("op1") == {
        "w2": (Vote.PREPARED, None),
        "w3": (Vote.FAILED, "ImportError: no module named greeter"),
    }
    follower.vote("op1", "w2", Vote.SWITCHED)
    votes = coordinator.votes("op1")
    assert votes["w2"] == (Vote.SWITCHED, None)
    assert all(isinstance(vote, Vote) for vote, _ in votes.values())
    assert coordinator.votes("op2") == {"w2": (Vote.FAILED, "elsewhere")}
    assert coordinator.votes("nope") == {}


@pytest.mark.parametrize("vote", list(Vote))
def test_every_vote_round_trips(store: Store, vote: Vote) -> None:
    store.begin_operation(activation("op1"), {"w1"})
    store.vote("op1", "w1", vote, "detail")
    [(got, detail)] = store.votes("op1").values()
    assert got is vote
    assert detail == "detail"


# -- phases: only the moves PHASE_TRANSITIONS allows -----------------------------------------------

LEGAL = [(a, b) for a in Phase for b in sorted(PHASE_TRANSITIONS[a])]
ILLEGAL = [(a, b) for a in Phase for b in Phase if b is not a and b not in PHASE_TRANSITIONS[a]]


@pytest.mark.parametrize(("current", "asked"), LEGAL, ids=[f"{a}-{b}" for a, b in LEGAL])
def test_a_legal_phase_move_passes(store: Store, current: Phase, asked: Phase) -> None:
    begun_in(store, current)
    store.set_phase("op1", asked)
    moved = store.operation("op1")
    assert moved is not None
    assert moved.phase is asked


@pytest.mark.parametrize(("current", "asked"), ILLEGAL, ids=[f"{a}-{b}" for a, b in ILLEGAL])
def test_an_illegal_phase_move_raises_and_changes_nothing(store: Store, current: Phase, asked: Phase) -> None:
    begun_in(store, current)
    with pytest.raises(IllegalTransition) as raised:
        store.set_phase("op1", asked)
    message = str(raised.value)
    assert "op1" in message
    assert str(current) in message
    assert str(asked) in message
    unchanged = store.operation("op1")
    assert unchanged is not None
    assert unchanged.phase is current


@pytest.mark.parametrize("phase", list(Phase))
def test_setting_the_phase_an_operation_has_is_a_no_op(store: Store, phase: Phase) -> None:
    begun_in(store, phase)
    store.set_phase("op1", phase)
    same = store.operation("op1")
    assert same is not None
    assert same.phase is phase


def test_the_phase_of_an_unknown_operation_cannot_be_set(store: Store) -> None:
    with pytest.raises(IllegalTransition, match="nope"):
        store.set_phase("nope", Phase.DONE)


@pytest.mark.parametrize("phase", [Phase.COMMIT, Phase.DONE, Phase.ABORT])
def test_only_an_operation_in_prepare_can_be_committed(store: Store, phase: Phase) -> None:
    operation = begun_in(store, phase)
    generation = store.generation()
    with pytest.raises(IllegalTransition) as raised:
        store.commit(operation)
    assert "op1" in str(raised.value)
    assert str(phase) in str(raised.value)
    assert store.generation() == generation
    unchanged = store.operation("op1")
    assert unchanged is not None
    assert unchanged.phase is phase


def test_an_unknown_operation_cannot_be_committed(store: Store) -> None:
    with pytest.raises(IllegalTransition):
        store.commit(activation("never begun"))
    assert store.generation() == 0


# -- change notification --------------------------------------------------------------------------


def test_data_version_changes_when_another_store_commits(connect: Connect) -> None:
    watcher, writer = connect(), connect()
    before = watcher.data_version()
    assert watcher.data_version() == before  # nothing happened: a poll sees no change
    writer.heartbeat("w2", {})
    after = watcher.data_version()
    assert after != before
    writer.set_desired("greeter", "1.0", sha("1.0"), [("1.0", sha("1.0"))])
    assert watcher.data_version() != after


# -- SQLite: schema migrations ---------------------------------------------------------------------

# The schema every home had before migrations were versioned (user_version 0): migration 1.
SCHEMA_1 = """
CREATE TABLE archives (
    name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
    path TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (name, version, sha256)
);
CREATE TABLE desired (
    name TEXT PRIMARY KEY, version TEXT NOT NULL, sha256 TEXT NOT NULL,
    lineage TEXT NOT NULL, generation INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE history (
    id TEXT PRIMARY KEY, package TEXT, started_at REAL NOT NULL, record TEXT NOT NULL
);
CREATE INDEX history_started ON history (started_at);
CREATE TABLE workers (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL, serving TEXT NOT NULL
);
CREATE TABLE operations (
    id TEXT PRIMARY KEY, package TEXT NOT NULL, kind TEXT NOT NULL,
    version TEXT, sha256 TEXT, lineage TEXT, phase TEXT NOT NULL,
    coordinator TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX operations_phase ON operations (phase);
CREATE TABLE votes (
    operation TEXT NOT NULL, worker TEXT NOT NULL, vote TEXT NOT NULL, detail TEXT,
    PRIMARY KEY (operation, worker)
);
"""

OLD_FINISHED = (
    '{"id": "d0", "package": "greeter", "started_at": 1.0, "finished_at": 2.0, "outcome": "succeeded"}'
)
OLD_PENDING = (
    '{"id": "d1", "package": "greeter", "started_at": 3.0, "finished_at": null, "outcome": "pending",'
    ' "worker": "w-old", "steps": [{"name": "unpack", "ok": null}]}'
)


def make_schema_1_home(home: Path) -> None:
    home.mkdir(parents=True)
    db = sqlite3.connect(home / "state.db")
    db.executescript(SCHEMA_1)
    sha_1 = sha("1.0")
    db.execute("INSERT INTO archives VALUES ('greeter', '1.0', ?, 'archives/greeter/1.0.zip', 1.0)", (sha_1,))
    db.execute(
        "INSERT INTO desired VALUES ('greeter', '1.0', ?, ?, 7, 1.0)", (sha_1, f'[["1.0", "{sha_1}"]]')
    )
    db.execute("INSERT INTO meta VALUES ('generation', 7)")
    db.execute("INSERT INTO history VALUES ('d0', 'greeter', 1.0, ?)", (OLD_FINISHED,))
    db.execute("INSERT INTO history VALUES ('d1', 'greeter', 3.0, ?)", (OLD_PENDING,))
    db.execute("INSERT INTO workers VALUES ('w-old', 42, 1.0, 2.0, '{\"greeter\": \"1.0\"}')")
    db.execute(
        "INSERT INTO operations VALUES ('d0', 'greeter', 'activate', '1.0', ?, ?, 'done', 'w-old', 1.0)",
        (sha_1, f'[["1.0", "{sha_1}"]]'),
    )
    db.execute("INSERT INTO votes VALUES ('d0', 'w-old', 'switched', NULL)")
    db.commit()
    db.close()


def schema_of(home: Path) -> tuple[int, list[tuple[str, str]], dict[str, list[str]]]:
    """user_version, every table and index definition, every table's columns."""
    db = sqlite3.connect(home / "state.db")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        objects = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {t: [row[1] for row in db.execute(f"PRAGMA table_info({t})")] for t in tables}
        return version, objects, columns
    finally:
        db.close()


def test_a_schema_1_home_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_schema_1_home(home)
    store = SQLiteStore(home)
    try:
        version, _, columns = schema_of(home)
        assert version == 5
        assert columns["desired"][-1] == "canary"
        assert columns["operations"][-1] == "members"
        assert columns["history"] == ["id", "package", "started_at", "record", "worker", "finished_at"]
        assert columns["archives"] == ["name", "version", "sha256", "path", "created_at", "activated_at"]
        assert store.generation() == 7
        assert store.desired()["greeter"].lineage == [("1.0", sha("1.0"))]
        assert [(a.version, a.path) for a in store.archives("greeter")] == [
            ("1.0", home / "archives/greeter/1.0.zip")
        ]
        assert [r["id"] for r in store.history()] == ["d1", "d0"]
        assert [(w.id, w.serving) for w in store.workers()] == [("w-old", {"greeter": "1.0"})]
        old = store.operation("d0")
        assert old is not None
        assert (old.kind, old.phase) == (OperationKind.ACTIVATE, Phase.DONE)
        assert store.votes("d0") == {"w-old": (Vote.SWITCHED, None)}
        # The new columns were filled from the old records: the pending one is found, the
        # finished one is not.
        assert store.finish_orphaned_records(set()) == 1
        interrupted = store.deployment("d1")
        assert interrupted is not None
        assert (interrupted["outcome"], interrupted["error"]) == (
            "interrupted",
            "worker w-old stopped during step unpack; nothing changed",
        )
    finally:
        store.close()


def add_archive_evidence(home: Path) -> None:
    """Beside make_schema_1_home's 1.0 (active, and activated by operation d0): what an old home
    holds of archives activated before (lineage, a record, an operation) and of failed ones."""
    db = sqlite3.connect(home / "state.db")
    for version, created_at in (("0.5", 0.5), ("0.7", 0.7), ("0.9", 0.9), ("2.0", 2.0), ("3.0", 3.0)):
        db.execute(
            "INSERT INTO archives VALUES ('greeter', ?, ?, ?, ?)",
            (version, sha(version), f"archives/greeter/{version}.zip", created_at),
        )
    lineage = f'[["0.9", "{sha("0.9")}"], ["1.0", "{sha("1.0")}"]]'
    db.execute("UPDATE desired SET lineage = ?, updated_at = 10.0 WHERE name = 'greeter'", (lineage,))
    for record_id, version, outcome, started_at in (
        ("d2", "0.5", "succeeded", 5.0),  # then replaced, and out of the lineage
        ("d3", "2.0", "failed", 6.0),  # a failed upload: not activated
        ("d4", "0.9", "failed", 9.0),  # failed when deployed again: its activation still counts
    ):
        record = {"id": record_id, "package": "greeter", "started_at": started_at, "outcome": outcome}
        record.update(to_version=version, sha256=sha(version))
        db.execute(
            "INSERT INTO history (id, package, started_at, record) VALUES (?, 'greeter', ?, ?)",
            (record_id, started_at, json.dumps(record)),
        )
    for op_id, version, phase, created_at in (("d5", "0.7", "done", 7.0), ("d6", "3.0", "abort", 8.0)):
        db.execute(
            "INSERT INTO operations VALUES (?, 'greeter', 'activate', ?, ?, '[]', ?, 'w-old', ?)",
            (op_id, version, sha(version), phase, created_at),
        )
    db.commit()
    db.close()


def make_schema_2_home(home: Path) -> None:
    """A home as the release before activations were kept left it: migrations 1 and 2 applied."""
    make_schema_1_home(home)
    db = sqlite3.connect(home / "state.db", isolation_level=None)
    for migration in _MIGRATIONS[:2]:
        migration(db)
    db.execute("PRAGMA user_version = 2")
    db.close()


def test_archives_of_a_schema_2_home_count_as_activated_where_a_row_proves_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_schema_2_home(home)
    add_archive_evidence(home)
    store = SQLiteStore(home)
    try:
        by_version = {a.version: a.activated_at for a in store.archives("greeter")}
        # The lineage (the active one at its desired row's update, the one before it at least at
        # its upload), a succeeded record, a committed operation; by the latest proof.
        assert by_version == {"0.9": 0.9, "0.5": 5.0, "0.7": 7.0, "1.0": 10.0}
        assert listed(store) == ["0.9", "0.5", "0.7", "1.0"]
        # A failed record and an aborted operation prove nothing: not offered, still fetchable,
        # and pruned as stale failed uploads (saved long ago).
        assert store.archive("greeter", "2.0", sha("2.0")) is not None
        removed = store.prune("greeter", keep=5, protect=set())
        assert sorted(a.version for a in removed) == ["2.0", "3.0"]
        assert listed(store) == ["0.9", "0.5", "0.7", "1.0"]
    finally:
        store.close()


def test_opening_a_migrated_home_again_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    SQLiteStore(home).close()
    migrated = schema_of(home)
    assert migrated[0] == 5
    store = SQLiteStore(home)
    store.record(pending_record("d1"))
    store.close()
    assert schema_of(home) == migrated
    reopened = SQLiteStore(home)
    try:
        assert [r["id"] for r in reopened.history()] == ["d1"]
    finally:
        reopened.close()


def test_a_new_home_opened_by_several_workers_at_once_is_migrated_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    start = threading.Barrier(6)
    stores: list[SQLiteStore] = []
    errors: list[BaseException] = []

    def open_home() -> None:
        start.wait()
        try:
            stores.append(SQLiteStore(home))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_home) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert len(stores) == 6
        stores[0].record(pending_record("d1"))
        assert all(s.deployment("d1") is not None for s in stores)
        assert schema_of(home)[0] == 5
    finally:
        for store in stores:
            store.close()


def test_a_home_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    SQLiteStore(home).close()
    db = sqlite3.connect(home / "state.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(HotDeployError, match="schema version 99"):
        SQLiteStore(home)
