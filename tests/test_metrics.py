"""Prometheus metrics: the values after known traffic and known operations, read back by parsing
the exposition the admin API serves, in one process and across the workers of a real uvicorn."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware

import testkit
from drains import Drained
from packages import write_package
from starlette_hotdeploy import Deployer, DeploymentError, HotDeployMiddleware
from starlette_hotdeploy._figures import RequestFigures
from starlette_hotdeploy._figures_share import KEEP_FOR, LIVE_FOR
from starlette_hotdeploy._worker_figures import WorkerFigures
from workers_support import build_package, running_server, wait_for, worker_pid

pytestmark = pytest.mark.anyio

TOKEN = "metrics-admin-token"
READ_TOKEN = "metrics-read-token"

# A package whose routes answer 500 the Starlette way (a response, then the error re-raised) and
# the raw ASGI way (an error before any response).
FAILING_APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def ok(request):
    return PlainTextResponse("ok")

async def boom(request):
    raise RuntimeError("boom")

inner = Starlette(routes=[Route("/", ok), Route("/boom", boom)])

async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"].endswith("/raw"):
        raise RuntimeError("raw boom")
    await inner(scope, receive, send)
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def host(deployer: Deployer) -> Starlette:
    return Starlette(
        middleware=[
            Middleware(HotDeployMiddleware, deployer=deployer, admin_token=TOKEN, admin_read_token=READ_TOKEN)
        ]
    )


@pytest.fixture
async def client(deployer: Deployer) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=host(deployer), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def scrape(client: httpx.AsyncClient, token: str = TOKEN) -> Samples:
    response = await client.get("/_hotdeploy/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def test_requests_are_counted_by_version_and_status_class(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, "greeter", "1.0"))
    await deployer.deploy(write_package(sources, "failing", "1.0", app=FAILING_APP))
    for _ in range(3):
        assert (await client.get("/greeter/")).status_code == 200
    for _ in range(2):
        assert (await client.get("/greeter/missing")).status_code == 404
    assert (await client.get("/failing/boom")).status_code == 500
    assert (await client.get("/failing/raw")).status_code == 500
    assert (await client.get("/failing/")).status_code == 200

    samples = await scrape(client)

    def requests(package: str, status: str) -> float:
        return value(samples, "hotdeploy_requests_total", package=package, version="1.0", status=status)

    assert (requests("greeter", "2xx"), requests("greeter", "4xx"), requests("greeter", "5xx")) == (3, 2, 0)
    # The 500 that Starlette sent is counted once; the raw app's error (no response) as a 500.
    assert (requests("failing", "2xx"), requests("failing", "5xx")) == (1, 2)
    greeter = {"package": "greeter", "version": "1.0"}
    assert value(samples, "hotdeploy_request_duration_seconds_count", **greeter) == 5
    assert value(samples, "hotdeploy_request_duration_seconds_bucket", le="+Inf", **greeter) == 5
    assert 0 < value(samples, "hotdeploy_request_duration_seconds_sum", **greeter) < 5
    # The admin API's own requests are not a package's.
    assert value(samples, "hotdeploy_requests_total") == 8
    assert value(samples, "hotdeploy_version_info", package="greeter", version="1.0", state="active") == 1
    assert value(samples, "hotdeploy_workers") == 1


async def test_in_flight_requests_are_a_gauge_per_version(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, "greeter", "1.0"))
    async with anyio.create_task_group() as tasks:
        for key in ("a", "b"):
            tasks.start_soon(client.get, f"/greeter/hold?key={key}")
            await testkit.event(f"{key}:entered").wait()
        samples = await scrape(client)
        held = value(samples, "hotdeploy_requests_in_flight", package="greeter", version="1.0")
        testkit.event("a").set()
        testkit.event("b").set()
    assert held == 2
    samples = await scrape(client)
    assert value(samples, "hotdeploy_requests_in_flight", package="greeter", version="1.0") == 0
    assert value(samples, "hotdeploy_requests_total", package="greeter", status="2xx") == 2


async def test_operations_and_drains_are_counted(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    await deployer.deploy(write_package(sources, "greeter", "1.0"))
    await deployer.deploy(write_package(sources, "greeter", "2.0"))
    broken = write_package(sources, "greeter", "3.0", app="raise ImportError('no such thing')\n")
    with pytest.raises(DeploymentError):
        await deployer.deploy(broken)
    rollback = await deployer.rollback("greeter")
    assert rollback.to_version == "1.0"
    await drained.wait(2)  # 1.0, replaced by 2.0; 2.0, replaced by the rollback

    samples = await scrape(client)

    def operations(operation: str, outcome: str) -> float:
        return value(
            samples, "hotdeploy_deployments_total", package="greeter", operation=operation, outcome=outcome
        )

    assert operations("deploy", "succeeded") == 2
    assert operations("deploy", "failed") == 1
    assert operations("rollback", "succeeded") == 1
    assert (
        value(samples, "hotdeploy_deployment_duration_seconds_count", package="greeter", operation="deploy")
        == 3
    )
    assert value(samples, "hotdeploy_drain_duration_seconds_count", package="greeter") == 2
    assert value(samples, "hotdeploy_requests_terminated_total", package="greeter") == 0
    assert value(samples, "hotdeploy_version_info", package="greeter", version="1.0", state="active") == 1
    assert value(samples, "hotdeploy_version_info", package="greeter", version="2.0") == 0


async def test_a_drain_timeout_counts_the_requests_it_ended(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    await deployer.deploy(write_package(sources, "greeter", "1.0", manifest_extra="drain_timeout = 0.2\n"))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client.get, "/greeter/hold?key=stuck")
        await testkit.event("stuck:entered").wait()
        await deployer.deploy(write_package(sources, "greeter", "2.0"))
        await drained.wait_for("1.0")
    samples = await scrape(client)
    assert value(samples, "hotdeploy_requests_terminated_total", package="greeter") == 1
    # The request that was ended got the drain's 503.
    assert value(samples, "hotdeploy_requests_total", package="greeter", version="1.0", status="5xx") == 1


async def test_a_versions_counts_outlive_its_unload_and_go_on_when_it_is_loaded_again(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    await deployer.deploy(write_package(sources, "greeter", "1.0"))
    for _ in range(2):
        assert (await client.get("/greeter/")).status_code == 200
    await deployer.deploy(write_package(sources, "greeter", "2.0"))
    await drained.wait_for("1.0")  # unloaded: its app and figures are gone from the package
    assert (await client.get("/greeter/")).json()["version"] == "2.0"
    samples = await scrape(client)
    assert value(samples, "hotdeploy_requests_total", package="greeter", version="1.0") == 2
    assert value(samples, "hotdeploy_version_info", package="greeter", version="1.0") == 0

    await deployer.rollback("greeter")  # 1.0 again, loaded cold from its archive
    assert (await client.get("/greeter/")).json()["version"] == "1.0"
    samples = await scrape(client)
    assert value(samples, "hotdeploy_requests_total", package="greeter", version="1.0") == 3
    assert value(samples, "hotdeploy_requests_total", package="greeter", version="2.0") == 1


async def test_the_read_token_may_scrape_and_no_token_may_not(
    deployer: Deployer, client: httpx.AsyncClient
) -> None:
    assert value(await scrape(client, READ_TOKEN), "hotdeploy_workers") == 1
    response = await client.get("/_hotdeploy/metrics")
    assert response.status_code == 401
    assert "hotdeploy_" not in response.text


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(
    deployer: Deployer, client: httpx.AsyncClient
) -> None:
    response = await client.get(
        "/_hotdeploy/metrics",
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_the_collector_registers_in_the_hosts_own_registry(deployer: Deployer, sources: Path) -> None:
    await deployer.deploy(write_package(sources, "greeter", "1.0"))
    registry = CollectorRegistry()
    assert deployer.metrics is not None
    registry.register(deployer.metrics)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "hotdeploy_version_info", package="greeter", version="1.0", state="active") == 1


async def test_metrics_can_be_turned_off(tmp_path: Path, sources: Path) -> None:
    deployer = Deployer(home=tmp_path / "home", entry_points=False, metrics=False)
    assert deployer.metrics is None
    async with deployer.running():
        await deployer.deploy(write_package(sources, "greeter", "1.0"))
        transport = httpx.ASGITransport(app=host(deployer))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/greeter/")).status_code == 200
            response = await client.get("/_hotdeploy/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert deployer.package("greeter").active.figures is None  # type: ignore[union-attr]
    assert response.status_code == 404
    assert "metrics are off" in response.json()["detail"]
    assert not (tmp_path / "home" / "metrics").exists()


def other_worker() -> dict[str, Any]:
    """Another worker's metrics file: greeter 1.0 active there, 4 requests in flight, 11 served."""
    return {
        "worker": "other:1:abc",
        "stopped": False,
        "versions": [
            {
                "package": "greeter",
                "version": "1.0",
                "state": "active",
                "sha256": "x",
                "in_flight": 4,
            }
        ],
        "requests": [
            {
                "package": "greeter",
                "version": "1.0",
                "by_class": [0, 10, 0, 0, 1],
                "durations": {"counts": [11] + [0] * 14, "sum": 0.011},
            }
        ],
        "deployments": [["greeter", "deploy", "succeeded", 5]],
        "deployment_seconds": [],
        "drain_seconds": [],
        "terminated": {"greeter": 2},
    }


