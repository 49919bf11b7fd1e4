"""Wake-ups between the workers of a home (_wakeup, and how _cluster and _follower use them).

Unit level: two `Wakeup`s in one home, a dead worker's socket, the short directory for a long
home, the timeout, the polling fallback. Then the behaviour: with a reconcile interval so long
that polling alone would take half a minute, a deployment through one worker still reaches the
other at once, in-process (two deployers on one home) and with real uvicorn worker processes.
Every wait is bounded; nothing sleeps to order events.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import host_app
from packages import release_thread_gates, write_package
from starlette_hotdeploy import Deployer, pack_directory
from starlette_hotdeploy._cluster import RECONCILE_ENV, Cluster
from starlette_hotdeploy._sqlite_store import SQLiteStore
from starlette_hotdeploy._wakeup import MAX_MESSAGE, MAX_SOCKET_PATH, SUFFIX, Wakeup, wake_directory
from workers_support import build_package, running_server, wait_for, worker_pid

pytestmark = pytest.mark.anyio

LONG = "30"  # seconds: a reconcile interval that polling alone could never beat in a test


@asynccontextmanager
async def listening(*wakeups: Wakeup) -> AsyncIterator[None]:
    """Run the wake-ups' receivers; wait (bounded) until each one listens."""
    async with anyio.create_task_group() as tasks:
        for wakeup in wakeups:
            assert wakeup.open()
            await tasks.start(wakeup.run)
            assert wakeup.listening
        try:
            yield
        finally:
            tasks.cancel_scope.cancel()
            for wakeup in wakeups:
                wakeup.close()


def told_to(wakeup: Wakeup) -> list[bytes]:
    """The notices `wakeup` reads from now on (each one a change), in order."""
    told: list[bytes] = []

    def on_message(data: bytes) -> bool:
        told.append(data)
        return True

    wakeup.on_message = on_message
    return told


