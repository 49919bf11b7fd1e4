"""Durable state: restarts restore the confirmed versions, workers sharing a home converge, the
watch folder deploys dropped archives, old archives are pruned.

Two Deployers on one home in one event loop behave as two worker processes of a host: they only
talk through the store (tests/test_workers.py does the same with real processes).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

import testkit
from conftest import host_app
from packages import write_package, zip_directory
from starlette_hotdeploy import Deployer, DeploymentError, hookimpl
from starlette_hotdeploy._watch import WatchFolder

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def worker(
    home: Path, *plugins: object, **options: object
) -> AsyncIterator[tuple[Deployer, httpx.AsyncClient]]:
    """A Deployer on `home`, running, with a client for its host app."""
    deployer = Deployer(home=home, plugins=plugins, entry_points=False, **options)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=host_app(deployer))
    async with deployer.running(), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield deployer, client


async def answer(client: httpx.AsyncClient, path: str = "/greeter/") -> str:
    response = await client.get(path)
    return str(response.json()["version"]) if response.status_code == 200 else str(response.status_code)


async def test_a_restart_restores_the_confirmed_versions(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    async with worker(home) as (deployer, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        await deployer.deploy(write_package(sources, version="2.0"))
        await deployer.deploy(write_package(sources, name="other", version="3.0"))
        first_ids = [r.id for r in deployer.deployments()]

    async with worker(home) as (deployer, client):
        # Restored during running(), before any traffic: no deployment involved.
        assert (await answer(client), await answer(client, "/other/")) == ("2.0", "3.0")
        assert [r.id for r in deployer.deployments()] == first_ids  # the history survived too
        assert deployer.package("greeter").lineage == ["1.0", "2.0"]
        record = await deployer.rollback("greeter")  # from the archive kept in the store
        assert record.to_version == "1.0"
        assert await answer(client) == "1.0"

    async with worker(home) as (_, client):
        assert await answer(client) == "1.0"  # the rollback was confirmed too


SLOW_BASE = """
import contextlib

import anyio
import testkit
from starlette.applications import Starlette


@contextlib.asynccontextmanager
async def lifespan(app):
    await anyio.sleep(0.3)  # a slow start, which a dependant restored beside it must wait for
    testkit.calls.append("base started")
    yield


