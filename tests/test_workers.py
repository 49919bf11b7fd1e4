"""Several worker processes on one home: real uvicorn (`--workers 3`) and gunicorn (uvicorn
workers) servers, hot deployments through the admin API, and SIGKILL at awkward moments.

Every request here goes to a real server subprocess on 127.0.0.1. Traffic after a deployment's
answer is sent on new connections, so the kernel spreads it over the worker processes; the test
packages answer with their version and the pid of the worker that served them. Checks that fail
or pause in one worker are driven by marker files (see workers_support.CHECKS).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from starlette_hotdeploy import _archive
from starlette_hotdeploy._store import Store
from starlette_hotdeploy._store_url import open_store
from workers_support import (
    Server,
    build_package,
    open_files_under,
    running_server,
    wait_for,
    worker_pid,
)

WORKERS = 3


def assert_everyone_serves(server: Server, name: str, version: str) -> dict[str, str]:
    """Every request on a new connection answers `version`, and every live worker answered
    some of them; the workers map shows `version` for each worker. Returns the map."""
    workers = server.wait_for_workers(name, version)
    pids = {worker_pid(worker) for worker in workers}
    answers = server.sample(name, reach=pids)
    assert {v for v, _ in answers} == {version}, answers
    assert {pid for _, pid in answers} == pids, (answers, workers)
    return workers


@contextmanager
def coordinator_connection(server: Server, name: str) -> Iterator[tuple[httpx.Client, int]]:
    """A keep-alive connection and the pid of the worker holding it: an admin request sent on
    it is coordinated by that worker."""
    with httpx.Client(timeout=60) as client:
        _, pid = server.get(name, client)
        yield client, pid


def prepared_voters(home: Path) -> set[str]:
    """Workers that voted "prepared" on the operation under way (read from the store)."""
    store = open_store(home)
    try:
        voters: set[str] = set()
        for operation in store.operations():
            if operation.phase == "prepare":
                votes = store.votes(operation.id)
                voters |= {worker for worker, (vote, _) in votes.items() if vote == "prepared"}
        return voters
    finally:
        store.close()


def check_started(store: Store, deployment_id: str) -> bool | None:
    """True once the store's copy of the record shows the check step begun (else None)."""
    record = store.deployment(deployment_id)
    steps = record["steps"] if record is not None else []
    return True if any(step["name"] == "check" for step in steps) else None


def paused_pids(server: Server) -> set[int]:
    return {int(path.name.removeprefix("paused-")) for path in server.markers.glob("paused-*")}


# -- 1, 2: every request after the answer reaches the new version -------------------------------


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_every_request_after_the_answer_reaches_the_new_version(
    kind: str, tmp_path: Path, sources: Path
) -> None:
    with running_server(tmp_path, kind, WORKERS) as server:
        server.deployed(build_package(sources, "greeter", "1.0"))
        # The workers register within a second of starting: wait until all serve 1.0.
        before = assert_everyone_serves(server, "greeter", "1.0")
        assert len(before) == WORKERS

        record = server.deployed(build_package(sources, "greeter", "2.0"))
        assert (record["from_version"], record["to_version"], record["outcome"]) == (
            "1.0",
            "2.0",
            "succeeded",
        )
        # Sent after the 201: no worker may still answer 1.0, whatever connection it gets.
        answers = server.sample("greeter", reach={worker_pid(worker) for worker in before})
        assert {version for version, _ in answers} == {"2.0"}, answers
        assert {pid for _, pid in answers} == {worker_pid(worker) for worker in before}
        # ...and the map says so right away: the coordinator waited for every worker's switch.
        package = server.package("greeter")
        assert package is not None
        assert package["active_version"] == "2.0"
        assert package["workers"] == dict.fromkeys(before, "2.0")
        converge = next(step for step in record["steps"] if step["name"] == "converge")
        assert converge["ok"] is True
        assert converge["detail"] == f"{WORKERS} worker(s) serve it"


# -- 3: a check that fails in one worker aborts the deployment everywhere ------------------------


