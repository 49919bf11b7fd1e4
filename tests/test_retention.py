"""Retention keeps its promise: what `status` offers as available can be activated, after many
deployments with failed ones among them, rollbacks and activations, and after a restart.

Only versions that were active once are offered, and count toward `keep_versions`; the ones kept
are the most recently activated. A failed upload leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import host_app
from packages import write_package
from starlette_hotdeploy import Deployer, DeploymentError, PackageVersion, hookimpl
from starlette_hotdeploy._store_url import open_store

pytestmark = pytest.mark.anyio

KEEP = 3

# Ways a deployment fails before its commit.
FAILURES: dict[str, dict[str, Any]] = {
    "import raises": {"app": "raise RuntimeError('no database')\n"},
    "health check fails": {"manifest_extra": 'health = "/nope"\n'},
}


class Refuse:
    """A pre-activation check that refuses the versions in `versions`."""

    def __init__(self) -> None:
        self.versions: set[str] = set()

    @hookimpl
    def hotdeploy_check_before_activate(self, version: PackageVersion) -> str | None:
        return "refused by the test" if version.version in self.versions else None


@asynccontextmanager
async def running(home: Path, *plugins: object) -> AsyncIterator[tuple[Deployer, httpx.AsyncClient]]:
    deployer = Deployer(home=home, plugins=plugins, entry_points=False, keep_versions=KEEP)
    transport = httpx.ASGITransport(app=host_app(deployer))
    async with deployer.running(), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield deployer, client


def offered(deployer: Deployer) -> dict[str, str]:
    """What `status` lists as available: version -> sha256."""
    (status,) = [p for p in deployer.status() if p.name == "greeter"]
    return dict(status.available_versions)


async def served(client: httpx.AsyncClient) -> str:
    response = await client.get("/greeter/")
    assert response.status_code == 200, response.text
    return str(response.json()["version"])


async def deploy_failing(deployer: Deployer, sources: Path, version: str, how: str) -> str:
    """Deploy a version that fails before its commit; its sha256."""
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(write_package(sources, version=version, **FAILURES[how]))
    assert caught.value.deployment.outcome == "failed"
    sha256 = caught.value.deployment.sha256
    assert sha256 is not None
    return sha256


async def keeps_its_promise(
    deployer: Deployer, client: httpx.AsyncClient, home: Path, failed: Mapping[str, str]
) -> dict[str, str]:
    """No failed version is offered, at most KEEP are, the store agrees, and every one offered
    can be activated (then the one active before is again). Returns what is offered."""
    available = offered(deployer)
    assert not available.keys() & failed.keys(), available
    assert len(available) <= KEEP, available
    store = open_store(home)
    try:
        assert {a.version: a.sha256 for a in store.archives("greeter")} == available
        for version, sha256 in failed.items():  # a failed upload is gone: archive and unpacked copy
            assert store.archive("greeter", version, sha256) is None, version
            assert not (home / "packages" / "greeter" / f"{version}-{sha256[:12]}").exists(), version
    finally:
        store.close()
    active = deployer.package("greeter").active
    assert active is not None
    for version in [*available, active.version]:
        record = await deployer.activate("greeter", version)
        assert record.outcome == "succeeded", record
        assert await served(client) == version
    assert offered(deployer) == available  # activating what is kept prunes none of it
    return available


async def test_what_status_offers_can_always_be_activated(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    failed: dict[str, str] = {}
    async with running(home) as (deployer, client):

        async def deploy(version: str) -> None:
            await deployer.deploy(write_package(sources, version=version))
            assert await served(client) == version

        async def fail(version: str, how: str) -> None:
            failed[version] = await deploy_failing(deployer, sources, version, how)

        steps: list[Callable[[], Awaitable[object]]] = [
            lambda: deploy("1.0"),
            lambda: deploy("2.0"),
            lambda: fail("2.5", "import raises"),
            lambda: deploy("3.0"),
            lambda: fail("3.5", "health check fails"),
            lambda: fail("3.6", "import raises"),
            lambda: deploy("4.0"),
            lambda: deployer.rollback("greeter"),
            lambda: fail("4.5", "health check fails"),
            lambda: deploy("5.0"),
            lambda: deployer.activate("greeter", min(offered(deployer))),  # the oldest kept: last now
            lambda: fail("5.5", "import raises"),
            lambda: deploy("6.0"),
            lambda: deployer.rollback("greeter"),
        ]
        for step in steps:
            await step()
            before_restart = await keeps_its_promise(deployer, client, home, failed)
        assert len(before_restart) == KEEP
        active = deployer.package("greeter").active
        assert active is not None

    async with running(home) as (deployer, client):
        assert await served(client) == active.version
        assert offered(deployer) == before_restart
        await keeps_its_promise(deployer, client, home, failed)
        failed["6.5"] = await deploy_failing(deployer, sources, "6.5", "health check fails")
        await keeps_its_promise(deployer, client, home, failed)
        await deployer.deploy(write_package(sources, version="7.0"))
        assert "7.0" in await keeps_its_promise(deployer, client, home, failed)


async def test_the_versions_kept_are_the_most_recently_activated(tmp_path: Path, sources: Path) -> None:
    async with running(tmp_path / "home") as (deployer, _):
        for version in ("1.0", "2.0", "3.0", "4.0"):
            await deployer.deploy(write_package(sources, version=version))
        assert sorted(offered(deployer)) == ["2.0", "3.0", "4.0"]
        await deployer.activate("greeter", "2.0")  # uploaded before 4.0, active after it
        await deployer.activate("greeter", "3.0")
        await deployer.deploy(write_package(sources, version="5.0"))
        # 3.0 (the rollback target) and 5.0 are kept, then the most recently active: 2.0, not
        # 4.0, the newer upload.
        assert sorted(offered(deployer)) == ["2.0", "3.0", "5.0"]


async def test_failed_uploads_count_toward_nothing(tmp_path: Path, sources: Path) -> None:
    async with running(tmp_path / "home") as (deployer, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        await deployer.deploy(write_package(sources, version="2.0"))
        for n in range(5):
            await deploy_failing(deployer, sources, f"2.{n + 1}", list(FAILURES)[n % 2])
        await deployer.deploy(write_package(sources, version="3.0"))
        # The failed ones pushed nothing out: 1.0 is still there to go back to.
        assert sorted(offered(deployer)) == ["1.0", "2.0", "3.0"]
        await deployer.activate("greeter", "1.0")
        assert await served(client) == "1.0"


async def test_a_kept_version_that_fails_when_deployed_again_stays_available(
    tmp_path: Path, sources: Path
) -> None:
    """Its archive was active once: the failure must not discard it."""
    refuse = Refuse()
    home = tmp_path / "home"
    async with running(home, refuse) as (deployer, client):
        first = write_package(sources, version="1.0")
        await deployer.deploy(first)
        await deployer.deploy(write_package(sources, version="2.0"))
        kept = offered(deployer)
        refuse.versions.add("1.0")
        with pytest.raises(DeploymentError, match="refused by the test"):
            await deployer.deploy(first)  # the same archive as the kept 1.0
        assert offered(deployer) == kept
        refuse.versions.clear()
        await keeps_its_promise(deployer, client, home, {})
