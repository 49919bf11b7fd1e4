"""The short GIL switch interval while an operation runs (_switch_interval): shortened once for
nested operations, put back by the last one, never against the application's own setting; a
deployment and a store transaction run with it. And the background chores that wait for the
operations of their process to end (`Engine.until_quiet`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from packages import write_package
from starlette_hotdeploy import Deployer, hookimpl
from starlette_hotdeploy import _switch_interval as switch_interval
from starlette_hotdeploy._sqlite_store import SQLiteStore

DEFAULT = 0.005  # CPython's
SHORT = switch_interval.DEFAULT_SWITCH_INTERVAL


@pytest.fixture(autouse=True)
def default_interval() -> Iterator[None]:
    assert switch_interval._state.depth == 0  # no operation left running by another test
    before = sys.getswitchinterval()
    sys.setswitchinterval(DEFAULT)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_nested_operations_shorten_it_once_and_the_last_one_puts_it_back() -> None:
    switch_interval.enter()
    assert sys.getswitchinterval() == pytest.approx(SHORT)
    with switch_interval.shortened():
        assert sys.getswitchinterval() == pytest.approx(SHORT)
    assert sys.getswitchinterval() == pytest.approx(SHORT)  # the first one still runs
    switch_interval.leave()
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


def test_a_shorter_interval_of_the_application_is_left_alone() -> None:
    sys.setswitchinterval(0.0001)
    with switch_interval.shortened():
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    assert sys.getswitchinterval() == pytest.approx(0.0001)


def test_an_interval_the_application_changed_meanwhile_is_not_undone() -> None:
    with switch_interval.shortened():
        sys.setswitchinterval(0.002)
    assert sys.getswitchinterval() == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("value", "inside"),
    [("0", DEFAULT), ("0.001", 0.001), ("nonsense", SHORT), ("0.00012345", 0.000123)],  # whole µs
)
def test_the_environment_sets_it_or_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, value: str, inside: float
) -> None:
    monkeypatch.setenv(switch_interval.SWITCH_INTERVAL_ENV, value)
    with switch_interval.shortened():
        assert sys.getswitchinterval() == pytest.approx(inside)
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


def test_a_store_transaction_runs_with_it(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        with store._transaction():
            assert sys.getswitchinterval() == pytest.approx(SHORT)
        assert sys.getswitchinterval() == pytest.approx(DEFAULT)
    finally:
        store.close()


class Seen:
    def __init__(self) -> None:
        self.intervals: list[float] = []

    @hookimpl
    def hotdeploy_check_before_activate(self) -> None:
        self.intervals.append(sys.getswitchinterval())


@pytest.mark.anyio
async def test_a_deployment_runs_with_it_and_puts_it_back(tmp_path: Path, sources: Path) -> None:
    seen = Seen()
    deployer = Deployer(home=tmp_path / "home", plugins=[seen], entry_points=False)
    async with deployer.running():
        await deployer.deploy(write_package(sources, version="1.0"))
        await deployer.deploy(write_package(sources, version="2.0"))
    assert seen.intervals == [pytest.approx(SHORT)] * 2
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


@pytest.mark.anyio
async def test_chores_wait_until_the_last_operation_ends_or_their_patience_runs_out(tmp_path: Path) -> None:
    engine = Deployer(home=tmp_path / "home", entry_points=False)._engine
    with anyio.fail_after(5):
        await engine.until_quiet(60)  # none runs: at once
        done = anyio.Event()

        async def chore() -> None:
            await engine.until_quiet(60)
            done.set()

        async with anyio.create_task_group() as tasks:
            with engine.operation():
                with engine.operation():
                    tasks.start_soon(chore)
                    await anyio.wait_all_tasks_blocked()
                await anyio.wait_all_tasks_blocked()
                assert not done.is_set()  # one still runs
                await engine.until_quiet(0)  # no patience: at once all the same
            await done.wait()  # the last one ended