def test_a_check_failing_in_one_worker_aborts_everywhere(tmp_path: Path, sources: Path) -> None:
    with running_server(tmp_path, "uvicorn", WORKERS) as server:
        server.deployed(build_package(sources, "greeter", "1.0", checks=True))
        workers = assert_everyone_serves(server, "greeter", "1.0")
        new = build_package(sources, "greeter", "2.0", checks=True)
        with coordinator_connection(server, "greeter") as (client, coordinator):
            # In a worker other than the one that takes the admin request: its vote fails it.
            [(victim, pid), *_] = sorted(
                (worker, worker_pid(worker)) for worker in workers if worker_pid(worker) != coordinator
            )
            marker = server.markers / f"fail-{pid}"
            marker.touch()
            response = server.deploy(new, client)
            assert response.status_code == 422, response.text
            problem = response.json()
            assert problem["step"] == "prepare workers"
            assert f"worker {victim}: " in problem["detail"]
            assert f"refusing in pid {pid}" in problem["detail"]
            assert problem["deployment"]["outcome"] == "failed"
            assert assert_everyone_serves(server, "greeter", "1.0") == workers
            marker.unlink()

            # In the coordinator itself: refused before it asks anyone.
            assert server.get("greeter", client)[1] == coordinator  # the same connection, still
            marker = server.markers / f"fail-{coordinator}"
            marker.touch()
            response = server.deploy(new, client)
            assert response.status_code == 422, response.text
            problem = response.json()
            assert problem["step"] == "check"
            assert f"refusing in pid {coordinator}" in problem["detail"]
            assert assert_everyone_serves(server, "greeter", "1.0") == workers
            marker.unlink()

        # Nothing was left half done: the same version deploys now.
        server.deployed(new)
        assert assert_everyone_serves(server, "greeter", "2.0").keys() == workers.keys()


# -- 4a: one worker SIGKILLed in the middle of a deployment --------------------------------------


@pytest.mark.parametrize("killed", ["paused", "voted"])
def test_a_worker_killed_during_a_deployment_is_not_waited_for(
    killed: str, tmp_path: Path, sources: Path
) -> None:
    """The coordinator waits in "prepare workers" for a worker whose check is paused; then a
    worker dies: the paused one ("paused": its vote never comes), or one that already voted
    "prepared" ("voted": its "switched" vote never comes). The deployment still succeeds about 5 s
    later (a silent worker is dead), and uvicorn's respawned worker serves the new version."""
    with running_server(tmp_path, "uvicorn", WORKERS) as server:
        server.deployed(build_package(sources, "greeter", "1.0", checks=True))
        workers = assert_everyone_serves(server, "greeter", "1.0")
        new = build_package(sources, "greeter", "2.0", checks=True)
        with (
            coordinator_connection(server, "greeter") as (client, coordinator),
            ThreadPoolExecutor(1) as pool,
        ):
            others = sorted((worker_pid(w), w) for w in workers if worker_pid(w) != coordinator)
            [(paused, _), (voter_pid, voter)] = others
            (server.markers / f"pause-{paused}").touch()
            answer: Future[httpx.Response] = pool.submit(server.deploy, new, client)
            wait_for(f"pid {paused} to pause in its check", lambda: paused_pids(server) or None, timeout=15)
            assert paused_pids(server) == {paused}
            if killed == "paused":
                victim = paused
            else:
                victim = voter_pid
                wait_for(f"{voter} to vote", lambda: voter in prepared_voters(server.home) or None, 15)
            assert not answer.done()
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            (server.markers / "release").touch()
            response = answer.result(timeout=45)
            took = time.monotonic() - killed_at
            assert response.status_code == 201, response.text
            record = response.json()
            assert (record["to_version"], record["outcome"]) == ("2.0", "succeeded")
            assert took < 15, f"the deployment ended {took:.1f}s after the kill"
            assert server.get("greeter", client) == ("2.0", coordinator)

        # The respawned worker restored 2.0 before serving; every request answers 2.0.
        after = assert_everyone_serves(server, "greeter", "2.0")
        assert victim not in {worker_pid(w) for w in after}
        assert coordinator in {worker_pid(w) for w in after}


# -- 4b: the whole server SIGKILLed, then restarted on the same home ------------------------------


def test_kill_right_after_the_answer_keeps_the_new_version(tmp_path: Path, sources: Path) -> None:
    server = Server(tmp_path, "uvicorn", WORKERS)
    try:
        server.start()
        server.deployed(build_package(sources, "greeter", "1.0"))
        server.deployed(build_package(sources, "greeter", "2.0"))
        server.kill()

        server.start()
        # Checked once every worker serves 2.0: a worker whose restore collided with another's
        # start-up may serve 1.0 for a second (test_a_starting_worker_leaves_unpacks_alone).
        assert_everyone_serves(server, "greeter", "2.0")
        package = server.packages()["greeter"]
        assert (package["active_version"], package["previous_version"]) == ("2.0", "1.0")

        # 1.0's archive was kept: roll back to it after the restart.
        response = server.rollback("greeter")
        assert response.status_code == 200, response.text
        assert (response.json()["to_version"], response.json()["outcome"]) == ("1.0", "succeeded")
        assert_everyone_serves(server, "greeter", "1.0")
    finally:
        server.kill()
        server.admin.close()


