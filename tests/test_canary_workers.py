"""Canaries on a real uvicorn with 2 workers: every worker splits the same way, the analysis
sees the figures of both, and a promote or abort sent to either worker reaches the canary's run.

Traffic runs in a thread, on a new connection per request (so both workers get some), with a
random user key each; it stops by itself after `LIMIT` requests or when the test says so.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from packages import write_package, zip_directory
from workers_support import Server, running_server, wait_for, worker_pid

WORKERS = 2
LIMIT = 20_000

APP = """
import itertools
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

VERSION = "{version}"
FAIL_EVERY = {fail_every}
COUNT = itertools.count(1)


async def index(request):
    body = {{"version": VERSION, "pid": os.getpid()}}
    if FAIL_EVERY and next(COUNT) % FAIL_EVERY == 0:
        return JSONResponse(body, status_code=500)
    return JSONResponse(body)


app = Starlette(routes=[Route("/", index)])
"""


def shop(sources: Path, version: str, *, fail_every: int = 0, min_requests: int = 20) -> bytes:
    directory = write_package(
        sources,
        "shop",
        version,
        app=APP.format(version=version, fail_every=fail_every),
        manifest_extra=f"[canary]\nkey = 'header:x-user'\nmin_requests = {min_requests}\n",
    )
    return zip_directory(directory, sources / f"shop-{version}.zip").read_bytes()


class Traffic:
    """Requests to /shop/ with random user keys until stopped: what each one got."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.answers: list[tuple[int, str, int, str]] = []  # status, version, pid, user
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.server.url, timeout=10, limits=limits) as client:
            for _ in range(LIMIT):
                if self.stop.is_set():
                    return
                user = f"{random.getrandbits(64):016x}"
                try:
                    response = client.get("/shop/", headers={"x-user": user})
                    body = response.json()
                    self.answers.append((response.status_code, body["version"], body["pid"], user))
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    self.failures.append(repr(exc))

    def since(self, index: int) -> list[tuple[int, str, int, str]]:
        return self.answers[index:]


@contextmanager
def traffic(server: Server) -> Iterator[Traffic]:
    load = Traffic(server)
    load.thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        load.thread.join(timeout=30)


def decided(server: Server, location: str, timeout: float = 60) -> dict[str, Any]:
    def look() -> dict[str, Any] | None:
        record: dict[str, Any] = server.admin.get(server.url + location).json()
        return record if record["outcome"] != "pending" else None

    return wait_for("the canary's outcome", look, timeout, interval=0.1)


def canary_everywhere(server: Server, pids: set[int]) -> dict[int, Any]:
    """The package's canary as each worker shows it: a connection per look (kept for its two
    requests, so both reach the same worker), until every worker answered."""
    seen: dict[int, Any] = {}
    headers = {"Authorization": f"Bearer {server.token}"}
    for _ in range(200):
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
            pid = client.get("/shop/").json()["pid"]
            seen.setdefault(pid, client.get("/_hotdeploy/packages/shop").json()["canary"])
        if set(seen) >= pids:
            break
    return seen


def test_a_failing_canary_is_aborted_on_both_workers_with_no_stable_user_failing(
    tmp_path: Path, sources: Path
) -> None:
    with running_server(tmp_path, "uvicorn", WORKERS) as server:
        server.deployed(shop(sources, "1.0"))
        workers = server.wait_for_workers("shop", "1.0")
        pids = {worker_pid(w) for w in workers}
        with traffic(server) as load:
            response = server.admin.post(
                server.url + "/_hotdeploy/packages?canary=30%25:30s",
                content=shop(sources, "1.1", fail_every=10, min_requests=40),
                headers={"Content-Type": "application/zip"},
            )
            assert response.status_code == 202, response.text
            started = len(load.answers)
            record = decided(server, response.headers["location"])
            ended = len(load.answers)
        assert record["outcome"] == "aborted", record
        assert "analysis failed: 5xx share" in record["error"]
        [analysis] = record["canary"]["analyses"]
        assert analysis["verdict"] == "fail"
        figures = analysis["figures"]
        assert figures["canary"]["requests"] >= 40
        assert figures["canary"]["error_rate"] > 0.05
        assert figures["stable"]["errors"] == 0
        assert load.failures == []
        during = load.since(started)[: ended - started]
        stable = [status for status, version, _, _ in during if version == "1.0"]
        assert stable
        assert set(stable) == {200}  # 0 failed requests for users on the stable version
        canary_pids = {pid for _, version, pid, _ in during if version == "1.1"}
        assert canary_pids == pids  # both workers split the requests
        # Both workers' figures went into the analysis: more canary requests than either served.
        served_by = {pid: sum(1 for _, v, p, _ in during if v == "1.1" and p == pid) for pid in pids}
        assert figures["canary"]["requests"] > max(served_by.values())
        # Afterwards nobody gets the canary, on any worker.
        after = server.sample("shop", reach=pids)
        assert {version for version, _ in after} == {"1.0"}


def test_a_healthy_canary_is_promoted_through_every_step_on_both_workers(
    tmp_path: Path, sources: Path
) -> None:
    with running_server(tmp_path, "uvicorn", WORKERS) as server:
        server.deployed(shop(sources, "1.0"))
        workers = server.wait_for_workers("shop", "1.0")
        pids = {worker_pid(w) for w in workers}
        with traffic(server) as load:
            response = server.admin.post(
                server.url + "/_hotdeploy/packages?canary=20%25:0.5s,50%25:0.5s,100%25",
                content=shop(sources, "1.1"),
                headers={"Content-Type": "application/zip"},
            )
            assert response.status_code == 202, response.text
            record = decided(server, response.headers["location"])
            time.sleep(0.2)  # a few requests after the promotion, for the assertion below
        assert record["outcome"] == "succeeded", record
        assert [a["verdict"] for a in record["canary"]["analyses"]] == ["pass", "pass"]
        assert load.failures == []
        assert {status for status, _, _, _ in load.answers} == {200}
        # A user on the canary at 20% was never sent back to 1.0 at 50%: per user, one version
        # (each key is new, so check the rule where it can break: no 1.1 then 1.0 for a key).
        server.wait_for_workers("shop", "1.1")
        after = server.sample("shop", reach=pids)
        assert {version for version, _ in after} == {"1.1"}


def test_an_abort_sent_to_the_other_worker_reaches_the_canary(tmp_path: Path, sources: Path) -> None:
    with running_server(tmp_path, "uvicorn", WORKERS) as server:
        server.deployed(shop(sources, "1.0"))
        workers = server.wait_for_workers("shop", "1.0")
        pids = {worker_pid(w) for w in workers}
        response = server.admin.post(
            server.url + "/_hotdeploy/packages?canary=10%25",  # until promoted by hand
            content=shop(sources, "1.1"),
            headers={"Content-Type": "application/zip"},
        )
        assert response.status_code == 202, response.text
        coordinator = worker_pid(response.json()["worker"])
        seen = canary_everywhere(server, pids)
        assert {state["weight_percent"] for state in seen.values()} == {10.0}
        headers = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as other:
            for _ in range(200):  # a keep-alive connection held by the other worker
                if other.get("/shop/").json()["pid"] != coordinator:
                    break
                other.close()
                other = httpx.Client(base_url=server.url, headers=headers, timeout=30)
            promoted = other.post("/_hotdeploy/packages/shop/canary/promote")
            assert promoted.status_code == 202, promoted.text
            record = decided(server, response.headers["location"])
        assert record["outcome"] == "succeeded"
        assert any("promoted by another worker's admin API" in (s["detail"] or "") for s in record["steps"])
        server.wait_for_workers("shop", "1.1")
