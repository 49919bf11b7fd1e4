"""A store that stops answering in the middle of a deployment (a database restarting).

The deployment's answer is what failed it, never a half-done operation: the coordinator ends its
operation once the store answers again (`Cluster.end`), and if the store stays away longer than
it tries, its own follower ends the operation later. Either way the package is not left blocked
("another operation is in progress") and the version that served keeps serving.
"""

from __future__ import annotations

import threading
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from conftest import running_on
from packages import write_package
from starlette_hotdeploy import Deployer, DeploymentError, Outcome, StoreError
from starlette_hotdeploy._operation import Operation, Phase, Vote
from starlette_hotdeploy._sqlite_store import SQLiteStore

pytestmark = pytest.mark.anyio

BROKEN = "raise RuntimeError('2.0 is broken at import')\n"


class OutageStore(SQLiteStore):
    """The SQLite store, whose `set_phase` fails while `down` (as a database restarting would):
    for the next `down_for` calls, then it answers again, or until `down` is cleared."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.down = False
        self.down_for: int | None = None
        self.abandoned = threading.Event()

    def set_phase(self, op_id: str, phase: Phase) -> None:
        if self.down:
            if self.down_for is not None:
                self.down_for -= 1
                self.down = self.down_for > 0
            raise StoreError("the store failed: connection refused (the test's outage)")
        super().set_phase(op_id, phase)

    def abandon(self, operation: Operation) -> None:
        super().abandon(operation)
        self.abandoned.set()


def running(tmp_path: Path) -> AbstractAsyncContextManager[tuple[Deployer, OutageStore, httpx.AsyncClient]]:
    return running_on(tmp_path, OutageStore)


async def test_a_failure_while_the_store_is_down_answers_with_its_cause_and_ends_the_operation(
    tmp_path: Path, sources: Path
) -> None:
    async with running(tmp_path) as (deployer, store, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        store.down, store.down_for = True, 2  # the abort fails twice, then goes through
        with pytest.raises(DeploymentError, match=r"2\.0 is broken at import"):
            await deployer.deploy(write_package(sources, version="2.0", app=BROKEN))
        assert not store.down
        assert store.active_operations() == []
        [failed] = [o for o in store.operations() if o.version == "2.0"]
        assert failed.phase is Phase.ABORT
        assert (await client.get("/greeter/")).json()["version"] == "1.0"
        await deployer.deploy(write_package(sources, version="3.0"))  # not "in progress"
        assert (await client.get("/greeter/")).json()["version"] == "3.0"


async def test_a_deployment_whose_record_cannot_be_saved_answers_with_the_stores_error(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The record's first write is the first thing of the unpack step's thread hop: its failure
    # is the answer (not an archive error: the record says so too, though the store may never
    # know), and nothing of the archive was read or kept.
    async with running(tmp_path) as (deployer, store, client):
        await deployer.deploy(write_package(sources, version="1.0"))

        def record(data: Any) -> None:
            raise StoreError("the store failed: connection refused (the test's outage)")

        with monkeypatch.context() as outage:
            outage.setattr(store, "record", record)
            with pytest.raises(StoreError, match="the test's outage"):
                await deployer.deploy(write_package(sources, version="2.0"))
        failed = deployer.history[-1]
        assert failed.outcome is Outcome.FAILED
        assert failed.error is not None
        assert "the test's outage" in failed.error
        assert [a.version for a in store.archives("greeter")] == ["1.0"]
        assert store.active_operations() == []
        assert (await client.get("/greeter/")).json()["version"] == "1.0"


async def test_the_coordinators_own_vote_that_the_store_fails_is_ridden_out(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody waits for the coordinator's own PREPARED vote (it goes with the commit): a store
    # that fails that write does not fail the deployment.
    async with running(tmp_path) as (deployer, store, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        vote = store.vote

        def no_prepared_vote(op_id: str, worker_id: str, cast: Vote, detail: str | None = None) -> None:
            if cast is Vote.PREPARED:
                raise StoreError("the store failed: connection refused (the test's outage)")
            vote(op_id, worker_id, cast, detail)

        monkeypatch.setattr(store, "vote", no_prepared_vote)
        with anyio.fail_after(10):
            record = await deployer.deploy(write_package(sources, version="2.0"))
        assert record.outcome is Outcome.SUCCEEDED
        assert (await client.get("/greeter/")).json()["version"] == "2.0"
        [operation] = [o for o in store.operations() if o.version == "2.0"]
        assert store.votes(operation.id) == {deployer.worker_id: (Vote.CHECKED, None)}  # it went on


async def test_an_operation_the_coordinator_could_not_end_is_ended_by_its_follower(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("starlette_hotdeploy._cluster.STORE_RETRY_FOR", 0.2)
    async with running(tmp_path) as (deployer, store, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        store.down = True
        with pytest.raises(DeploymentError, match=r"2\.0 is broken at import"):
            await deployer.deploy(write_package(sources, version="2.0", app=BROKEN))
        [left_open] = store.active_operations()
        assert left_open.phase is Phase.PREPARE
        assert (await client.get("/greeter/")).json()["version"] == "1.0"

        store.down = False
        with anyio.fail_after(30):  # a guard against a hang, not a wait
            await anyio.to_thread.run_sync(store.abandoned.wait)
        assert store.active_operations() == []
        assert store.operation(left_open.id).phase is Phase.ABORT  # type: ignore[union-attr]
        await deployer.deploy(write_package(sources, version="3.0"))
        assert (await client.get("/greeter/")).json()["version"] == "3.0"