def interrupt_a_deployment(server: Server, archive: bytes) -> None:
    """Deploy `archive` with every worker's check paused, SIGKILL the server while they wait."""
    (server.markers / "pause-all").touch()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(server.deploy, archive)
        wait_for(
            "every worker to pause in its check", lambda: len(paused_pids(server)) == WORKERS or None, 15
        )
        assert not answer.done()
        server.kill()
        with pytest.raises(httpx.TransportError):
            answer.result(timeout=30)
    (server.markers / "pause-all").unlink()
    for marker in server.markers.glob("paused-*"):
        marker.unlink()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, bytes]]:
    """A server that confirmed greeter 1.0 then 2.0, was SIGKILLed while every worker checked
    3.0, and was started again on the same home: (the server, 3.0's archive). Shared by the
    tests below, which run in order; only the last one changes what is deployed."""
    root = tmp_path_factory.mktemp("interrupted")
    sources = root / "sources"
    sources.mkdir()
    server = Server(root, "uvicorn", WORKERS)
    try:
        server.start()
        server.deployed(build_package(sources, "greeter", "1.0", checks=True))
        server.deployed(build_package(sources, "greeter", "2.0", checks=True))
        third = build_package(sources, "greeter", "3.0", checks=True)
        interrupt_a_deployment(server, third)
        server.start()
        yield server, third
    finally:
        server.kill()
        server.admin.close()


def test_kill_during_a_deployment_keeps_the_confirmed_version(interrupted: tuple[Server, bytes]) -> None:
    server, _ = interrupted
    # The killed workers drop out of the map once silent for 5 s; the new ones serve 2.0.
    assert_everyone_serves(server, "greeter", "2.0")
    package = server.packages()["greeter"]
    assert (package["active_version"], package["previous_version"]) == ("2.0", "1.0")


def test_an_interrupted_deployment_is_not_left_pending(interrupted: tuple[Server, bytes]) -> None:
    server, _ = interrupted
    server.wait_for_workers("greeter", "2.0")  # the dead coordinator is known dead by now
    response = server.admin.get(server.url + "/_hotdeploy/deployments", params={"package": "greeter"})
    assert response.status_code == 200, response.text
    outcomes = [(d["to_version"], d["outcome"]) for d in response.json()["deployments"]]
    assert outcomes[0] == ("3.0", "interrupted")  # killed before its commit: nothing changed
    assert "pending" not in {outcome for _, outcome in outcomes}, outcomes
    latest = response.json()["deployments"][0]
    assert latest["finished_at"] is not None
    assert "stopped during step" in latest["error"]
    assert "nothing changed" in latest["error"]


def test_an_accepted_deployment_survives_a_crash_as_interrupted(tmp_path: Path) -> None:
    """A `202` from `?wait=false` is in the store at once: after a SIGKILL and a restart, its
    record answers, finished, with the outcome it reached."""
    sources = tmp_path / "sources"
    sources.mkdir()
    server = Server(tmp_path, "uvicorn", 1)
    try:
        server.start()
        server.deployed(build_package(sources, "greeter", "1.0", checks=True))
        (server.markers / "pause-all").touch()
        response = server.admin.post(
            server.url + "/_hotdeploy/packages",
            params={"wait": "false"},
            content=build_package(sources, "greeter", "2.0", checks=True),
            headers={"Content-Type": "application/zip"},
        )
        assert response.status_code == 202, response.text
        location = response.headers["location"]
        wait_for("the worker to pause in its check", lambda: paused_pids(server) or None, 15)
        # Steps reach the store in batches, within moments (a crash loses the last moments'):
        # the check's start is there before the kill.
        store, deployment_id = server.open_store(), location.rsplit("/", 1)[-1]
        try:
            wait_for("the check step in the store", lambda: check_started(store, deployment_id), 15)
        finally:
            store.close()
        server.kill()
        (server.markers / "pause-all").unlink()
        server.start()
        record = server.admin.get(server.url + location)
        assert record.status_code == 200, record.text
        assert (record.json()["to_version"], record.json()["outcome"]) == ("2.0", "interrupted")
        assert record.json()["finished_at"] is not None
        assert "stopped during step check" in record.json()["error"]
        assert_everyone_serves(server, "greeter", "1.0")
    finally:
        server.kill()
        server.admin.close()


