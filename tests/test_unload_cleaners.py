"""Unload cleaners: what libraries keep of an unloaded version is released, so it is collected;
plugins add cleaners of their own; the collection runs between operations."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from drains import Drained
from packages import write_fastapi_package, write_package
from starlette_hotdeploy import Deployer, Unloaded, VersionState, hookimpl
from starlette_hotdeploy._cleaners import BUILTIN, Collector

pytestmark = pytest.mark.anyio


async def use_shop(client: httpx.AsyncClient, version: str) -> None:
    """Every kind of endpoint once: path param, dependency, body, generic response model."""
    item = await client.get("/shop/items/3", params={"tag": "x"})
    assert item.status_code == 200, item.text
    assert item.json()["version"] == version
    assert item.json()["tags"] == [{"name": "x"}]
    created = await client.post("/shop/items", json={"name": "pen", "price": 2.5, "tags": [{"name": "t"}]})
    assert created.status_code == 201, created.text
    assert created.json()["version"] == version
    invalid = await client.post("/shop/items", json={"name": "", "price": "cheap"})
    assert invalid.status_code == 422
    page = await client.get("/shop/items", params={"limit": 5})
    assert page.status_code == 200, page.text
    assert page.json()["total"] >= 1
    assert (await client.get("/shop/openapi.json")).status_code == 200


async def test_fifty_fastapi_swaps_leave_no_retired_version_alive(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    a = write_fastapi_package(sources, version="1.0")
    b = write_fastapi_package(sources, version="2.0")
    for i in range(50):
        await deployer.deploy(a if i % 2 == 0 else b)
        await use_shop(client, "1.0" if i % 2 == 0 else "2.0")
    await drained.wait(49)
    assert deployer.retired_alive() == []
    assert len({k for k in sys.modules if k.startswith("_hotdeploy_shop_") and "." not in k}) == 1


async def test_without_the_builtin_cleaners_fastapi_keeps_retired_versions_alive(
    deployer: Deployer,
    client: httpx.AsyncClient,
    sources: Path,
    drained: Drained,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the test above guards against (if this fails, FastAPI no longer keeps them)."""
    monkeypatch.setattr("starlette_hotdeploy._cleaners.BUILTIN", {})
    for version in ("1.0", "2.0"):
        await deployer.deploy(write_fastapi_package(sources, version=version))
        await use_shop(client, version)
    await drained.wait(1)
    assert deployer.retired_alive() == ["shop 1.0"]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Unloaded] = []
        self.owned: list[bool] = []

    @hookimpl
    def hotdeploy_unloaded(self, unloaded: Unloaded) -> None:
        self.seen.append(unloaded)
        # Called after the unload: the version's modules are gone already.
        self.owned.append(any(unloaded.owns(name) for name in list(sys.modules)))


class Broken:
    @hookimpl
    def hotdeploy_unloaded(self, unloaded: Unloaded) -> None:
        raise RuntimeError(f"cannot clean {unloaded.version}")


class Late:
    @hookimpl
    async def hotdeploy_unloaded(self, unloaded: Unloaded) -> None:
        pass  # pragma: no cover  (never awaited: refused)