# -- Wakeup ---------------------------------------------------------------------------------------


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A home whose socket paths fit in it (pytest's tmp_path grows with its run counter: past
    pytest-99 the sockets of a home under it no longer fit, and go to the short directory)."""
    with tempfile.TemporaryDirectory(prefix="hd-", dir="/tmp") as directory:
        yield Path(directory)


async def test_a_notify_wakes_the_other_worker_not_itself(short_home: Path) -> None:
    one, two = Wakeup(short_home), Wakeup(short_home)
    async with listening(one, two):
        assert one.directory == two.directory
        assert one.directory is not None
        assert one.directory.parent.name == "wake"  # in the home: its path is short enough
        seen_one, seen_two = one.count, two.count
        assert await anyio.to_thread.run_sync(one.notify) == 1
        with anyio.fail_after(5):
            assert await two.wait(seen_two, 10)
        assert not await one.wait(seen_one, 0.05)  # its own write does not wake it


async def test_a_wake_up_that_is_only_news_is_no_change(short_home: Path) -> None:
    # `on_message` calls a datagram news only for a waiter (a vote): `count` moves, `changes`
    # does not, and a wait for changes goes on.
    one, two = Wakeup(short_home), Wakeup(short_home)
    told: list[bytes] = []

    def on_message(data: bytes) -> bool:
        told.append(data)
        return data != b"news"

    two.on_message = on_message
    async with listening(one, two):
        seen, changes = two.count, two.changes
        await anyio.to_thread.run_sync(one.notify, b"news")
        with anyio.fail_after(5):
            assert await two.wait(seen, 10)
        assert two.changes == changes
        assert not await two.wait(changes, 0.05, changes=True)
        await anyio.to_thread.run_sync(one.notify, b"a change")
        with anyio.fail_after(5):
            assert await two.wait(changes, 10, changes=True)
    assert told == [b"news", b"a change"]


async def test_a_notice_behind_a_plain_wake_up_is_still_read(short_home: Path) -> None:
    # Both wait in the socket before the receiver runs: one read takes them both. A begin's
    # notice behind a plain wake-up was once dropped unread (the follower then looked instead).
    one, two = Wakeup(short_home), Wakeup(short_home)
    told = told_to(two)
    assert one.open()
    assert two.open()
    try:
        assert await anyio.to_thread.run_sync(one.notify) == 1
        assert await anyio.to_thread.run_sync(one.notify, b"a notice") == 1
        async with anyio.create_task_group() as tasks:
            seen = two.count
            await tasks.start(two.run)
            with anyio.fail_after(5):
                assert await two.wait(seen, 10)
            tasks.cancel_scope.cancel()
    finally:
        one.close()
        two.close()
    assert told == [b"a notice"]


async def test_a_message_too_long_to_arrive_whole_goes_as_a_plain_wake_up(short_home: Path) -> None:
    one, two = Wakeup(short_home), Wakeup(short_home)
    told = told_to(two)
    async with listening(one, two):
        changes = two.changes
        await anyio.to_thread.run_sync(one.notify, b"x" * (MAX_MESSAGE + 1))
        with anyio.fail_after(5):
            assert await two.wait(changes, 10, changes=True)
    assert told == []  # a plain wake-up: nothing to read


async def test_a_wake_up_before_the_wait_is_not_lost(tmp_path: Path) -> None:
    """The count is taken before the look: a wake-up during the look makes the wait return."""
    one, two = Wakeup(tmp_path), Wakeup(tmp_path)
    async with listening(one, two):
        seen = two.count  # then the waiter looks at the store, and meanwhile:
        one.notify()
        with anyio.fail_after(5):
            assert await two.wait(two.count, 10)  # the wake-up has arrived
        started = time.monotonic()
        assert await two.wait(seen, 10)  # the wait after the look: returns at once
        assert time.monotonic() - started < 0.1


async def test_wait_returns_at_the_timeout_without_a_wake_up(tmp_path: Path) -> None:
    one = Wakeup(tmp_path)
    async with listening(one):
        started = time.monotonic()
        assert not await one.wait(one.count, 0.2)
        assert 0.15 < time.monotonic() - started < 2


async def test_a_dead_workers_socket_is_removed(tmp_path: Path) -> None:
    one, dead = Wakeup(tmp_path), Wakeup(tmp_path)
    assert one.open()
    assert dead.open()
    try:
        assert dead.path is not None
        assert dead._receiver is not None
        dead._receiver.close()  # killed: its socket file stays behind, nobody reads it
        assert dead.path.exists()
        assert one.notify() == 0
        assert not dead.path.exists()
    finally:
        one.close()
        dead.close()


async def test_close_ends_the_receiver_and_removes_the_socket(tmp_path: Path) -> None:
    one, two = Wakeup(tmp_path), Wakeup(tmp_path)
    assert one.open()
    assert two.open()
    path = two.path
    assert path is not None
    async with anyio.create_task_group() as tasks:
        await tasks.start(two.run)
        assert two.listening
        tasks.cancel_scope.cancel()
    two.close()
    two.close()  # idempotent
    assert not path.exists()
    assert not two.listening
    assert not two.is_open
    assert two.notify() == 0
    assert one.notify() == 0  # nobody else left
    one.close()


async def test_a_long_home_falls_back_to_a_short_directory(tmp_path: Path) -> None:
    home = tmp_path / ("h" * 120)
    home.mkdir()
    directory = wake_directory(home)
    assert directory is not None
    assert not directory.is_relative_to(home.resolve())
    assert directory == wake_directory(home)  # every worker of the home picks the same one
    one, two = Wakeup(home), Wakeup(home)
    async with listening(one, two):
        assert one.path is not None
        assert len(os.fsencode(one.path)) <= MAX_SOCKET_PATH
        seen = two.count
        assert one.notify() == 1
        with anyio.fail_after(5):
            assert await two.wait(seen, 10)
    assert list(directory.glob(f"*{SUFFIX}")) == []


def test_the_directory_does_not_depend_on_the_pid_length(tmp_path: Path) -> None:
    """Workers with a 3-digit and a 7-digit pid must agree, whatever the home's length."""
    for length in range(40, 100):
        home = tmp_path / ("d" * length)
        directory = wake_directory(home)
        assert directory == wake_directory(home)
        if directory is not None:
            longest = directory / f"{4_194_304}-abcdef01{SUFFIX}"
            assert len(os.fsencode(longest)) <= MAX_SOCKET_PATH