@contextmanager
def connection_to(server: Server, name: str, pid: int) -> Iterator[httpx.Client]:
    """A keep-alive connection held by the worker `pid` (new connections until one is)."""
    for _ in range(500):
        with httpx.Client(timeout=60) as client:
            if server.get(name, client)[1] == pid:
                yield client
                return
    pytest.fail(f"no connection reached pid {pid}")


def test_rollback_after_a_restart_that_interrupted_a_deployment(interrupted: tuple[Server, bytes]) -> None:
    server, third = interrupted
    workers = server.wait_for_workers("greeter", "2.0")
    # The restarted workers prepared 3.0 for the dead coordinator (it looked alive for 5 s):
    # the rollback goes to one of them.
    voters = prepared_voters(server.home) & workers.keys()
    with connection_to(server, "greeter", worker_pid(min(voters or workers))) as client:
        response = client.post(
            server.url + "/_hotdeploy/packages/greeter/rollback",
            headers={"Authorization": f"Bearer {server.token}"},
        )
    assert response.status_code == 200, response.text
    assert (response.json()["to_version"], response.json()["outcome"]) == ("1.0", "succeeded")
    assert_everyone_serves(server, "greeter", "1.0")
    # The interrupted deployment blocks nothing: the same archive deploys now.
    server.deployed(third)
    assert_everyone_serves(server, "greeter", "3.0")


# -- 5: a restart brings back every package's active version ---------------------------------------


def test_a_restart_brings_back_the_active_versions(tmp_path: Path, sources: Path) -> None:
    server = Server(tmp_path, "uvicorn", WORKERS)
    try:
        server.start()
        server.deployed(build_package(sources, "greeter", "1.0"))
        server.deployed(build_package(sources, "greeter", "2.0"))
        response = server.rollback("greeter")  # the active version is not the newest archive
        assert response.status_code == 200, response.text
        server.deployed(build_package(sources, "counter", "1.0"))
        server.deployed(build_package(sources, "counter", "1.1"))
        before = server.packages()
        assert {name: p["active_version"] for name, p in before.items()} == {
            "counter": "1.1",
            "greeter": "1.0",
        }
        server.stop()

        server.start()
        assert_everyone_serves(server, "greeter", "1.0")
        assert_everyone_serves(server, "counter", "1.1")
        after = server.packages()
        assert {name: p["active_version"] for name, p in after.items()} == {
            "counter": "1.1",
            "greeter": "1.0",
        }
        for name in ("counter", "greeter"):
            assert after[name]["previous_version"] == before[name]["previous_version"]
            assert sorted(after[name]["available_versions"], key=repr) == sorted(
                before[name]["available_versions"], key=repr
            )
    finally:
        server.kill()
        server.admin.close()


def test_a_graceful_stop_unregisters_the_workers(tmp_path: Path, sources: Path) -> None:
    server = Server(tmp_path, "uvicorn", WORKERS)
    try:
        server.start()
        server.deployed(build_package(sources, "greeter", "1.0"))
        server.wait_for_workers("greeter", "1.0")
        server.stop()
        store = open_store(server.home)
        try:
            left = [worker.id for worker in store.workers()]
        finally:
            store.close()
        assert left == [], f"still registered after a graceful stop: {left}"
    finally:
        server.kill()
        server.admin.close()


# -- a worker's start-up and the unpacks of the others -------------------------------------------


