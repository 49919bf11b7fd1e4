"""Host protection applies to packages: where HotDeployMiddleware sits, and HotDeployRoute.

An API-key middleware on the host guards the packages when HotDeployMiddleware sits inside it,
and when the packages are a route of the host's router; it does not when HotDeployMiddleware is
outside it (the documented wrong placement, docs/operations.md "Where the middleware sits").
The rest covers the route form itself: deploy, upgrade, undeploy, websockets, url_for, the
lifespan (a restart restores the packages before the first request), routes placed before it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import NoMatchFound, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import testkit
from packages import write_package
from starlette_hotdeploy import (
    Deployer,
    DeploymentError,
    HotDeployMiddleware,
    HotDeployRoute,
    MountConflict,
    hotdeploy_lifespan,
    pack_directory,
)

pytestmark = pytest.mark.anyio

API_KEY = "k3y"
ADMIN_TOKEN = "admin-secret"
WITH_KEY = {"x-api-key": API_KEY}
BEARER = {"authorization": f"Bearer {ADMIN_TOKEN}"}


class ApiKeyAuth:
    """The host's protection: every HTTP request needs `x-api-key`, else 401."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"x-api-key") != API_KEY.encode():
            await PlainTextResponse("API key required", status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def secret(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host secret")


async def host_not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("host 404", status_code=404)


HOST_ROUTES = [Route("/secret", secret)]
HOST_404 = {404: host_not_found}


# The placements, each as the README/docs write it.
def inside_by_list(deployer: Deployer) -> Starlette:
    """`middleware=[...]`: the first is the outermost."""
    return Starlette(
        routes=HOST_ROUTES,
        middleware=[
            Middleware(ApiKeyAuth),
            Middleware(HotDeployMiddleware, deployer=deployer, admin_token=ADMIN_TOKEN),
        ],
    )


def inside_by_add_middleware(deployer: Deployer) -> Starlette:
    """`add_middleware`: the last added is the outermost."""
    app = Starlette(routes=HOST_ROUTES)
    app.add_middleware(HotDeployMiddleware, deployer=deployer, admin_token=ADMIN_TOKEN)
    app.add_middleware(ApiKeyAuth)
    return app


def as_route(deployer: Deployer) -> Starlette:
    """The packages as a route: the host's middleware wraps them like any other route."""
    return Starlette(
        routes=[*HOST_ROUTES, HotDeployRoute(deployer, admin_token=ADMIN_TOKEN)],
        middleware=[Middleware(ApiKeyAuth)],
        exception_handlers=HOST_404,
        lifespan=hotdeploy_lifespan(deployer),
    )


def outside_by_list(deployer: Deployer) -> Starlette:
    return Starlette(
        routes=HOST_ROUTES,
        middleware=[
            Middleware(HotDeployMiddleware, deployer=deployer, admin_token=ADMIN_TOKEN),
            Middleware(ApiKeyAuth),
        ],
    )


def outside_by_add_middleware(deployer: Deployer) -> Starlette:
    """The bug report's host: the auth middleware added before HotDeployMiddleware."""
    app = Starlette(routes=HOST_ROUTES)
    app.add_middleware(ApiKeyAuth)
    app.add_middleware(HotDeployMiddleware, deployer=deployer, admin_token=ADMIN_TOKEN)
    return app


Placement = Callable[[Deployer], Starlette]
GUARDED: list[Placement] = [inside_by_list, inside_by_add_middleware, as_route]
UNGUARDED: list[Placement] = [outside_by_list, outside_by_add_middleware]


@asynccontextmanager
async def client_for(app: ASGIApp, root_path: str = "") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def statuses(client: httpx.AsyncClient, path: str) -> tuple[int, int]:
    """The status of GET `path` without the API key, then with it."""
    without = await client.get(path)
    with_key = await client.get(path, headers=WITH_KEY)
    return without.status_code, with_key.status_code


async def assert_guarded(client: httpx.AsyncClient) -> None:
    assert await statuses(client, "/secret") == (401, 200)
    assert await statuses(client, "/billing/") == (401, 200)
    assert await statuses(client, "/billing/items/3") == (401, 200)
    assert (await client.get("/billing/", headers=WITH_KEY)).json()["version"] == "1.0"
    # The admin API is behind the host's middleware too, and keeps its own bearer tokens.
    admin = "/_hotdeploy/packages"
    assert (await client.get(admin, headers=BEARER)).text == "API key required"
    refused = await client.get(admin, headers=WITH_KEY)
    assert (refused.status_code, refused.json()["title"]) == (401, "unauthorized")
    assert (await client.get(admin, headers={**WITH_KEY, **BEARER})).status_code == 200


# -- 1. where the middleware sits ---------------------------------------------------------------


@pytest.mark.parametrize("placement", GUARDED, ids=lambda p: p.__name__)
async def test_host_auth_guards_packages_inside_it_or_as_a_route(
    deployer: Deployer, sources: Path, placement: Placement
) -> None:
    await deployer.deploy(write_package(sources, name="billing"))
    async with client_for(placement(deployer)) as client:
        await assert_guarded(client)


@pytest.mark.parametrize("placement", UNGUARDED, ids=lambda p: p.__name__)
async def test_host_auth_outside_the_middleware_does_not_guard_packages(
    deployer: Deployer, sources: Path, placement: Placement
) -> None:
    """The documented wrong placement: the package and the admin API bypass the host's auth."""
    await deployer.deploy(write_package(sources, name="billing"))
    async with client_for(placement(deployer)) as client:
        assert await statuses(client, "/secret") == (401, 200)
        assert await statuses(client, "/billing/") == (200, 200)  # the bug as reported
        admin = "/_hotdeploy/packages"
        assert (await client.get(admin, headers=BEARER)).status_code == 200  # no API key asked
        assert (await client.get(admin)).status_code == 401  # only its own token guards it


@asynccontextmanager
async def uvicorn_serving(app: ASGIApp) -> AsyncIterator[str]:
    """uvicorn on 127.0.0.1 in this event loop, on a socket that listens before uvicorn takes it
    (connections wait in the backlog until the lifespan startup completed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen()
        config = uvicorn.Config(app, lifespan="on", log_level="warning", log_config=None)
        server = uvicorn.Server(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio only
async def test_host_auth_guards_the_route_form_in_uvicorn(tmp_path: Path, sources: Path) -> None:
    """The route form as served: deployed through the admin API (through the host's auth too),
    the package answers only with the API key."""
    deployer = Deployer(home=tmp_path / "home", entry_points=False)
    app = as_route(deployer)
    archive = pack_directory(write_package(sources, name="billing")).data
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        upload = {"content-type": "application/zip", **BEARER}
        assert (await client.post("/_hotdeploy/packages", content=archive, headers=upload)).status_code == 401
        deployed = await client.post("/_hotdeploy/packages", content=archive, headers={**upload, **WITH_KEY})
        assert deployed.status_code == 201, deployed.text
        await assert_guarded(client)
    assert not deployer.is_running  # the server's shutdown stopped the deployer


# -- 2. the route form --------------------------------------------------------------------------


async def host_home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host")


def route_host(deployer: Deployer, *before: Route, after: tuple[Route, ...] = ()) -> Starlette:
    return Starlette(
        routes=[Route("/", host_home), *before, HotDeployRoute(deployer), *after],
        exception_handlers=HOST_404,
    )


async def test_the_route_follows_deploy_upgrade_and_undeploy(deployer: Deployer, sources: Path) -> None:
    async with client_for(route_host(deployer)) as client:
        assert (await client.get("/billing/")).text == "host 404"
        await deployer.deploy(write_package(sources, name="billing", version="1.0"))
        assert (await client.get("/billing/")).json() == {
            "version": "1.0",
            "path": "/billing/",
            "root_path": "/billing",
        }
        await deployer.deploy(write_package(sources, name="billing", version="2.0"))
        assert (await client.get("/billing/items/3")).json() == {"version": "2.0", "item": 3}
        assert (await client.get("/")).text == "host"
        await deployer.undeploy("billing")
        gone = await client.get("/billing/")
        assert (gone.status_code, gone.text) == (404, "host 404")  # the host router's own 404


async def test_the_bare_prefix_is_redirected_by_the_host_router(deployer: Deployer, sources: Path) -> None:
    await deployer.deploy(write_package(sources, name="billing"))
    async with client_for(route_host(deployer)) as client:
        response = await client.get("/billing?x=1")
    assert (response.status_code, response.headers["location"]) == (307, "http://testserver/billing/?x=1")


async def test_routes_before_it_win_routes_after_it_are_shadowed(deployer: Deployer, sources: Path) -> None:
    async def host_item(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host item")

    await deployer.deploy(write_package(sources, name="billing"))
    app = route_host(
        deployer, Route("/billing/items/{n:int}", host_item), after=(Route("/billing/late", host_item),)
    )
    async with client_for(app) as client:
        assert (await client.get("/billing/items/3")).text == "host item"
        assert (await client.get("/billing/")).json()["version"] == "1.0"
        late = await client.get("/billing/late")
        assert (late.status_code, late.text) == (404, "Not Found")  # the package's 404, not the host's


def host_with_middleware(deployer: Deployer) -> Starlette:
    return Starlette(
        routes=[Route("/", host_home)], middleware=[Middleware(HotDeployMiddleware, deployer=deployer)]
    )


@pytest.mark.parametrize(
    "path", ["/billing/", "/billing/items/3", "/billing/link", "/billing/state", "/billing/lazy"]
)
async def test_a_package_sees_what_it_sees_behind_the_middleware(
    deployer: Deployer, sources: Path, path: str
) -> None:
    await deployer.deploy(write_package(sources, name="billing"))
    answers = []
    for app in (host_with_middleware(deployer), route_host(deployer)):
        async with client_for(app, root_path="/api") as client:
            response = await client.get("/api" + path)
            answers.append((response.status_code, response.json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 200


async def test_url_for_inside_a_package_and_from_the_host(deployer: Deployer, sources: Path) -> None:
    async def links(request: Request) -> PlainTextResponse:
        item = request.url_for("billing:item", item_id=7)
        under = request.url_for("billing", path="/invoices")
        return PlainTextResponse(f"{item} {under}")

    await deployer.deploy(write_package(sources, name="billing"))
    route = HotDeployRoute(deployer)
    app = Starlette(routes=[Route("/links", links), route])
    async with client_for(app) as client:
        inside = await client.get("/billing/link")  # the package's own url_for("item", item_id=7)
        assert inside.json() == {"version": "1.0", "url": "http://testserver/billing/items/7"}
        assert (await client.get("/links")).text == (
            "http://testserver/billing/items/7 http://testserver/billing/invoices"
        )
    for name, params in [("nope:item", {"item_id": 7}), ("billing:nope", {}), ("billing", {})]:
        with pytest.raises(NoMatchFound):
            route.url_path_for(name, **params)


class WebSocketTalk:
    """One websocket connection to an ASGI app, driven by hand."""

    def __init__(
        self, to_app: anyio.abc.ObjectSendStream[Message], from_app: anyio.abc.ObjectReceiveStream[Message]
    ):
        self.to_app = to_app
        self.from_app = from_app

    async def send(self, text: str) -> None:
        await self.to_app.send({"type": "websocket.receive", "text": text})

    async def receive(self) -> Message:
        with anyio.fail_after(5):
            return await self.from_app.receive()


def websocket_scope(path: str) -> Scope:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "scheme": "ws",
        "http_version": "1.1",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }


@asynccontextmanager
async def websocket(app: ASGIApp, path: str) -> AsyncIterator[WebSocketTalk]:
    to_app, app_receives = anyio.create_memory_object_stream[Message](8)
    app_sends, from_app = anyio.create_memory_object_stream[Message](8)
    async with anyio.create_task_group() as tg, to_app, from_app:

        async def run_app() -> None:
            await app(websocket_scope(path), app_receives.receive, app_sends.send)

        tg.start_soon(run_app)
        await to_app.send({"type": "websocket.connect"})
        yield WebSocketTalk(to_app, from_app)
        await to_app.send({"type": "websocket.disconnect", "code": 1000})


async def test_websockets_go_through_the_route(deployer: Deployer, sources: Path) -> None:
    app = route_host(deployer)
    await deployer.deploy(write_package(sources, name="billing", version="1.0"))
    async with websocket(app, "/billing/ws") as old:
        assert (await old.receive())["type"] == "websocket.accept"
        assert (await old.receive())["text"] == "hello from 1.0"
        await deployer.deploy(write_package(sources, name="billing", version="2.0"))
        async with websocket(app, "/billing/ws") as new:
            assert (await new.receive())["type"] == "websocket.accept"
            assert (await new.receive())["text"] == "hello from 2.0"
        await old.send("still there")  # the open one drains on 1.0
        assert (await old.receive())["text"] == "1.0: still there"
    async with websocket(app, "/nowhere/ws") as refused:
        assert (await refused.receive())["type"] == "websocket.close"  # the host router's close


@asynccontextmanager
async def lifespan_of(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan the way a server does."""
    to_app, app_receives = anyio.create_memory_object_stream[Message](2)
    app_sends, from_app = anyio.create_memory_object_stream[Message](2)
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    async with anyio.create_task_group() as tg, to_app, from_app:

        async def run_app() -> None:
            await app(scope, app_receives.receive, app_sends.send)

        tg.start_soon(run_app)
        await to_app.send({"type": "lifespan.startup"})
        with anyio.fail_after(10):
            started = await from_app.receive()
        assert started["type"] == "lifespan.startup.complete", started
        yield
        await to_app.send({"type": "lifespan.shutdown"})
        with anyio.fail_after(10):
            assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"


async def test_the_lifespan_restores_packages_before_the_first_request(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "home"
    first = Deployer(home=home, entry_points=False)
    async with first.running():
        await first.deploy(write_package(sources, name="billing", version="1.0"))
        await first.deploy(write_package(sources, name="billing", version="2.0"))
    testkit.calls.clear()

    @asynccontextmanager
    async def host_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        testkit.calls.append("host startup")
        yield {"host_only": True}
        testkit.calls.append("host shutdown")

    restarted = Deployer(home=home, entry_points=False)
    app = Starlette(routes=[HotDeployRoute(restarted)], lifespan=hotdeploy_lifespan(restarted, host_lifespan))
    async with lifespan_of(app), client_for(app) as client:
        assert testkit.calls == ["host startup", "startup billing 2.0"]  # restored before any request
        assert (await client.get("/billing/")).json()["version"] == "2.0"
    assert testkit.calls[-2:] == ["shutdown billing 2.0", "host shutdown"]  # packages stop first
    assert not restarted.is_running


async def test_the_admin_prefix_is_reserved_and_off_without_a_token(
    deployer: Deployer, sources: Path
) -> None:
    async with client_for(route_host(deployer)) as client:
        assert (await client.get("/_hotdeploy/packages")).text == "host 404"  # no token: no admin API
    HotDeployRoute(deployer, admin_token=ADMIN_TOKEN)
    with pytest.raises(DeploymentError) as info:
        await deployer.deploy(write_package(sources, name="admin", mount="/_hotdeploy/x"))
    assert isinstance(info.value.cause, MountConflict)


async def test_what_handle_cannot_serve_gets_the_routers_not_found(deployer: Deployer) -> None:
    """handle() without a match (the package went away): Starlette's Router.not_found answer."""
    route = HotDeployRoute(deployer)

    async def inside_an_app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = object()  # as under Starlette: the host's exception handlers answer
        await route.handle(scope, receive, send)

    async with client_for(route.handle) as client:
        response = await client.get("/billing/")
        assert (response.status_code, response.text) == (404, "Not Found")
    async with client_for(inside_an_app) as client:
        with pytest.raises(HTTPException) as info:
            await client.get("/billing/")
        assert info.value.status_code == 404
    async with websocket(route.handle, "/billing/ws") as refused:
        assert (await refused.receive())["type"] == "websocket.close"