def test_other_hosts_have_their_own_directory(tmp_path: Path) -> None:
    """A home on a shared file system: another host's sockets answer ECONNREFUSED here and
    would be removed as dead if they were in the same directory."""
    assert wake_directory(tmp_path, "a") != wake_directory(tmp_path, "b")


def test_no_home_means_no_socket() -> None:
    wakeup = Wakeup(None)
    assert not wakeup.open()
    assert not wakeup.is_open
    assert wakeup.notify() == 0


# -- Cluster --------------------------------------------------------------------------------------


def test_the_reconcile_interval_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path)
    try:
        for value, given, expected in (("7.5", None, 7.5), ("nonsense", None, 1.0), ("7.5", 3.0, 3.0)):
            monkeypatch.setenv(RECONCILE_ENV, value)
            cluster = Cluster(store, reconcile_interval=given)
            cluster.wakeup.close()
            assert cluster.reconcile_interval == expected
    finally:
        store.close()


def test_a_reused_pid_is_not_a_live_worker(tmp_path: Path) -> None:
    """A worker whose pid now belongs to a process started after its last heartbeat (a worker
    restarted in a container gets the same pid) is gone, although its heartbeat is recent."""
    store = SQLiteStore(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        cluster = Cluster(store)
        cluster.wakeup.close()
        dead = f"{socket.gethostname()}:{child.pid}:old000"
        store.heartbeat(dead, {})
        db = sqlite3.connect(tmp_path / "state.db")
        with db:
            db.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (time.time() - 3, dead))
        db.close()
        assert dead not in {w.id for w in cluster.workers()}
        store.heartbeat(dead, {})  # a heartbeat after the process started: alive
        assert dead in {w.id for w in cluster.workers()}
    finally:
        child.kill()
        child.wait(timeout=10)
        store.close()


def test_a_heartbeat_overtaken_by_a_newer_one_does_not_go_back(tmp_path: Path) -> None:
    """Two thread hops (a periodic beat, a vote) may reach the store out of order: the map
    computed first must not overwrite the newer one, nor become what later beats repeat."""
    store = SQLiteStore(tmp_path)
    try:
        cluster = Cluster(store)
        cluster.wakeup.close()
        older, newer = cluster._beat({"greeter": "1.0"}), cluster._beat({"greeter": "2.0"})
        newer()
        older()
        assert store.workers()[0].serving == {"greeter": "2.0"}
        cluster._beat(None)()  # the periodic beat: what was written last
        assert store.workers()[0].serving == {"greeter": "2.0"}
        assert cluster.serving == {"greeter": "2.0"}
    finally:
        store.close()


# -- two deployers on one home, in one process ------------------------------------------------------


class HomelessStore:
    """A store that says nothing about a home directory (as a PostgreSQL store would not)."""

    def __init__(self, home: Path) -> None:
        self._store = SQLiteStore(home)

    def __getattr__(self, name: str) -> Any:
        if name == "home":
            raise AttributeError(name)
        return getattr(self._store, name)


@asynccontextmanager
async def two_workers(tmp_path: Path, store: Any = None) -> AsyncIterator[tuple[Deployer, Deployer]]:
    home = tmp_path / "home"
    home.mkdir()
    async with AsyncExitStack() as stack:
        deployers = []
        for _ in range(2):
            deployer = Deployer(
                home=home, entry_points=False, store=store(home) if store is not None else None
            )
            await stack.enter_async_context(deployer.running())
            deployers.append(deployer)
        yield deployers[0], deployers[1]


async def answer(deployer: Deployer, path: str) -> str:
    transport = httpx.ASGITransport(app=host_app(deployer))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get(path)
    return str(response.json()["version"]) if response.status_code == 200 else str(response.status_code)


async def deploy_reaches_the_other(tmp_path: Path, sources: Path, store: Any) -> float:
    """Deploy 1.0 then 2.0 through one worker; the other serves each when the call returns.
    Returns how long the 2.0 deployment took."""
    async with two_workers(tmp_path, store) as (one, two):
        with anyio.fail_after(10):  # polling alone would take 30 s per phase
            await one.deploy(write_package(sources, version="1.0"))
            assert await answer(two, "/greeter/") == "1.0"
            started = time.monotonic()
            await one.deploy(write_package(sources, version="2.0"))
            took = time.monotonic() - started
            assert await answer(two, "/greeter/") == "2.0"
            assert await answer(one, "/greeter/") == "2.0"
        return took