def test_a_starting_worker_leaves_unpacks_alone(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker unpacks an archive into the shared home (here this test process, held after its
    second file) while another worker starts: the unpack must come out whole.

    (Seen through the admin API too: uvicorn respawning a crashed worker while the coordinator
    unpacks a big archive gives a 201 for a version with files missing.)"""
    archive = build_package(sources, "greeter", "1.0", checks=True)
    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        expected = sorted(name for name in zipped.namelist() if not name.endswith("/"))
    halfway, go_on = threading.Event(), threading.Event()
    written = 0

    def held_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        nonlocal written
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        if "x" in mode:  # _extract_zip creates each file with "xb"
            written += 1
            if written == 2:
                halfway.set()
                go_on.wait(30)
        return handle

    monkeypatch.setattr(_archive, "open", held_open, raising=False)
    server = Server(tmp_path, "uvicorn", 1)
    packages = server.home / "packages"
    packages.mkdir(parents=True)
    try:
        with ThreadPoolExecutor(1) as pool:
            unpacking = pool.submit(_archive.unpack, archive, packages)
            assert halfway.wait(15), "the unpack never reached its second file"
            try:
                server.start()  # returns once its worker registered: after its start-up cleaning
            finally:
                go_on.set()
            try:
                unpacked = unpacking.result(timeout=30)
            except Exception as exc:
                raise AssertionError(f"the unpack failed: {exc!r}") from exc
        found = sorted(
            path.relative_to(unpacked.root).as_posix() for path in unpacked.root.rglob("*") if path.is_file()
        )
        assert found == expected
    finally:
        server.kill()
        server.admin.close()


# -- 7: each worker makes its own id when its runtime starts (gunicorn --preload) ----------------


@pytest.fixture(scope="module")
def preloaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """gunicorn `--preload`: the master imports the host app and calls its factory (so it makes
    the Deployer), then forks the workers. Shared by the tests below; each deploys its own
    package, so they do not depend on one another's order."""
    root = tmp_path_factory.mktemp("preloaded")
    with running_server(root, "gunicorn", WORKERS, preload=True) as server:
        yield server


def test_preloaded_workers_each_have_their_own_id(preloaded: Server, sources: Path) -> None:
    server = preloaded
    assert server.process is not None
    master = server.process.pid
    # The master really preloaded: it built the app and its Deployer, but did not start it.
    facts = server.master_facts()
    assert facts["pid"] == master
    assert facts["app_loaded"] is True
    assert "starlette_hotdeploy._serve" in facts["modules"]
    assert facts["deployers"] == [{"running": False, "store_opened": False}]
    assert facts["home_exists"] is False  # nothing under the home was touched before the fork
    assert open_files_under(master, server.home) == []  # ...nor since: the store is the workers'

    server.deployed(build_package(sources, "greeter", "1.0"))
    workers = assert_everyone_serves(server, "greeter", "1.0")
    pids = server.worker_pids()
    assert len(pids) == WORKERS, pids
    # One id per worker process, each with that worker's own pid (none with the master's).
    assert len(workers) == WORKERS, workers
    assert sorted(worker_pid(worker) for worker in workers) == sorted(pids), (workers, pids)
    assert master not in {worker_pid(worker) for worker in workers}
    # The store knows the same workers (no id registered twice, none left from the master).
    store = open_store(server.home)
    try:
        registered = {worker.id for worker in store.workers()}
    finally:
        store.close()
    assert registered == workers.keys()


def test_preloaded_check_failing_in_one_worker_aborts_everywhere(preloaded: Server, sources: Path) -> None:
    """The bug this guards: with one id for every preloaded worker, the failing worker's vote
    was lost among the others' and the deployment went on; that worker then served a version
    its own check had refused."""
    server = preloaded
    server.deployed(build_package(sources, "guarded", "1.0", checks=True))
    workers = assert_everyone_serves(server, "guarded", "1.0")
    new = build_package(sources, "guarded", "2.0", checks=True)
    with coordinator_connection(server, "guarded") as (client, coordinator):
        [(victim, pid), *_] = sorted(
            (worker, worker_pid(worker)) for worker in workers if worker_pid(worker) != coordinator
        )
        marker = server.markers / f"fail-{pid}"
        marker.touch()
        try:
            response = server.deploy(new, client)
        finally:
            marker.unlink()
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["step"] == "prepare workers"
    # That worker, with its own cause (the text up to the next "; " is about it alone), and no
    # other worker.
    assert re.search(rf"worker {re.escape(victim)}: [^;]*refusing in pid {pid}", problem["detail"]), problem
    assert [worker for worker in workers if worker in problem["detail"]] == [victim], problem
    assert problem["deployment"]["outcome"] == "failed"
    # Every worker, the refusing one too, still serves 1.0.
    assert assert_everyone_serves(server, "guarded", "1.0") == workers
    assert server.worker_pids() == {worker_pid(worker) for worker in workers}


def test_preloaded_deployment_converges_on_every_worker(preloaded: Server, sources: Path) -> None:
    server = preloaded
    server.deployed(build_package(sources, "moved", "1.0"))
    before = assert_everyone_serves(server, "moved", "1.0")
    record = server.deployed(build_package(sources, "moved", "2.0"))
    assert (record["from_version"], record["to_version"], record["outcome"]) == ("1.0", "2.0", "succeeded")
    converge = next(step for step in record["steps"] if step["name"] == "converge")
    assert converge["detail"] == f"{WORKERS} worker(s) serve it"
    # Sent after the 201: every worker process answers 2.0.
    pids = server.worker_pids()
    answers = server.sample("moved", reach=pids)
    assert {version for version, _ in answers} == {"2.0"}, answers
    assert {pid for _, pid in answers} == pids == {worker_pid(worker) for worker in before}
    package = server.package("moved")
    assert package is not None
    assert package["workers"] == dict.fromkeys(before, "2.0")


# What a preloading master does (import the host app module, call its factory), then two forked
# children that each start the runtime and run side by side, as two workers would. Every wait is
# bounded (an alarm in each process, the deadlines below); it prints what each process saw, as JSON.
FORKED = """
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import anyio

signal.alarm(30)
home, out = Path(sys.argv[1]), Path(sys.argv[2])

from starlette_hotdeploy._errors import NotRunning
from starlette_hotdeploy._serve import create_host_app


def facts(deployer):
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    try:
        worker_id = deployer.worker_id
    except NotRunning:
        worker_id = None
    return {
        "pid": os.getpid(),
        "worker_id": worker_id,
        "running": deployer.is_running,
        "store_opened": deployer._store is not None,
        "home_exists": home.exists(),
        "holds": [path for path in held if path.startswith(str(home))],
    }


async def run_a_worker(deployer):
    # Both open the fresh store at once (two first opens once raced on PRAGMA journal_mode=WAL).
    async with deployer.started():
        runtime = deployer._running()
        live = set()
        deadline = time.monotonic() + 15
        while len(live) < 2 and time.monotonic() < deadline:  # until both children registered
            live = await runtime.cluster.live()
            await anyio.sleep(0.02)
        inside = facts(deployer)
        (out / f"saw-{os.getpid()}").touch()
        while len(list(out.glob("saw-*"))) < 2 and time.monotonic() < deadline:
            await anyio.sleep(0.02)
    return {"inside": inside, "live": sorted(live), "after": facts(deployer)}


app = create_host_app(home)
[deployer] = [m.kwargs["deployer"] for m in app.user_middleware if "deployer" in m.kwargs]
report = {"master": facts(deployer), "children": []}
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(30)
            child = {"before": facts(deployer), **anyio.run(run_a_worker, deployer)}
            (out / f"child-{os.getpid()}.json").write_text(json.dumps(child))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    children.append(pid)
for pid in children:
    _, status = os.waitpid(pid, 0)
    found = out / f"child-{pid}.json"
    child = json.loads(found.read_text()) if found.exists() else {}
    report["children"].append({"pid": pid, "exit": os.waitstatus_to_exitcode(status), **child})
report["master_after"] = facts(deployer)
print(json.dumps(report))
"""


def test_a_worker_id_is_made_when_the_runtime_starts_never_at_import(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTDEPLOY_")}
    done = subprocess.run(
        [sys.executable, "-c", FORKED, str(home), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    # Importing the host app module and making its Deployer: no id, no store, not even a home.
    nothing: dict[str, object] = {"worker_id": None, "running": False, "store_opened": False, "holds": []}
    assert report["master"] == {"pid": report["master"]["pid"], "home_exists": False, **nothing}
    children = report["children"]
    assert [child["exit"] for child in children] == [0, 0], (children, done.stderr)
    ids = [child["inside"]["worker_id"] for child in children]
    for child in children:
        assert child["before"]["worker_id"] is None  # inherited from the master: still nothing
        assert child["before"]["store_opened"] is False
        inside = child["inside"]
        assert inside["running"] is True
        assert worker_pid(inside["worker_id"]) == child["pid"] == inside["pid"]
        assert sorted(child["live"]) == sorted(ids)  # both runtimes at once, each its own id
        assert child["after"]["worker_id"] is None  # the id lives only as long as the runtime
    assert len(set(ids)) == 2, ids
    # The master never opened the store, even after its children did.
    assert report["master_after"] == {"pid": report["master"]["pid"], "home_exists": True, **nothing}