app = Starlette(lifespan=lifespan)
"""


async def test_a_restart_imports_the_bytecode_cached_in_the_version_copy(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under PYTHONDONTWRITEBYTECODE (as in many container images) a version's bytecode is still
    cached in its unpacked copy, the deployer's own: a restart does not compile it again."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    home = tmp_path / "home"
    async with worker(home) as (deployer, client):
        await deployer.deploy(write_package(sources, version="1.0"))
        version = deployer.package("greeter").active
        assert version is not None
        source = next(version.root.rglob("app.py"))

    assert await anyio.Path(importlib.util.cache_from_source(str(source))).is_file()
    compiled: list[str] = []
    original = importlib.machinery.SourceFileLoader.source_to_code

    def counting(self: object, data: object, path: str, **options: object) -> object:
        compiled.append(Path(path).name)
        return original(self, data, path, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.machinery.SourceFileLoader, "source_to_code", counting)
    async with worker(home) as (deployer, client):
        assert await answer(client) == "1.0"
    assert compiled == []  # the restart read app.py's bytecode (and __init__'s) from the copy


async def test_a_restart_starts_each_package_after_the_packages_it_requires(
    tmp_path: Path, sources: Path
) -> None:
    home = tmp_path / "home"
    async with worker(home) as (deployer, _):
        await deployer.deploy(write_package(sources, name="base", version="1.0", app=SLOW_BASE))
        for name in ("consumer", "another"):  # restored in the same batch as base
            await deployer.deploy(
                write_package(sources, name=name, version="1.0", manifest_extra='requires = { base = ">=1" }')
            )
    testkit.calls.clear()
    async with worker(home) as (_, client):
        assert await answer(client, "/consumer/") == "1.0"
    started = [call for call in testkit.calls if call.startswith(("base", "startup"))]
    assert started[0] == "base started", started
    assert sorted(started[1:]) == ["startup another 1.0", "startup consumer 1.0"]


async def test_a_confirmed_version_that_no_longer_starts_falls_back_to_the_one_before(
    tmp_path: Path, sources: Path
) -> None:
    home = tmp_path / "home"
    async with worker(home) as (deployer, _):
        await deployer.deploy(write_package(sources, version="1.0"))
        await deployer.deploy(write_package(sources, version="2.0"))
    # 2.0's archive and unpacked copy are lost (a disk problem): 1.0, the salvage copy, serves.
    for path in [
        *(home / "archives" / "greeter").glob("2.0-*"),
        *(home / "packages" / "greeter").glob("2.0-*"),
    ]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    async with worker(home) as (_, client):
        assert await answer(client) == "1.0"


async def test_a_deployment_answers_once_every_worker_serves_it(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    async with worker(home) as (a, client_a), worker(home) as (b, client_b):
        await a.deploy(write_package(sources, version="1.0"))
        assert await answer(client_b) == "1.0"  # b switched before a answered
        record = await b.deploy(write_package(sources, version="2.0"))
        assert (await answer(client_a), await answer(client_b)) == ("2.0", "2.0")
        converge = next(s for s in record.steps if s.name == "converge")
        assert converge.detail == "2 worker(s) serve it"
        (status,) = a.status()
        assert set(status.workers.values()) == {"2.0"}
        assert set(status.workers) == {a.worker_id, b.worker_id}
        await a.undeploy("greeter")
        assert (await answer(client_a), await answer(client_b)) == ("404", "404")


class RefuseHere:
    """A check that fails in one worker only."""

    @hookimpl
    def hotdeploy_check_before_activate(self, version: object) -> str | None:
        return "disk full on this worker" if getattr(version, "version", None) == "2.0" else None


async def test_a_check_failing_in_one_worker_aborts_everywhere(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    async with worker(home) as (a, client_a), worker(home, RefuseHere()) as (b, client_b):
        await a.deploy(write_package(sources, version="1.0"))
        with pytest.raises(DeploymentError) as caught:
            await a.deploy(write_package(sources, version="2.0"))
        assert f"worker {b.worker_id}: " in str(caught.value)
        assert "disk full on this worker" in str(caught.value)
        assert caught.value.step == "prepare workers"
        assert (await answer(client_a), await answer(client_b)) == ("1.0", "1.0")
        # The version b prepared was discarded there too; a confirmed restart serves 1.0.
        assert [v.version for v in b.package("greeter").loaded] == ["1.0"]
    async with worker(home) as (_, client):
        assert await answer(client) == "1.0"


async def test_a_worker_that_starts_later_catches_up(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    async with AsyncExitStack() as stack:
        a, _ = await stack.enter_async_context(worker(home))
        await a.deploy(write_package(sources, version="1.0"))
        await a.deploy(write_package(sources, name="other", version="1.5"))
        b, client_b = await stack.enter_async_context(worker(home))
        assert (await answer(client_b), await answer(client_b, "/other/")) == ("1.0", "1.5")
        await b.deploy(write_package(sources, version="2.0"))
        assert a.package("greeter").active.version == "2.0"  # type: ignore[union-attr]


async def test_the_watch_folder_deploys_complete_archives(tmp_path: Path, sources: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    async with worker(tmp_path / "home") as (deployer, client):
        folder = WatchFolder(inbox, deployer._deploy_dropped)
        good = zip_directory(write_package(sources, version="1.0"), inbox / "greeter-1.0.zip")
        partial = inbox / "greeter-2.0.zip.part"  # an upload still being written
        partial.write_bytes(good.read_bytes()[:100])
        assert await folder.scan() == []  # seen once: not yet known to be complete
        assert await folder.scan() == [good]
        assert '"outcome": "succeeded"' in (inbox / "greeter-1.0.zip.deployed").read_text()
        assert await answer(client) == "1.0"
        assert await folder.scan() == []  # deployed once

        broken = zip_directory(write_package(sources, version="2.0", app="def broken(:\n"), inbox / "bad.zip")
        await folder.scan()
        assert await folder.scan() == [broken]
        failed = (inbox / "bad.zip.failed").read_text()
        assert failed.startswith("greeter 2.0: syntax error in 'greeter.app' (app.py:1)")
        assert await answer(client) == "1.0"
        assert not (inbox / "greeter-2.0.zip.part.deployed").exists()


async def test_the_watch_folder_runs_in_the_deployer(tmp_path: Path, sources: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    zip_directory(write_package(sources, version="1.0"), inbox / "g.zip")
    activated = anyio.Event()

    class Activated:
        @hookimpl
        def hotdeploy_activated(self) -> None:
            activated.set()

    async with worker(tmp_path / "home", Activated(), watch=inbox) as (_, client):
        with anyio.fail_after(10):
            await activated.wait()
        assert await answer(client) == "1.0"


async def test_old_archives_are_pruned(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    async with worker(home, keep_versions=2) as (deployer, client):
        for version in ("1.0", "2.0", "3.0", "4.0"):
            await deployer.deploy(write_package(sources, version=version))
        assert sorted(p.name.split("-")[0] for p in (home / "archives" / "greeter").iterdir()) == [
            "3.0",
            "4.0",
        ]
        assert sorted(deployer.package("greeter").available) == ["3.0", "4.0"]
        await deployer.rollback("greeter")  # the version a rollback needs is always kept
        assert await answer(client) == "3.0"
