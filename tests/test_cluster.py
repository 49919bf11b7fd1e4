"""A cluster of hosts on PostgreSQL: real `uvicorn --workers 2` servers, each a "host" with a home
of its own and its own host id, sharing nothing but a throwaway database (tests/postgres.py).

A deployment asked of one host answers once every live worker of every host switched; a check
that fails on one host leaves every host on the old version; a host that starts with an empty
home restores from the database; a host SIGKILLed in the middle is not waited for and converges
when it comes back. Traffic goes to each host on new connections, so every worker answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from pgserver.postgres_server import PostgresServer

from postgres import restart, schema_url
from starlette_hotdeploy._errors import StoreError
from starlette_hotdeploy._postgres_store import PostgresStore
from workers_support import Server, build_package, running_server, wait_for, worker_pid

WORKERS = 2


@pytest.fixture
def cluster_url(postgres_url: str, tmp_path: Path) -> str:
    """A schema of this test's own: the state its hosts share."""
    return schema_url(postgres_url, tmp_path)


@contextmanager
def hosts(tmp_path: Path, url: str, *names: str) -> Iterator[list[Server]]:
    """One server per name, started in order, each on its own home; all killed at the end."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(running_server(tmp_path / name, "uvicorn", WORKERS, store=url, host_id=name))
            for name in names
        ]


def host_workers(server: Server, name: str) -> dict[str, str]:
    """What the host says each worker of the cluster serves (its admin API, from the database)."""
    found = server.package(name)
    assert found is not None, f"{name} is not active on {server.host_id}"
    workers: dict[str, str] = found["workers"]
    return workers


def assert_serves(server: Server, name: str, version: str) -> set[int]:
    """Every request to this host on a new connection answers `version`, and each of its
    workers answered some: returns their pids."""
    pids = {worker_pid(w) for w in host_workers(server, name) if server.owns(w)}
    assert len(pids) == WORKERS, host_workers(server, name)
    answers = server.sample(name, count=40, reach=pids)
    assert {v for v, _ in answers} == {version}, (server.host_id, answers)
    return pids


def for_every_worker(servers: list[Server], name: str, version: str, timeout: float = 30) -> dict[str, str]:
    """Wait until the map shows every worker of every host serving `version`; return it."""

    def probe() -> dict[str, str] | None:
        workers = host_workers(servers[0], name)
        everyone = len(workers) == WORKERS * len(servers) and set(workers.values()) == {version}
        return workers if everyone else None

    return wait_for(f"every worker serving {name} {version}", probe, timeout, 0.1)


def deployment_paused_on(
    paused: Server, coordinator: Server, pool: ThreadPoolExecutor, sources: Path
) -> Future[httpx.Response]:
    """greeter 1.0 everywhere, then 2.0 asked of `coordinator`, its answer still to come: the
    workers of `paused` wait in their check until `paused.markers / "release"` exists."""
    coordinator.deployed(build_package(sources, "greeter", "1.0", checks=True))
    for_every_worker([coordinator, paused], "greeter", "1.0")
    (paused.markers / "pause-all").touch()
    answer = pool.submit(coordinator.deploy, build_package(sources, "greeter", "2.0", checks=True))
    wait_for("the workers to pause", lambda: list(paused.markers.glob("paused-*")) or None, 15)
    return answer


def test_a_deployment_on_one_host_reaches_every_worker_of_every_host(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta):
        alpha.deployed(build_package(sources, "greeter", "1.0"))
        for_every_worker([alpha, beta], "greeter", "1.0")

        record = beta.deployed(build_package(sources, "greeter", "2.0"))
        assert (record["from_version"], record["to_version"], record["outcome"]) == (
            "1.0",
            "2.0",
            "succeeded",
        )
        converge = next(step for step in record["steps"] if step["name"] == "converge")
        assert converge["detail"] == f"{WORKERS * 2} worker(s) serve it"
        # The record says which worker of which host prepared and switched, and when.
        assert {w["host"] for w in record["workers"].values()} == {"alpha", "beta"}
        assert len(record["workers"]) == WORKERS * 2
        for worker in record["workers"].values():
            assert 0 < worker["prepared_ms"] <= worker["switched_ms"] <= record["duration_ms"]
        # Sent after the 201: every worker of both hosts answers 2.0 already.
        assert host_workers(alpha, "greeter") == host_workers(beta, "greeter")
        assert set(host_workers(alpha, "greeter").values()) == {"2.0"}
        assert_serves(alpha, "greeter", "2.0")
        assert_serves(beta, "greeter", "2.0")

        # Either host shows the whole cluster: both hosts, each with its workers, none lagging.
        view = beta.admin.get(beta.url + "/_hotdeploy/cluster").json()
        assert view["host"] == "beta"
        assert view["desired"]["greeter"]["version"] == "2.0"
        assert "schema t_" in view["store"]
        assert "postgresql://" in view["store"]
        assert [h["host"] for h in view["hosts"]] == ["alpha", "beta"]
        for host in view["hosts"]:
            assert len(host["workers"]) == WORKERS
            assert host["lagging"] == []
            assert all(w["serving"] == {"greeter": "2.0"} and w["heartbeat_age"] < 5 for w in host["workers"])
        shown = subprocess.run(
            [
                sys.executable,
                "-m",
                "starlette_hotdeploy._cli",
                "cluster",
                "--url",
                alpha.url,
                "--token",
                alpha.token,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("greeter 2.0") == 1 + 2 * WORKERS  # desired, then each worker
        assert "alpha" in shown.stdout
        assert "beta" in shown.stdout

        response = alpha.rollback("greeter")
        assert response.status_code == 200, response.text
        assert set(host_workers(beta, "greeter").values()) == {"1.0"}
        assert_serves(alpha, "greeter", "1.0")
        assert_serves(beta, "greeter", "1.0")


def test_a_check_failing_on_one_host_leaves_every_host_on_the_old_version(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta):
        alpha.deployed(build_package(sources, "greeter", "1.0", checks=True))
        workers = for_every_worker([alpha, beta], "greeter", "1.0")
        victim = min(w for w in workers if beta.owns(w))
        (beta.markers / f"fail-{worker_pid(victim)}").touch()

        response = alpha.deploy(build_package(sources, "greeter", "2.0", checks=True))
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["step"] == "prepare workers"
        # It names the host and worker (the id starts with the host id) and the cause.
        assert f"worker {victim}: " in problem["detail"]
        assert victim.startswith("beta:")
        assert f"refusing in pid {worker_pid(victim)}" in problem["detail"]
        assert problem["deployment"]["outcome"] == "failed"
        failed = problem["deployment"]["workers"][victim]
        assert failed["host"] == "beta"
        assert f"refusing in pid {worker_pid(victim)}" in failed["error"]
        assert failed["failed_ms"] > 0
        assert host_workers(alpha, "greeter") == workers
        assert_serves(alpha, "greeter", "1.0")
        assert_serves(beta, "greeter", "1.0")


def test_a_post_activation_check_failing_on_one_host_switches_every_host_back(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta):
        alpha.deployed(build_package(sources, "greeter", "1.0", checks=True))
        workers = for_every_worker([alpha, beta], "greeter", "1.0")
        victim = max(w for w in workers if beta.owns(w))
        (beta.markers / f"fail-after-{worker_pid(victim)}").touch()

        new = build_package(sources, "greeter", "2.0", checks=True)
        response = alpha.deploy(new)
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["title"] == "rolled back"
        assert problem["step"] == "bake"
        assert f"worker {victim}: " in problem["detail"]
        assert f"post-activation check refusing in pid {worker_pid(victim)}" in problem["detail"]
        record = problem["deployment"]
        assert record["outcome"] == "rolled_back"
        # Its one vote went from switched to failed (the coordinator may not have seen the first).
        assert record["workers"][victim]["failed_ms"] > 0
        assert "post-activation check refusing" in record["workers"][victim]["error"]
        # Every worker of every host is back on 1.0, and the desired state says so.
        for_every_worker([alpha, beta], "greeter", "1.0")
        assert_serves(alpha, "greeter", "1.0")
        assert_serves(beta, "greeter", "1.0")
        (beta.markers / f"fail-after-{worker_pid(victim)}").unlink()
        beta.deployed(new)  # the same archive: a rebuilt one would differ (zip timestamps)
        for_every_worker([alpha, beta], "greeter", "2.0")


def test_a_new_host_with_an_empty_home_restores_from_the_database(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    with hosts(tmp_path, cluster_url, "alpha") as (alpha,):
        alpha.deployed(build_package(sources, "greeter", "1.0"))
        alpha.deployed(build_package(sources, "greeter", "2.0"))
        with hosts(tmp_path, cluster_url, "gamma") as (gamma,):
            # Before its first answer, gamma fetched 2.0's archive from the database.
            assert_serves(gamma, "greeter", "2.0")
            assert list((gamma.home / "archives" / "greeter").glob("2.0-*.zip"))
            # ...and it is a full member: a rollback asked of it moves every host.
            response = gamma.rollback("greeter")
            assert response.status_code == 200, response.text
            assert_serves(alpha, "greeter", "1.0")
            assert_serves(gamma, "greeter", "1.0")


def test_two_deployments_of_one_package_on_two_hosts_at_once_one_wins(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta), ThreadPoolExecutor(1) as pool:
        alpha.deployed(build_package(sources, "greeter", "1.0", checks=True))
        for_every_worker([alpha, beta], "greeter", "1.0")
        (beta.markers / "pause-all").touch()  # beta's workers hold the first one in prepare
        first: Future[httpx.Response] = pool.submit(
            alpha.deploy, build_package(sources, "greeter", "2.0", checks=True)
        )
        wait_for("beta's workers to pause", lambda: list(beta.markers.glob("paused-*")) or None, 15)

        second = beta.deploy(build_package(sources, "greeter", "3.0", checks=True))
        assert second.status_code == 409, second.text
        assert "in progress" in second.json()["detail"]

        (beta.markers / "release").touch()
        response = first.result(timeout=45)
        assert response.status_code == 201, response.text
        for_every_worker([alpha, beta], "greeter", "2.0")


def test_a_host_killed_during_a_deployment_is_not_waited_for_and_converges_when_back(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    """beta's workers pause in their check; beta is SIGKILLed whole. alpha's deployment goes on
    without it once beta's heartbeats are older than the lease (5 s), and beta, started again
    on its home, serves the new version."""
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta), ThreadPoolExecutor(1) as pool:
        answer = deployment_paused_on(beta, alpha, pool, sources)
        beta.kill()
        killed_at = time.monotonic()

        response = answer.result(timeout=45)
        took = time.monotonic() - killed_at
        assert response.status_code == 201, response.text
        assert response.json()["outcome"] == "succeeded"
        assert took < 15, f"the deployment ended {took:.1f}s after the kill"
        assert_serves(alpha, "greeter", "2.0")

        (beta.markers / "pause-all").unlink()
        for marker in beta.markers.glob("paused-*"):
            marker.unlink()
        beta.start()
        assert_serves(beta, "greeter", "2.0")
        for_every_worker([alpha, beta], "greeter", "2.0")


def test_the_coordinating_host_killed_mid_prepare_changes_nothing_anywhere(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    """alpha coordinates; beta's workers pause in their check; alpha is SIGKILLed whole. Once
    alpha's lease runs out, beta abandons the operation (nothing was committed) and keeps 1.0;
    alpha, started again, serves 1.0 too, and the next deployment works."""
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta), ThreadPoolExecutor(1) as pool:
        answer = deployment_paused_on(beta, alpha, pool, sources)
        alpha.kill()
        (beta.markers / "pause-all").unlink()
        (beta.markers / "release").touch()
        assert answer.exception(timeout=30) is not None  # the connection died with alpha

        store = beta.open_store()
        try:
            wait_for("the operation to be abandoned", lambda: not store.active_operations() or None, 20)
            [operation] = [o for o in store.operations() if o.version == "2.0"]
            assert operation.phase == "abort"
            assert store.desired()["greeter"].version == "1.0"
        finally:
            store.close()
        assert_serves(beta, "greeter", "1.0")
        alpha.start()
        assert_serves(alpha, "greeter", "1.0")
        beta.deployed(build_package(sources, "greeter", "3.0", checks=True))
        for_every_worker([alpha, beta], "greeter", "3.0")


def test_the_coordinating_host_killed_after_the_commit_leaves_the_change_standing(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    """alpha coordinates 2.0 and is SIGKILLed in its post-activation check, after the commit:
    the change stands. beta serves 2.0, and so does alpha once it is started again."""
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta), ThreadPoolExecutor(1) as pool:
        alpha.deployed(build_package(sources, "greeter", "1.0", checks=True))
        for_every_worker([alpha, beta], "greeter", "1.0")
        (alpha.markers / "pause-after-all").touch()
        answer = pool.submit(alpha.deploy, build_package(sources, "greeter", "2.0", checks=True))
        wait_for(
            "alpha to pause after the commit", lambda: list(alpha.markers.glob("paused-after-*")) or None, 15
        )
        alpha.kill()
        assert answer.exception(timeout=30) is not None

        assert_serves(beta, "greeter", "2.0")
        store = beta.open_store()
        try:
            assert store.desired()["greeter"].version == "2.0"
            wait_for("the operation to be finished", lambda: not store.active_operations() or None, 20)
        finally:
            store.close()
        (alpha.markers / "pause-after-all").unlink()
        alpha.start()
        assert_serves(alpha, "greeter", "2.0")
        for_every_worker([alpha, beta], "greeter", "2.0")


def test_a_frozen_host_is_left_out_and_converges_soon_after_it_resumes(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    """beta is SIGSTOPped whole (supervisor and workers): a deployment asked of alpha goes on
    without it once beta's heartbeats are older than the 5 s lease. SIGCONT: beta's workers
    serve the new version within a lease of resuming."""
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta):
        alpha.deployed(build_package(sources, "greeter", "1.0"))
        for_every_worker([alpha, beta], "greeter", "1.0")
        assert beta.process is not None
        os.killpg(beta.process.pid, signal.SIGSTOP)
        try:
            record = alpha.deployed(build_package(sources, "greeter", "2.0"))
            converge = next(step for step in record["steps"] if step["name"] == "converge")
            assert converge["detail"] == f"{WORKERS} worker(s) serve it"  # alpha's alone
            assert_serves(alpha, "greeter", "2.0")
        finally:
            os.killpg(beta.process.pid, signal.SIGCONT)
        resumed = time.monotonic()
        for_every_worker([alpha, beta], "greeter", "2.0", timeout=15)
        took = time.monotonic() - resumed
        assert took < 5, f"beta served 1.0 for {took:.1f}s after it resumed"
        assert_serves(beta, "greeter", "2.0")


def test_a_stale_coordinator_cannot_commit_what_the_others_abandoned(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    """alpha coordinates 2.0 and is frozen (SIGSTOP) while beta's workers prepare it. Past
    alpha's lease, beta abandons the operation. Resumed, alpha finds every vote in and tries to
    commit: the store refuses (the operation is no longer in PREPARE), so nothing changes."""
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta), ThreadPoolExecutor(1) as pool:
        answer = deployment_paused_on(beta, alpha, pool, sources)
        assert alpha.process is not None
        os.killpg(alpha.process.pid, signal.SIGSTOP)
        try:
            (beta.markers / "pause-all").unlink()
            (beta.markers / "release").touch()
            store = beta.open_store()
            try:
                wait_for(
                    "beta to abandon alpha's operation", lambda: not store.active_operations() or None, 30
                )
                [operation] = [o for o in store.operations() if o.version == "2.0"]
                assert operation.phase == "abort"
            finally:
                store.close()
        finally:
            os.killpg(alpha.process.pid, signal.SIGCONT)
        response = answer.result(timeout=60)
        assert response.status_code == 422, response.text
        problem = response.json()
        assert "is in phase abort: only one in phase prepare can be committed" in problem["detail"]
        assert problem["deployment"]["outcome"] == "failed"
        # alpha had switched before it tried to commit: it went back at once.
        steps = [step["name"] for step in problem["deployment"]["steps"]]
        assert steps[-2:] == ["commit", "switch back"]
        for_every_worker([alpha, beta], "greeter", "1.0")
        assert_serves(alpha, "greeter", "1.0")
        assert_serves(beta, "greeter", "1.0")


def test_a_database_restarted_during_a_deployment_never_half_applies_it(
    tmp_path: Path, sources: Path, cluster_url: str, postgres_server: PostgresServer
) -> None:
    """beta's workers pause in their check; the database restarts under every connection; then
    they are released. The deployment fails or succeeds, but every worker of both hosts ends on
    the same version, the desired one; the hosts reconnect, and the next deployment works."""
    with hosts(tmp_path, cluster_url, "alpha", "beta") as (alpha, beta), ThreadPoolExecutor(1) as pool:
        answer = deployment_paused_on(beta, alpha, pool, sources)
        restart(postgres_server)
        (beta.markers / "release").touch()

        response = answer.result(timeout=60)
        assert response.status_code in (201, 409, 422, 503), response.text
        store = alpha.open_store()
        try:
            wanted = wait_for("the desired state to be readable", lambda: store.desired().get("greeter"), 15)
        finally:
            store.close()
        assert wanted.version == ("2.0" if response.status_code == 201 else "1.0"), response.text
        for_every_worker([alpha, beta], "greeter", wanted.version)
        assert_serves(alpha, "greeter", wanted.version)
        assert_serves(beta, "greeter", wanted.version)

        (beta.markers / "pause-all").unlink()
        beta.deployed(build_package(sources, "greeter", "3.0", checks=True))
        assert_serves(alpha, "greeter", "3.0")
        assert_serves(beta, "greeter", "3.0")


def test_a_store_url_that_cannot_be_used_stops_serve_with_one_line(tmp_path: Path) -> None:
    for url, says in [
        ("mysql://localhost/x", "must start with postgresql://"),
        ("postgresql://127.0.0.1:1/none?connect_timeout=2", "cannot be reached"),
    ]:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "starlette_hotdeploy._cli",
                "serve",
                "--home",
                str(tmp_path / "home"),
                "--store",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOTDEPLOY_ADMIN_TOKEN": "t"},
        )
        assert run.returncode != 0
        assert says in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_a_write_on_one_host_wakes_the_workers_of_another(postgres_url: str, tmp_path: Path) -> None:
    """LISTEN/NOTIFY: a subscriber is told once when it starts listening, then of another store
    object's writes (another host's)."""
    url = schema_url(postgres_url, tmp_path)
    listener = PostgresStore(url, tmp_path / "alpha")
    writer = PostgresStore(url, tmp_path / "beta")
    told = threading.Semaphore(0)
    stop = listener.subscribe(told.release)
    try:
        assert told.acquire(timeout=10)  # the first wake-up: listening now, look once
        writer.set_desired("greeter", "1.0", "a" * 64, [("1.0", "a" * 64)])
        assert told.acquire(timeout=10)
        writer.remove_desired("greeter")
        assert told.acquire(timeout=10)
    finally:
        stop()
        listener.close()
        writer.close()


def test_a_writer_frozen_inside_its_write_does_not_stall_the_other_hosts(
    postgres_url: str, tmp_path: Path
) -> None:
    """A host frozen (SIGSTOP) in the middle of a write holds the cluster's write lock: the
    database ends its session, so another host's write goes through; the frozen one, resumed,
    gets a StoreError for that write (rolled back) and its next write reconnects."""
    url = schema_url(postgres_url, tmp_path)
    frozen = PostgresStore(url, tmp_path / "alpha")
    other = PostgresStore(url, tmp_path / "beta")
    inside, resume = threading.Event(), threading.Event()

    def write_and_freeze() -> None:
        with frozen._transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('frozen', 1)")
            inside.set()
            resume.wait(60)  # idle in its transaction, holding the write lock, as a frozen host

    try:
        with ThreadPoolExecutor(2) as pool:
            write = pool.submit(write_and_freeze)
            assert inside.wait(30)
            done = pool.submit(other.set_desired, "greeter", "1.0", "a" * 64, [("1.0", "a" * 64)])
            try:
                assert done.result(timeout=30) > 0  # not forever: the lock was let go
            finally:
                resume.set()
            with pytest.raises(StoreError, match="failed"):
                write.result(timeout=30)
        assert "frozen" not in dict(other._query("SELECT key, value FROM meta"))
        frozen.set_desired("greeter", "2.0", "b" * 64, [("1.0", "a" * 64), ("2.0", "b" * 64)])
        assert other.desired()["greeter"].version == "2.0"
    finally:
        frozen.close()
        other.close()


def test_store_migrate_moves_a_single_host_home_into_the_cluster(
    tmp_path: Path, sources: Path, cluster_url: str
) -> None:
    """A SQLite home that deployed 1.0, 2.0, 3.0 and rolled back to 2.0, migrated: a host that
    starts on the database with an empty home serves 2.0, rolls back to 1.0 as the old home
    would have, and shows the old home's history."""
    with running_server(tmp_path / "old", "uvicorn", 1) as old:
        for version in ("1.0", "2.0", "3.0"):
            old.deployed(build_package(sources, "greeter", version))
        assert old.rollback("greeter").status_code == 200
        history = old.admin.get(old.url + "/_hotdeploy/deployments").json()["deployments"]
        home = old.home

    def migrate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "starlette_hotdeploy._cli",
                "store",
                "migrate",
                "--home",
                str(home),
                "--to",
                cluster_url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    moved = migrate()
    assert moved.returncode == 0, moved.stderr
    assert "greeter 2.0" in moved.stdout
    assert "migrated 1 package(s), 3 archive(s), 4 record(s)" in moved.stdout
    again = migrate()
    assert again.returncode == 1
    assert "already has packages (greeter)" in again.stderr

    with hosts(tmp_path, cluster_url, "alpha") as (alpha,):
        assert_serves(alpha, "greeter", "2.0")
        records = alpha.admin.get(alpha.url + "/_hotdeploy/deployments").json()["deployments"]
        assert [r["id"] for r in records] == [r["id"] for r in history]
        response = alpha.rollback("greeter")
        assert response.status_code == 200, response.text
        assert_serves(alpha, "greeter", "1.0")
