"""The retirement of a replaced version and a warm switch back to it exclude each other.

The bug these pin down: a rollback switched the mount to a version that its background
retirement had just unloaded; the rollback answered 200 and then every request answered 500.
Each order of the two is forced with events (no sleeps), under steady traffic:

- the rollback takes the draining version first, then its drain ends: it must not be unloaded;
- the retirement decided first (the version is stopping, its shutdown held open), then the
  rollback comes: it must load the version again from its archive, never point at the old one.

Between the rollback's look at the version and its hold there is no await, so no third order.
"""

from __future__ import annotations

import threading
from collections.abc import Container
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest

import testkit
from conftest import running_on
from packages import write_package
from starlette_hotdeploy import Deployer, IllegalTransition, PackageVersion, VersionState, hookimpl
from starlette_hotdeploy._deployment import Action, Deployment, Outcome
from starlette_hotdeploy._mounts import Mount
from starlette_hotdeploy._operation import Operation
from starlette_hotdeploy._sqlite_store import SQLiteStore

pytestmark = pytest.mark.anyio


class GatedStore(SQLiteStore):
    """The SQLite store, with a gate the test closes on `begin_operation` (a worker thread)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.closed = False
        self.reached = threading.Event()
        self.opened = threading.Event()

    def begin_operation(self, operation: Operation, live: Container[str]) -> Operation | None:
        if self.closed:
            self.reached.set()
            if not self.opened.wait(timeout=30):  # a guard against a hang, not a wait
                raise TimeoutError("the test never opened the gate")
        return super().begin_operation(operation, live)


class Traffic:
    """Requests to the package, one after another, until stopped; every answer is kept."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.answers: list[str] = []
        self.stop = anyio.Event()

    async def run(self) -> None:
        for _ in range(20_000):  # bounded (20 s at most); stopped long before
            if self.stop.is_set():
                return
            response = await self.client.get("/greeter/")
            self.answers.append(
                response.json()["version"] if response.status_code == 200 else str(response.status_code)
            )
            # Paced like a client's think time, ordering nothing: in-process requests never wait
            # for I/O, and back to back they held off the deployment's worker-thread calls until
            # the traffic ended (measured: a deploy took 26 s under such a loop, 5 ms without).
            await anyio.sleep(0.001)

    @property
    def failures(self) -> list[str]:
        return [answer for answer in self.answers if answer not in ("1.0", "2.0")]


def running(tmp_path: Path) -> AbstractAsyncContextManager[tuple[Deployer, GatedStore, httpx.AsyncClient]]:
    return running_on(tmp_path, GatedStore)


def instances(deployer: Deployer, version: str) -> list[PackageVersion]:
    return [v for v in deployer.package("greeter").loaded if v.version == version]


