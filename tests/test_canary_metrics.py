"""A running canary in the metrics: its weight on every worker, its step and its analyses, read
back from the exposition the admin API serves while the canary moves (promote, abort)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from packages import write_package
from starlette_hotdeploy import Deployer, hookimpl
from test_metrics import host, scrape, value

pytestmark = pytest.mark.anyio

SHOP = {"package": "shop", "version": "1.1"}


class AbstainingAnalysis:
    """Abstains on every look (the verdict is `inconclusive`, the canary stays on its step) and
    lets the test wait for the next look."""

    def __init__(self) -> None:
        self.looked = anyio.Event()

    @hookimpl
    def hotdeploy_analyze_canary(self, package: str) -> None:
        # Synchronous: the run records this analysis before the test (woken by the event) runs.
        self.looked.set()

    async def next_look(self) -> None:
        self.looked = anyio.Event()
        with anyio.fail_after(10):
            await self.looked.wait()


@pytest.fixture
async def client(deployer: Deployer) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=host(deployer), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def until(deployer: Deployer, holds: Callable[[], bool]) -> None:
    """Wait until `holds()`, looking again after each of the deployer's events (a canary's every
    step saves its record)."""
    with anyio.fail_after(10):
        async with deployer.events.subscribe() as events:
            while not holds():
                await events.receive()


def canary_weight(deployer: Deployer) -> float | None:
    canary = deployer.status("shop")[0].canary
    return None if canary is None else float(canary["weight_percent"])


async def test_a_running_canary_reports_its_weight_step_and_analyses(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    analysis = AbstainingAnalysis()
    deployer.plugins.register(analysis)
    await deployer.deploy(write_package(sources, "shop", "1.0"))
    await deployer.deploy(write_package(sources, "shop", "1.1"), canary="25%, 50%")

    samples = await scrape(client)
    assert value(samples, "hotdeploy_canary_weight_ratio", **SHOP) == 0.25
    assert value(samples, "hotdeploy_canary_step", **SHOP) == 1
    assert value(samples, "hotdeploy_canary_steps", **SHOP) == 3  # 25%, 50%, then 100%: promoted

    await analysis.next_look()
    samples = await scrape(client)
    assert value(samples, "hotdeploy_canary_last_verdict", verdict="inconclusive", **SHOP) == 1
    assert value(samples, "hotdeploy_canary_last_verdict", verdict="pass", **SHOP) == 0
    assert value(samples, "hotdeploy_canary_analyses_total", verdict="inconclusive", **SHOP) >= 1

    await deployer.promote_canary("shop")
    await until(deployer, lambda: canary_weight(deployer) == 50)
    samples = await scrape(client)
    assert value(samples, "hotdeploy_canary_weight_ratio", **SHOP) == 0.5
    assert value(samples, "hotdeploy_canary_step", **SHOP) == 2

    await deployer.abort_canary("shop")
    await until(deployer, lambda: canary_weight(deployer) is None)
    samples = await scrape(client)
    running = {"hotdeploy_canary_weight_ratio", "hotdeploy_canary_step", "hotdeploy_canary_last_verdict"}
    assert not [name for name, _ in samples if name in running]  # no canary, no gauges
    # The analyses stay counted (a counter never goes back).
    assert value(samples, "hotdeploy_canary_analyses_total", verdict="inconclusive", **SHOP) >= 1


def other_worker(weight: int) -> dict[str, Any]:
    """Another worker's metrics file, splitting shop at `weight` basis points (it does not run
    the canary: no step), with two analyses it counted for an earlier canary."""
    return {
        "worker": "other:1:abc",
        "stopped": False,
        "versions": [],
        "requests": [],
        "deployments": [],
        "deployment_seconds": [],
        "drain_seconds": [],
        "terminated": {},
        "canaries": [{"package": "shop", "version": "1.1", "weight": weight}],
        "canary_analyses": [["shop", "1.0", "pass", 2]],
    }


async def test_while_a_step_spreads_the_host_reports_its_lowest_weight(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    """Each worker reports the weight it splits with; until every worker took a new step, the
    host's weight is the share every one of them gives at least. The step comes from the
    worker that runs the canary."""
    await deployer.deploy(write_package(sources, "shop", "1.0"))
    await deployer.deploy(write_package(sources, "shop", "1.1"), canary="25%, 50%")
    directory = deployer.home / "metrics"
    directory.mkdir(exist_ok=True)
    path = directory / "other_1_abc.json"

    path.write_text(json.dumps(other_worker(500)))
    samples = await scrape(client)
    assert value(samples, "hotdeploy_canary_weight_ratio", **SHOP) == 0.05
    assert value(samples, "hotdeploy_canary_step", **SHOP) == 1
    assert (
        value(samples, "hotdeploy_canary_analyses_total", package="shop", version="1.0", verdict="pass") == 2
    )

    path.write_text(json.dumps(other_worker(5000)))
    samples = await scrape(client)
    assert value(samples, "hotdeploy_canary_weight_ratio", **SHOP) == 0.25