async def test_a_deploy_wakes_the_other_worker(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RECONCILE_ENV, LONG)
    assert await deploy_reaches_the_other(tmp_path, sources, None) < 2


async def test_without_a_home_the_workers_poll(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RECONCILE_ENV, LONG)
    assert await deploy_reaches_the_other(tmp_path, sources, HomelessStore) < 2
    assert not (tmp_path / "home" / "wake").exists()


async def test_without_unix_sockets_the_workers_poll(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RECONCILE_ENV, LONG)
    monkeypatch.setattr(Wakeup, "open", lambda self: False)  # as where there is no AF_UNIX
    assert await deploy_reaches_the_other(tmp_path, sources, None) < 2


async def test_a_stopped_worker_leaves_no_socket(tmp_path: Path, sources: Path) -> None:
    async with two_workers(tmp_path) as (one, _):
        directory = one._running().cluster.wakeup.directory
        assert directory is not None
        assert len(list(directory.glob(f"*{SUFFIX}"))) == 2
    assert list(directory.glob(f"*{SUFFIX}")) == []


# -- real uvicorn worker processes ----------------------------------------------------------------


def test_real_workers_switch_together_without_polling(tmp_path: Path, sources: Path) -> None:
    """With a 30 s reconcile interval, every deployment through one worker answers (every
    worker switched) well under a second, and every worker serves it right after."""
    with running_server(tmp_path, workers=2, env={RECONCILE_ENV: LONG}) as server:
        timeout = httpx.Timeout(10)  # broken wake-ups: the first phase alone would take 30 s
        for version in ("1.0", "2.0", "3.0"):
            archive = build_package(sources, "greeter", version)
            started = time.monotonic()
            response = server.deploy(archive, httpx.Client(headers=server.admin.headers, timeout=timeout))
            took = time.monotonic() - started
            assert response.status_code == 201, response.text
            assert took < 3, f"{version}: {took:.2f}s"
            workers = server.wait_for_workers("greeter", version, timeout=5)
            pids = {worker_pid(w) for w in workers}
            answers = server.sample("greeter", count=20, reach=pids)
            assert {v for v, _ in answers} == {version}, answers
        directory = wake_directory(server.home)
        assert directory is not None
        wait_for("two sockets", lambda: len(list(directory.glob(f"*{SUFFIX}"))) == 2 or None, 5)


# -- the restore of many packages at once ------------------------------------------------------------

INNOCENT = """
import packages
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

packages.thread_gate("innocent loading").set()
packages.thread_gate("tampered").wait(10)  # loads overlap: the other one tampers meanwhile


async def index(request):
    return PlainTextResponse("innocent")


app = Starlette(routes=[Route("/", index)])
"""

TAMPERER = """
import colorsys
import sys
import types

import packages

packages.thread_gate("innocent loading").wait(10)
sys.modules["colorsys"] = types.ModuleType("colorsys")  # refused by the audit, and put back
packages.thread_gate("tampered").set()
app = None
"""


async def test_a_load_refused_for_an_overlapping_one_is_restored_alone(tmp_path: Path, sources: Path) -> None:
    """Restored at once, two loads overlap and one tampers with sys.modules: both are refused
    (who did it cannot be told apart), so the refused ones are tried again one at a time."""
    home = tmp_path / "home"
    store = SQLiteStore(home)
    for name, app in (("innocent", INNOCENT), ("tamperer", TAMPERER)):
        packed = pack_directory(write_package(sources, name, "1.0", app=app))
        store.save_archive(name, "1.0", packed.sha256, packed.data)
        store.set_desired(name, "1.0", packed.sha256, [("1.0", packed.sha256)])
    store.close()
    try:
        deployer = Deployer(home=home, entry_points=False)
        with anyio.fail_after(30):
            async with deployer.running():
                assert await answer_text(deployer, "/innocent/") == "innocent"
                assert (
                    deployer.packages.get("tamperer") is None or deployer.package("tamperer").active is None
                )
    finally:
        release_thread_gates()


async def answer_text(deployer: Deployer, path: str) -> str:
    transport = httpx.ASGITransport(app=host_app(deployer))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get(path)
    return response.text if response.status_code == 200 else str(response.status_code)