async def test_a_plugin_cleaner_is_called_with_the_unloaded_version(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    recorder = Recorder()
    deployer.plugins.register(recorder, name="recorder")
    first = write_package(sources, version="1.0")
    await deployer.deploy(first)
    active = deployer.package("greeter").active
    assert active is not None
    assert active.namespace is not None
    namespace, root = active.namespace.name, active.root
    await deployer.deploy(write_package(sources, version="2.0"))
    await drained.wait(1)
    [unloaded] = recorder.seen
    assert (unloaded.package, unloaded.version, unloaded.namespace, unloaded.root) == (
        "greeter",
        "1.0",
        namespace,
        root,
    )
    assert unloaded.owns(f"{namespace}.greeter.models")
    assert not unloaded.owns(f"{namespace}x.greeter")
    assert recorder.owned == [False]
    assert (await client.get("/greeter/")).json()["version"] == "2.0"


async def test_a_failing_cleaner_is_logged_and_stops_nothing(
    deployer: Deployer,
    client: httpx.AsyncClient,
    sources: Path,
    drained: Drained,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    deployer.plugins.register(recorder, name="recorder")
    deployer.plugins.register(Broken(), name="broken")
    deployer.plugins.register(Late(), name="late")
    caplog.set_level(logging.ERROR, logger="starlette_hotdeploy")
    await deployer.deploy(write_package(sources, version="1.0"))
    old = deployer.package("greeter").active
    await deployer.deploy(write_package(sources, version="2.0"))
    await drained.wait(1)
    assert old is not None
    assert old.state is VersionState.RETIRED
    assert [u.version for u in recorder.seen] == ["1.0"]  # registered first: called last, still
    messages = [r.getMessage() for r in caplog.records]
    assert any("unload cleaner broken.hotdeploy_unloaded raised RuntimeError" in m for m in messages)
    assert any("unload cleaner late.hotdeploy_unloaded raised TypeError" in m for m in messages)
    # The next deployment and its unload are not disturbed.
    await deployer.deploy(write_package(sources, version="3.0"))
    await drained.wait(2)
    assert (await client.get("/greeter/")).json()["version"] == "3.0"
    assert [u.version for u in recorder.seen] == ["1.0", "2.0"]
    assert deployer.retired_alive() == []


async def test_a_failing_builtin_cleaner_is_logged_with_its_name(
    deployer: Deployer,
    sources: Path,
    drained: Drained,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(unloaded: Unloaded) -> None:
        raise KeyError("registry moved")

    monkeypatch.setitem(BUILTIN, "pydantic", broken)
    import pydantic  # noqa: F401  (a built-in cleaner runs only for a library already imported)

    caplog.set_level(logging.ERROR, logger="starlette_hotdeploy")
    await deployer.deploy(write_package(sources, version="1.0"))
    await deployer.deploy(write_package(sources, version="2.0"))
    await drained.wait(1)
    assert any("unload cleaner builtin pydantic raised KeyError" in r.getMessage() for r in caplog.records)
    assert deployer.package("greeter").active is not None


async def test_the_unloaded_version_is_collected_without_asking(
    deployer: Deployer, sources: Path, drained: Drained
) -> None:
    """The engine's collector frees it once no operation runs (retired_alive() is not called)."""
    collector = deployer._engine.collector
    await deployer.deploy(write_package(sources, version="1.0"))
    await deployer.deploy(write_package(sources, version="2.0"))
    await drained.wait(1)
    [(label, refs)] = list(deployer._engine._unloaded)
    assert label == "greeter 1.0"
    with anyio.fail_after(10):
        await collector.wait()
    assert collector.collections >= 1
    assert [ref for ref in refs if ref() is not None] == []


async def test_the_collector_waits_for_operations_to_end() -> None:
    idle = False
    asked = 0
    asked_thrice = anyio.Event()

    def idle_now() -> bool:
        nonlocal asked
        asked += 1
        if asked == 3:
            asked_thrice.set()
        return idle

    collector = Collector(idle_now, settle=0.001, patience=60)
    async with anyio.create_task_group() as tg:
        tg.start_soon(collector.run)
        collector.unloaded()
        with anyio.fail_after(5):
            await asked_thrice.wait()  # it looked three times, each during an operation
        assert (collector.collections, collector.pending) == (0, True)
        idle = True
        with anyio.fail_after(5):
            await collector.wait()
        assert collector.collections == 1
        assert collector.last_ms is not None
        tg.cancel_scope.cancel()


async def test_a_poke_makes_the_collector_look_again_at_once() -> None:
    """An operation that ends pokes the collector: it collects then, not at its next look (an
    hour away here)."""
    idle = False
    looked = anyio.Event()

    def idle_now() -> bool:
        looked.set()
        return idle

    collector = Collector(idle_now, settle=0.001, patience=3600, look_every=3600)
    async with anyio.create_task_group() as tg:
        tg.start_soon(collector.run)
        collector.unloaded()
        with anyio.fail_after(5):
            await looked.wait()  # during an operation: it waits for a poke
        assert collector.collections == 0
        idle = True
        collector.poke()
        with anyio.fail_after(5):
            await collector.wait()
        assert collector.collections == 1
        tg.cancel_scope.cancel()


class HeldCheck:
    """A post-activation check (the new version is active: none is being prepared) that waits
    until `release` is set."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()

    @hookimpl
    async def hotdeploy_check_after_activate(self, version: object, previous: object) -> None:
        self.entered.set()
        await self.release.wait()


async def test_a_collection_waits_for_the_deployment_under_way_and_follows_it_at_once(
    deployer: Deployer, sources: Path
) -> None:
    """A version is unloaded (its package removed) while a deployment of another package is
    under way: the collection waits for the deployment's answer, then runs at once."""
    collector = deployer._engine.collector
    collector.patience = 3600  # never overdue here
    collector.look_every = 3600  # only a poke makes it look again
    await deployer.deploy(write_package(sources, version="1.0"))
    await deployer.deploy(write_package(sources, name="other", version="1.0"))
    looked_while_busy = anyio.Event()
    idle = collector._idle

    def watched() -> bool:
        now = idle()
        if not now:
            looked_while_busy.set()
        return now

    collector._idle = watched
    held = HeldCheck()
    deployer.plugins.register(held)
    before = collector.collections

    async def remove_other_meanwhile() -> None:
        await held.entered.wait()
        await deployer.undeploy("other")  # other 1.0 unloaded: a collection is wanted
        await looked_while_busy.wait()
        held.release.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(remove_other_meanwhile)
            record = await deployer.deploy(write_package(sources, version="2.0"))
            assert record.to_version == "2.0"
            assert collector.collections == before  # not inside the deployment
        await collector.wait()  # then (greeter 1.0 may have its own, later)
    assert collector.collections > before


async def test_the_collector_collects_anyway_when_operations_never_end() -> None:
    collector = Collector(lambda: False, settle=0.001, patience=0.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(collector.run)
        collector.unloaded()
        with anyio.fail_after(5):
            await collector.wait()
        assert collector.collections == 1
        tg.cancel_scope.cancel()