async def test_other_workers_files_add_up_and_only_live_ones_report_gauges(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    """Another worker's file adds to the counters while it is recent, and also after it went
    quiet (a dead worker's counts stay); its gauges count only while it is live; a file older
    than KEEP_FOR is deleted."""
    await deployer.deploy(write_package(sources, "greeter", "1.0"))
    assert (await client.get("/greeter/")).status_code == 200
    directory = deployer.home / "metrics"
    directory.mkdir(exist_ok=True)
    other = other_worker()
    path = directory / "other_1_abc.json"
    path.write_text(json.dumps(other))

    samples = await scrape(client)
    assert value(samples, "hotdeploy_requests_total", package="greeter", status="2xx") == 11
    assert value(samples, "hotdeploy_requests_total", package="greeter", status="5xx") == 1
    assert value(samples, "hotdeploy_request_duration_seconds_count", package="greeter") == 12
    assert value(samples, "hotdeploy_requests_in_flight", package="greeter") == 4
    assert value(samples, "hotdeploy_version_workers", package="greeter", state="active") == 2
    assert value(samples, "hotdeploy_deployments_total", operation="deploy", outcome="succeeded") == 6
    assert value(samples, "hotdeploy_requests_terminated_total", package="greeter") == 2
    assert value(samples, "hotdeploy_workers") == 2

    quiet = time.time() - LIVE_FOR - 1
    os.utime(path, (quiet, quiet))
    samples = await scrape(client)
    assert value(samples, "hotdeploy_requests_total", package="greeter", status="2xx") == 11
    assert value(samples, "hotdeploy_requests_in_flight", package="greeter") == 0
    assert value(samples, "hotdeploy_version_workers", package="greeter", state="active") == 1
    assert value(samples, "hotdeploy_workers") == 1

    gone = time.time() - KEEP_FOR - 1
    os.utime(path, (gone, gone))
    samples = await scrape(client)
    assert value(samples, "hotdeploy_requests_total", package="greeter", status="2xx") == 1
    assert not path.exists()


async def test_traffic_adds_up_the_live_workers_of_the_host(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    """What the UI's shares come from: this worker's counts plus each live worker's file."""
    await deployer.deploy(write_package(sources, "greeter", "1.0"))
    assert (await client.get("/greeter/")).status_code == 200
    alone = await anyio.to_thread.run_sync(deployer.traffic)
    assert alone["workers"] == 1
    assert alone["packages"] == {"greeter": {"1.0": {"state": "active", "in_flight": 0, "served": 1}}}

    path = deployer.home / "metrics" / "other_1_abc.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(other_worker()))
    both = await anyio.to_thread.run_sync(deployer.traffic)
    assert both["workers"] == 2
    assert both["packages"] == {"greeter": {"1.0": {"state": "active", "in_flight": 4, "served": 12}}}

    quiet = time.time() - LIVE_FOR - 1
    os.utime(path, (quiet, quiet))  # a worker that went quiet is not in the shares
    assert (await anyio.to_thread.run_sync(deployer.traffic))["workers"] == 1


async def test_a_stopped_worker_leaves_its_counters_for_the_others(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    first = Deployer(home=home, entry_points=False)
    async with first.running():
        await first.deploy(write_package(sources, "greeter", "1.0"))
        transport = httpx.ASGITransport(app=host(first))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for _ in range(3):
                assert (await client.get("/greeter/")).status_code == 200
    second = Deployer(home=home, entry_points=False)
    async with second.running():
        transport = httpx.ASGITransport(app=host(second))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/greeter/")).status_code == 200
            samples = await scrape(client)
    # 3 from the stopped worker's file, 1 from this one; only this one is live.
    assert value(samples, "hotdeploy_requests_total", package="greeter", status="2xx") == 4
    assert value(samples, "hotdeploy_version_workers", package="greeter", version="1.0", state="active") == 1
    assert value(samples, "hotdeploy_workers") == 1


def test_every_worker_of_a_real_uvicorn_is_reported(tmp_path: Path) -> None:
    """uvicorn --workers 2: requests spread over both workers; a scrape, which one worker
    answers, reports the requests of both."""
    with running_server(tmp_path, workers=2) as server:
        server.deployed(build_package(tmp_path / "sources", "greeter", "1.0"))
        workers = server.wait_for_workers("greeter", "1.0")
        answers = server.sample("greeter", count=100, reach={worker_pid(w) for w in workers})
        sent = sum(answers.values())
        assert len({pid for _, pid in answers}) == 2

        def scraped() -> Samples | None:
            response = server.admin.get(server.url + "/_hotdeploy/metrics")
            assert response.status_code == 200, response.text
            samples = parse(response.text)
            reported = value(
                samples, "hotdeploy_requests_total", package="greeter", version="1.0", status="2xx"
            )
            return samples if reported == sent and value(samples, "hotdeploy_workers") == 2 else None

        samples = wait_for("both workers' requests in the metrics", scraped, timeout=20, interval=0.2)
        assert (
            value(samples, "hotdeploy_version_workers", package="greeter", version="1.0", state="active") == 2
        )
        assert value(samples, "hotdeploy_deployments_total", package="greeter", outcome="succeeded") == 1

        # The UI's traffic events add up both workers too, whichever worker serves the stream.
        with server.admin.stream("GET", server.url + "/_hotdeploy/events?traffic=true", timeout=30) as events:
            traffic = None
            for seen, line in enumerate(events.iter_lines()):
                assert seen < 90, "no traffic event counted both workers' requests"  # 30 events, ~30 s
                if line.startswith("data: "):
                    traffic = json.loads(line.removeprefix("data: "))
                    if traffic["type"] == "traffic" and traffic["workers"] == 2:
                        break
        assert traffic is not None
        assert traffic["packages"]["greeter"]["1.0"]["served"] == sent


def test_the_counts_of_the_last_unloaded_versions_of_a_package_are_kept() -> None:
    """Per package, the newest RETIRED_PER_PACKAGE unloaded versions; a version unloaded twice
    adds up; another package's are kept apart."""
    figures = WorkerFigures()
    limit = WorkerFigures.RETIRED_PER_PACKAGE

    def unload(package: str, version: str, requests: int) -> None:
        counted = RequestFigures()
        for _ in range(requests):
            counted.observe(200, 0.001)
        figures.unloaded(SimpleNamespace(name=package, version=version, figures=counted))  # type: ignore[arg-type]

    for n in range(limit + 2):
        unload("greeter", f"1.{n}", 1)
    unload("greeter", f"1.{limit + 1}", 2)  # again: 1 + 2
    unload("other", "1.0", 5)
    requests = {(r["package"], r["version"]): r["by_class"][1] for r in figures.snapshot("w", [])["requests"]}
    assert set(requests) == {("greeter", f"1.{n}") for n in range(2, limit + 2)} | {("other", "1.0")}
    assert requests[("greeter", f"1.{limit + 1}")] == 3
    assert requests[("other", "1.0")] == 5
