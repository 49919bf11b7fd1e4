from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import testkit
from drains import Drained
from starlette_hotdeploy import Deployer, HotDeployMiddleware, Store

S = TypeVar("S", bound=Store)

# tests/postgres.py: the throwaway PostgreSQL's fixtures; pytester: a user's run of our pytest plugin.
pytest_plugins = ["postgres", "pytester"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _reset_testkit() -> Iterator[None]:
    testkit.reset()
    yield
    testkit.reset()


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """Where tests write package sources."""
    path = tmp_path / "sources"
    path.mkdir()
    return path


@pytest.fixture
async def deployer(tmp_path: Path) -> AsyncIterator[Deployer]:
    deployer = Deployer(home=tmp_path / "home", entry_points=False)
    async with deployer.running():
        yield deployer


@pytest.fixture
def drained(deployer: Deployer) -> Drained:
    """Register a plugin on `deployer` that lets the test wait for drains."""
    plugin = Drained()
    deployer.plugins.register(plugin)
    return plugin


def host_app(deployer: Deployer) -> Starlette:
    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("host")

    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(HotDeployMiddleware, deployer=deployer)
    return app


@asynccontextmanager
async def running_on(
    tmp_path: Path, make_store: Callable[[Path], S]
) -> AsyncIterator[tuple[Deployer, S, httpx.AsyncClient]]:
    """A running deployer on a store of the test's own (gated or failing at will), made on
    `tmp_path / "home"`, and a client to its host app."""
    home = tmp_path / "home"
    home.mkdir()
    store = make_store(home)
    deployer = Deployer(home=home, store=store, entry_points=False)
    async with deployer.running():
        transport = httpx.ASGITransport(app=host_app(deployer))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield deployer, store, client


@pytest.fixture
async def client(deployer: Deployer) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=host_app(deployer))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client