async def test_a_rollback_that_holds_the_draining_version_first_keeps_it(
    tmp_path: Path, sources: Path
) -> None:
    async with running(tmp_path) as (deployer, store, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        one = deployer.package("greeter").active
        assert one is not None
        traffic = Traffic(client)
        slow_done, rolled_back = anyio.Event(), anyio.Event()

        async def slow_request() -> None:
            await client.get("/greeter/hold?key=slow")  # keeps 1.0 draining
            slow_done.set()

        async def rollback() -> None:
            await deployer.rollback("greeter")
            rolled_back.set()

        with anyio.fail_after(30):  # a guard against a hang, not a wait
            async with anyio.create_task_group() as tg:
                tg.start_soon(traffic.run)
                tg.start_soon(slow_request)
                await testkit.event("slow:entered").wait()
                await deployer.deploy(write_package(sources, version="2.0"))
                assert one.state is VersionState.DRAINING

                store.closed = True
                tg.start_soon(rollback)
                await anyio.to_thread.run_sync(store.reached.wait)  # the rollback holds 1.0 now
                testkit.event("slow").set()  # 1.0's drain ends while the rollback is under way
                await slow_done.wait()
                await yield_rounds()  # what a retirement would do next, it has had the time to do
                assert one.state is VersionState.DRAINING  # held: its retirement left it alone
                assert one.app is not None
                store.opened.set()
                await rolled_back.wait()
                traffic.stop.set()
        assert deployer.package("greeter").active is one
        assert traffic.failures == []
        assert [await answer(client) for _ in range(20)] == ["1.0"] * 20
        assert [v.state for v in instances(deployer, "1.0")] == [VersionState.ACTIVE]
        assert "shutdown greeter 1.0" not in testkit.calls


async def test_a_rollback_after_the_retirement_decided_loads_the_version_again(
    tmp_path: Path, sources: Path
) -> None:
    drained = anyio.Event()

    class Drained:
        @hookimpl
        def hotdeploy_drained(self, version: PackageVersion) -> None:
            if version.version == "1.0":
                drained.set()

    async with running(tmp_path) as (deployer, _, client):
        deployer.plugins.register(Drained())
        await deployer.deploy(write_package(sources, version="1.0"))
        old = deployer.package("greeter").active
        assert old is not None
        testkit.gated.add("shutdown greeter 1.0")
        traffic = Traffic(client)
        with anyio.fail_after(30):  # a guard against a hang, not a wait
            async with anyio.create_task_group() as tg:
                tg.start_soon(traffic.run)
                await deployer.deploy(write_package(sources, version="2.0"))
                await testkit.event("shutdown greeter 1.0:entered").wait()  # decided, shutting down
                assert old.state is VersionState.STOPPING

                record = await deployer.rollback("greeter")  # while the old 1.0 still stops
                assert record.outcome == "succeeded"
                new = deployer.package("greeter").active
                assert new is not None
                assert new is not old  # loaded again from its archive
                assert new.version == "1.0"
                assert {"load", "start", "check"} <= {s.name for s in record.steps}  # not warm
                assert [await answer(client) for _ in range(20)] == ["1.0"] * 20

                testkit.event("shutdown greeter 1.0").set()  # the old instance finishes unloading
                await drained.wait()
                traffic.stop.set()
        assert old.state is VersionState.RETIRED
        assert old.app is None
        assert traffic.failures == []
        assert [await answer(client) for _ in range(20)] == ["1.0"] * 20
        assert [v.state for v in instances(deployer, "1.0")] == [VersionState.ACTIVE]


async def test_a_hold_before_the_retirement_task_first_ran_leaves_the_version_alone(
    tmp_path: Path, sources: Path
) -> None:
    # A third order, inside the engine: `retire` starts the retirement's task, and a switch
    # back holds the version before that task ever ran (nothing awaited in between: a thread
    # hop that did not yield). The task must leave the version alone; it once began a step on
    # the record the hold had finished, and its AssertionError ended the deployer's runtime.
    async with running(tmp_path) as (deployer, _, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        one = deployer.package("greeter").active
        assert one is not None
        with anyio.fail_after(30):  # a guard against a hang, not a wait
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.get, "/greeter/hold?key=slow")  # keeps 1.0 draining
                await testkit.event("slow:entered").wait()
                await deployer.deploy(write_package(sources, version="2.0"))
                engine = deployer._engine
                package = engine.get("greeter")
                assert package is not None
                assert engine.hold(one)  # held, as a rollback would: its retirement withdrawn
                record = Deployment(Action.ROLLBACK, "greeter", "1.0", "2.0")
                record.decide(Outcome.SUCCEEDED)  # as the coordinator's, before it retires
                engine.retire(package, one, record)
                assert engine.hold(one)  # before the task `retire` started first ran
                await yield_rounds()
                assert record.finished_at is not None
                assert [step.name for step in record.steps] == ["drain 1.0"]  # as withdraw ends it
                assert one.state is VersionState.DRAINING
                assert one.app is not None
                engine.release(package, one)  # not switched to after all: retired again
                rolled_back = await deployer.rollback("greeter")  # the runtime still works
                testkit.event("slow").set()
        assert rolled_back.outcome == "succeeded"
        assert deployer.package("greeter").active is one
        assert [await answer(client) for _ in range(5)] == ["1.0"] * 5


async def answer(client: httpx.AsyncClient) -> str:
    response = await client.get("/greeter/")
    return str(response.json()["version"]) if response.status_code == 200 else str(response.status_code)


async def yield_rounds(rounds: int = 100) -> None:
    """Let every other task run a bounded number of times (no clock involved)."""
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()


def test_illegal_version_transitions_raise(sources: Path) -> None:
    from starlette_hotdeploy._manifest import load_manifest

    root = write_package(sources, version="1.0")
    version = PackageVersion(load_manifest(root / "hotdeploy.toml"), root, "0" * 64)
    with pytest.raises(IllegalTransition, match="cannot go from staged to active"):
        version.transition(VersionState.ACTIVE)
    version.transition(VersionState.STOPPING)
    version.transition(VersionState.RETIRED)
    for state in VersionState:
        with pytest.raises(IllegalTransition):
            version.transition(state)  # retired is final


def test_a_mount_never_points_at_a_version_that_is_not_active(sources: Path) -> None:
    from starlette_hotdeploy._manifest import load_manifest

    root = write_package(sources, version="1.0")
    version = PackageVersion(load_manifest(root / "hotdeploy.toml"), root, "0" * 64)
    with pytest.raises(IllegalTransition, match="cannot point at a version that is staged and unloaded"):
        Mount("/greeter", "greeter", version)
