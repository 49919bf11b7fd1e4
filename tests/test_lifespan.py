"""Lifespans: the middleware runs the deployer inside the server's lifespan, and each version's
own lifespan runs in its own supervisor task."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

import testkit
from packages import write_package
from starlette_hotdeploy import Deployer, HotDeployMiddleware
from starlette_hotdeploy._types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio


class LifespanDriver:
    """Speaks the server side of the ASGI lifespan protocol to an app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app, self._from_server = anyio.create_memory_object_stream[Message](4)
        self._to_server, self.from_app = anyio.create_memory_object_stream[Message](4)
        self.state: dict[str, Any] = {}

    async def run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        await self.app(scope, self._from_server.receive, self._to_server.send)

    async def startup(self) -> str:
        await self.to_app.send({"type": "lifespan.startup"})
        return str((await self.from_app.receive())["type"])

    async def shutdown(self) -> str:
        await self.to_app.send({"type": "lifespan.shutdown"})
        return str((await self.from_app.receive())["type"])


async def test_packages_start_after_and_stop_before_the_host(tmp_path: Path, sources: Path) -> None:
    @contextlib.asynccontextmanager
    async def host_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        testkit.calls.append("host startup")
        yield {"db": "host db"}
        testkit.calls.append("host shutdown")

    async def home(request: Any) -> JSONResponse:
        return JSONResponse({"db": request.state.db})

    deployer = Deployer(home=tmp_path / "home", entry_points=False)
    app = Starlette(
        routes=[Route("/", home)],
        lifespan=host_lifespan,
        middleware=[Middleware(HotDeployMiddleware, deployer=deployer)],
    )
    driver = LifespanDriver(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.run)
        assert await driver.startup() == "lifespan.startup.complete"
        assert deployer.is_running
        await deployer.deploy(write_package(sources, version="1.0"))

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            # uvicorn copies the lifespan state into each request; ASGITransport does not.
            response = await client.get("/greeter/state")
            assert response.json()["owner"] == "greeter 1.0"

        assert await driver.shutdown() == "lifespan.shutdown.complete"
    assert testkit.calls == ["host startup", "startup greeter 1.0", "shutdown greeter 1.0", "host shutdown"]
    assert not deployer.is_running


async def test_on_restart_stored_packages_start_after_and_stop_before_the_host(
    tmp_path: Path, sources: Path
) -> None:
    @contextlib.asynccontextmanager
    async def host_lifespan(app: Starlette) -> AsyncIterator[None]:
        # What the packages had done by now: restored packages must not have started yet.
        testkit.calls.append(f"host startup ({(deployer.status() and 'packages up') or 'no package'})")
        yield
        testkit.calls.append(f"host shutdown ({len(deployer.status())} package(s) served)")

    home = tmp_path / "home"
    async with Deployer(home=home, entry_points=False).running() as first:
        await first.deploy(write_package(sources, version="1.0"))
    testkit.calls.clear()

    deployer = Deployer(home=home, entry_points=False)  # the server restarts on the same home
    app = Starlette(lifespan=host_lifespan, middleware=[Middleware(HotDeployMiddleware, deployer=deployer)])
    driver = LifespanDriver(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.run)
        assert await driver.startup() == "lifespan.startup.complete"
        assert [p.active_version for p in deployer.status()] == ["1.0"]  # restored before the answer
        assert await driver.shutdown() == "lifespan.shutdown.complete"
    assert testkit.calls == [
        "host startup (no package)",
        "startup greeter 1.0",
        "shutdown greeter 1.0",
        "host shutdown (0 package(s) served)",
    ]


async def test_a_host_startup_failure_restores_nothing(tmp_path: Path, sources: Path) -> None:
    @contextlib.asynccontextmanager
    async def broken(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("host database unreachable")
        yield

    home = tmp_path / "home"
    async with Deployer(home=home, entry_points=False).running() as first:
        await first.deploy(write_package(sources, version="1.0"))
    testkit.calls.clear()
    deployer = Deployer(home=home, entry_points=False)
    app = Starlette(lifespan=broken, middleware=[Middleware(HotDeployMiddleware, deployer=deployer)])
    driver = LifespanDriver(app)

    raised: list[BaseException] = []

    async def run() -> None:
        try:
            await driver.run()
        except BaseException as exc:  # Starlette re-raises it after answering "failed"
            raised.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        assert await driver.startup() == "lifespan.startup.failed"
    assert testkit.calls == []  # no package started for a host that did not
    assert not deployer.is_running
    assert "host database unreachable" in repr(raised)


async def test_host_app_without_lifespan_support(tmp_path: Path, sources: Path) -> None:
    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"  # raises for lifespan, like many raw ASGI apps

    deployer = Deployer(home=tmp_path / "home", entry_points=False)
    driver = LifespanDriver(HotDeployMiddleware(plain, deployer=deployer))
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.run)
        assert await driver.startup() == "lifespan.startup.complete"
        await deployer.deploy(write_package(sources, version="1.0"))
        assert await driver.shutdown() == "lifespan.shutdown.complete"
    assert testkit.calls == ["startup greeter 1.0", "shutdown greeter 1.0"]


async def test_host_app_that_returns_without_speaking_lifespan(tmp_path: Path, sources: Path) -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return  # neither raises nor answers

    deployer = Deployer(home=tmp_path / "home", entry_points=False)
    driver = LifespanDriver(HotDeployMiddleware(silent, deployer=deployer))
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.run)
        assert await driver.startup() == "lifespan.startup.complete"
        await deployer.deploy(write_package(sources, version="1.0"))
        assert await driver.shutdown() == "lifespan.shutdown.complete"
    assert testkit.calls == ["startup greeter 1.0", "shutdown greeter 1.0"]


async def test_sub_app_without_lifespan_support(deployer: Deployer, sources: Path) -> None:
    raw = (
        "async def app(scope, receive, send):\n"
        "    assert scope['type'] == 'http'\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'raw'})\n"
    )
    record = await deployer.deploy(write_package(sources, version="1.0", app=raw))
    assert record.outcome == "succeeded"
    version = deployer.package("greeter").active
    assert version is not None
    assert version.state_data == {}


async def test_middleware_makes_a_default_deployer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTDEPLOY_HOME", str(tmp_path / "from-env"))
    middleware = HotDeployMiddleware(Starlette())
    assert middleware.deployer.home == tmp_path / "from-env"
    assert middleware.deployer._mount_table is middleware._mounts
    assert not (tmp_path / "from-env").exists()  # constructing does no I/O: the store opens at start
