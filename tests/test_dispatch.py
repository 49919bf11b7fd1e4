"""The dispatch layer: a package behind HotDeployMiddleware sees what it would under `Mount`.

The differential tests deploy a sub-app that echoes what it sees (scope, URLs, `url_for`) and
send the same requests to a reference host that mounts a second instance of the same source
with Starlette's own `Mount("/greeter", app=...)`: status, Location, Allow and body must match.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount as StarletteMount
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import testkit
from packages import write_package
from starlette_hotdeploy import (
    Deployer,
    DeploymentError,
    HotDeployMiddleware,
    MountConflict,
    PackageVersion,
    VersionState,
)
from starlette_hotdeploy._mounts import Mount, MountTable

pytestmark = pytest.mark.anyio

# A sub-app whose every endpoint answers with what it sees.
ECHO_APP = """
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute


def seen(conn: HTTPConnection) -> dict:
    scope = conn.scope
    return {
        "path": scope["path"],
        "raw_path": scope.get("raw_path", b"").decode("latin-1"),
        "root_path": scope["root_path"],
        "app_root_path": scope.get("app_root_path"),
        "path_params": conn.path_params,
        "query": list(conn.query_params.multi_items()),
        "url": str(conn.url),
        "url_path": conn.url.path,
        "base_url": str(conn.base_url),
        "item_url": str(conn.url_for("item", item_id=7)),
        "host_url": str(conn.url_for("home")),  # a host route: falls back to the host's routes
        "keys": sorted(scope),
    }


async def echo(request):
    return JSONResponse(seen(request))


async def ws_echo(websocket):
    await websocket.accept()
    await websocket.send_json(seen(websocket))
    async for text in websocket.iter_text():
        await websocket.send_text("echo: " + text)


app = Starlette(
    routes=[
        Route("/", echo),
        Route("/items/{item_id:int}", echo, name="item"),
        Route("/files/{name:path}", echo),
        Route("/only-get", echo, methods=["GET"]),
        WebSocketRoute("/ws", ws_echo),
        WebSocketRoute("/ws/{room}", ws_echo),
    ]
)
"""

# "/hold?key=K" sets event K+":entered", waits for K, then answers with url_for("item").
HOLD_APP = """
import testkit
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def item(request):
    return JSONResponse({"version": "VERSION"})


async def hold(request):
    key = request.query_params["key"]
    testkit.event(key + ":entered").set()
    await testkit.event(key).wait()
    return JSONResponse({"version": "VERSION", "url": str(request.url_for("item", item_id=7))})


app = Starlette(routes=[Route("ITEMS/{item_id:int}", item, name="item"), Route("/hold", hold)])
"""

STATE_APP = """
import contextlib

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"owner": "package VERSION", "package_only": "VERSION"}


async def state(request):
    names = ("owner", "package_only", "host_only")
    return JSONResponse({name: getattr(request.state, name, None) for name in names})


app = Starlette(routes=[Route("/state", state)], lifespan=lifespan)
"""


# -- helpers ------------------------------------------------------------------------------------


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("host")


def hot_host(deployer: Deployer, *routes: Route) -> Starlette:
    """The host app with the middleware, as an application would set it up."""
    app = Starlette(routes=[Route("/", home), *routes])
    app.add_middleware(HotDeployMiddleware, deployer=deployer)
    return app


def reference_host(subapp: ASGIApp) -> Starlette:
    """What the middleware imitates: Starlette's own Mount."""
    return Starlette(routes=[Route("/", home), StarletteMount("/greeter", app=subapp)])


def import_app(package_root: Path, name: str = "greeter") -> ASGIApp:
    """A second, independent instance of a package's app, imported from its source file."""
    spec = importlib.util.spec_from_file_location(
        f"_reference_{uuid.uuid4().hex}", package_root / name / "app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(ASGIApp, module.app)


def client_for(app: ASGIApp, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def exchange(app: ASGIApp, method: str, url: str, root_path: str) -> dict[str, Any]:
    """One request: what a client can observe of the answer."""
    async with client_for(app, root_path) as client:
        response = await client.request(method, url)
    is_json = response.headers.get("content-type") == "application/json" and response.content
    return {
        "status": response.status_code,
        "location": response.headers.get("location"),
        "allow": response.headers.get("allow"),
        "body": response.json() if is_json else response.text,
    }


async def websocket_session(
    app: ASGIApp, path: str, root_path: str, raw_path: bytes | None = None
) -> list[Message]:
    """Drive one websocket connection: connect, send "ping", disconnect; return what the app sent."""
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": b"",
        "root_path": root_path,
        "headers": [(b"host", b"testserver")],
        "subprotocols": [],
    }
    incoming = iter([{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "ping"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(incoming, {"type": "websocket.disconnect", "code": 1000})

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


class StubVersion:
    """What the request path reads of a PackageVersion; answers with the root_path it got."""

    def __init__(self, prefix: str) -> None:
        self.state_data: dict[str, Any] = {}
        self.state = VersionState.ACTIVE  # what a mount accepts
        self.name, self.version = "stub", "0"
        self.app: ASGIApp = self._answer
        self.route = self.router = None  # made on the first request

    @staticmethod
    async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse(f"stub {scope['root_path']}")(scope, receive, send)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def stub_mount(prefix: str, package: str) -> Mount:
    return Mount(prefix, package, cast(PackageVersion, StubVersion(prefix)))


@pytest.fixture
async def echo_apps(deployer: Deployer, sources: Path) -> tuple[ASGIApp, ASGIApp]:
    """(host with the echo package deployed, reference host with the same source mounted)."""
    root = write_package(sources, app=ECHO_APP)
    await deployer.deploy(root)
    return hot_host(deployer), reference_host(import_app(root))


# (root_path of the server, prefix of every request path): ASGI says `path` includes the
# root_path; some clients (httpx's ASGITransport by default) leave it out.
ROOTS = [
    pytest.param("", "", id="no-root-path"),
    pytest.param("/api", "/api", id="root-path"),
    pytest.param("/api", "", id="root-path-not-in-path"),
]


# -- 1. HTTP: the same answers as under a real Mount ------------------------------------------

HTTP_CASES = [
    ("GET", "/greeter/", 200),
    ("GET", "/greeter", 307),  # the bare prefix redirects to "/greeter/"
    ("GET", "/greeter?x=1&y=a%20b", 307),  # ... keeping the query
    ("POST", "/greeter", 307),
    ("GET", "/greeter/items/3", 200),
    ("GET", "/greeter/items/3?x=1&x=2", 200),
    ("GET", "/greeter/items/3/", 307),  # the sub-app's own trailing-slash redirect
    ("GET", "/greeter/items/3/?x=1", 307),
    ("GET", "/greeter/items/abc", 404),
    ("GET", "/greeter/nope", 404),
    ("GET", "/greeter//items/3", 404),
    ("POST", "/greeter/only-get", 405),
    ("HEAD", "/greeter/only-get", 200),
    ("GET", "/greeter/only-get/", 307),
    ("GET", "/greeter/files/a%20b/c%2Fd.txt", 200),
    ("GET", "/greeter/files/caf%C3%A9", 200),
    ("GET", "/gr%65eter/items/%33", 200),
    ("GET", "/greeter%2Fitems/3", 200),
    ("GET", "/gr%65eter", 307),
    ("GET", "/greeter%3Fx=1", 404),
    ("GET", "/greeterx", 404),  # not under the mount: the host app answers
    ("GET", "/greeterx/items/3", 404),
    ("GET", "/", 200),
]


@pytest.mark.parametrize(("root_path", "prefix"), ROOTS)
@pytest.mark.parametrize(("method", "path", "status"), HTTP_CASES)
async def test_http_matches_starlette_mount(
    echo_apps: tuple[ASGIApp, ASGIApp], root_path: str, prefix: str, method: str, path: str, status: int
) -> None:
    hot, reference = echo_apps
    expected = await exchange(reference, method, prefix + path, root_path)
    if prefix == root_path:  # the reference itself behaves as the case says
        assert expected["status"] == status, expected
    assert await exchange(hot, method, prefix + path, root_path) == expected


async def test_echo_sees_the_mount(echo_apps: tuple[ASGIApp, ASGIApp]) -> None:
    """Pins the absolute values, so the differential test cannot pass with both sides wrong."""
    hot, _ = echo_apps
    answer = await exchange(hot, "GET", "/api/greeter/items/3?x=1", "/api")
    assert answer["body"] | {"keys": None} == {
        "path": "/api/greeter/items/3",
        "raw_path": "/api/greeter/items/3",
        "root_path": "/api/greeter",
        "app_root_path": "/api",
        "path_params": {"item_id": 3},
        "query": [["x", "1"]],
        "url": "http://testserver/api/greeter/items/3?x=1",
        "url_path": "/api/greeter/items/3",
        "base_url": "http://testserver/api/",
        "item_url": "http://testserver/api/greeter/items/7",
        "host_url": "http://testserver/api/",
        "keys": None,
    }
    redirect = await exchange(hot, "GET", "/api/greeter?x=1", "/api")
    assert (redirect["status"], redirect["location"]) == (307, "http://testserver/api/greeter/?x=1")


async def test_url_for_falls_back_to_a_directly_wrapped_host(deployer: Deployer, sources: Path) -> None:
    """HotDeployMiddleware(Starlette(...)) instead of add_middleware: no app or router in scope."""
    await deployer.deploy(write_package(sources, app=ECHO_APP))
    wrapped = HotDeployMiddleware(Starlette(routes=[Route("/", home)]), deployer=deployer)
    answer = await exchange(wrapped, "GET", "/greeter/items/3", "")
    assert answer["body"]["host_url"] == "http://testserver/"
    assert answer["body"]["item_url"] == "http://testserver/greeter/items/7"


# -- 2. websockets ------------------------------------------------------------------------------

WEBSOCKET_CASES = [
    ("/greeter/ws", "websocket.accept"),
    ("/greeter/ws/room%201", "websocket.accept"),
    ("/greeter/nope", "websocket.close"),
    ("/greeter/", "websocket.close"),  # an HTTP-only route
    ("/greeter", "websocket.close"),  # no redirects for websockets: the host's router closes it
    ("/greeterx/ws", "websocket.close"),
]


@pytest.mark.parametrize(("root_path", "prefix"), ROOTS)
@pytest.mark.parametrize(("path", "first"), WEBSOCKET_CASES)
async def test_websocket_matches_starlette_mount(
    echo_apps: tuple[ASGIApp, ASGIApp], root_path: str, prefix: str, path: str, first: str
) -> None:
    hot, reference = echo_apps
    raw_path = (prefix + path).encode()
    expected = await websocket_session(reference, unquote(prefix + path), root_path, raw_path)
    if prefix == root_path:
        assert expected[0]["type"] == first, expected
    assert await websocket_session(hot, unquote(prefix + path), root_path, raw_path) == expected


async def test_websocket_echo_sees_the_mount(echo_apps: tuple[ASGIApp, ASGIApp]) -> None:
    hot, _ = echo_apps
    accept, hello, echo = await websocket_session(hot, "/api/greeter/ws/lobby", "/api")
    assert accept["type"] == "websocket.accept"
    seen = json.loads(hello["text"])
    assert (seen["root_path"], seen["path_params"]) == ("/api/greeter", {"room": "lobby"})
    assert seen["item_url"] == "http://testserver/api/greeter/items/7"
    assert echo == {"type": "websocket.send", "text": "echo: ping"}


# -- 3. url_for in a request that outlives its version --------------------------------------------


async def test_url_for_uses_the_routes_of_the_version_serving_the_request(
    deployer: Deployer, sources: Path
) -> None:
    def package(version: str, items: str) -> Path:
        source = HOLD_APP.replace("VERSION", version).replace("ITEMS", items)
        return write_package(sources, version=version, app=source)

    await deployer.deploy(package("1.0", "/items"))
    answers: dict[str, Any] = {}
    async with client_for(hot_host(deployer)) as client:

        async def held() -> None:
            answers["old"] = (await client.get("/greeter/hold?key=old")).json()

        async with anyio.create_task_group() as tg:
            tg.start_soon(held)
            await testkit.event("old:entered").wait()
            await deployer.deploy(package("2.0", "/things"))  # v1 now drains its request
            testkit.event("new").set()
            answers["new"] = (await client.get("/greeter/hold?key=new")).json()
            assert "old" not in answers
            testkit.event("old").set()
    assert answers == {
        "old": {"version": "1.0", "url": "http://testserver/greeter/items/7"},
        "new": {"version": "2.0", "url": "http://testserver/greeter/things/7"},
    }


# -- 4. the mount table -------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [("/a", "/a/b"), ("/a/b", "/a"), ("/a", "/a")])
def test_overlapping_mounts_are_refused(first: str, second: str) -> None:
    table = MountTable()
    table.add(stub_mount(first, "one"))
    with pytest.raises(MountConflict) as info:
        table.add(stub_mount(second, "two"))
    assert repr(first) in str(info.value)
    assert repr(second) in str(info.value)
    assert len(table) == 1
    assert table.match("/a/b/c") is table.get(first)


def test_a_removed_mount_no_longer_conflicts() -> None:
    table = MountTable()
    table.add(stub_mount("/a/b/c", "deep"))
    with pytest.raises(MountConflict, match="'/a' overlaps '/a/b/c'"):
        table.add(stub_mount("/a", "top"))  # found among the mounts below it, not by a scan
    table.remove("/a/b/c")
    table.add(stub_mount("/a", "top"))
    with pytest.raises(MountConflict, match="'/a/b' overlaps '/a'"):
        table.add(stub_mount("/a/b", "middle"))
    assert len(table) == 1


def test_segment_prefixes_do_not_overlap() -> None:
    table = MountTable()
    for prefix, package in [("/a", "a"), ("/ab", "ab"), ("/api/orders", "orders"), ("/api2", "api2")]:
        table.add(stub_mount(prefix, package))
    found = {
        path: getattr(table.match(path), "prefix", None)
        for path in ["/a", "/a/x", "/ab/", "/abc", "/api", "/api/orders/1", "/api2/orders", "/api/ordersx"]
    }
    assert found == {
        "/a": "/a",
        "/a/x": "/a",
        "/ab/": "/ab",
        "/abc": None,
        "/api": None,
        "/api/orders/1": "/api/orders",
        "/api2/orders": "/api2",
        "/api/ordersx": None,
    }


async def test_deploy_refuses_an_overlapping_mount(deployer: Deployer, sources: Path) -> None:
    await deployer.deploy(write_package(sources, name="a", mount="/a"))
    with pytest.raises(DeploymentError) as info:
        await deployer.deploy(write_package(sources, name="b", mount="/a/b"))
    assert isinstance(info.value.cause, MountConflict)
    assert "'/a/b'" in str(info.value)
    assert "'/a'" in str(info.value)
    async with client_for(hot_host(deployer)) as client:
        response = await client.get("/a/")  # "/a" still serves
    assert response.json() == {"version": "1.0", "path": "/a/", "root_path": "/a"}
    assert [package.name for package in deployer.packages.values()] == ["a"]


async def test_neighbouring_mounts_route_by_whole_segments(deployer: Deployer, sources: Path) -> None:
    for name, mount in [("a", "/a"), ("ab", "/ab"), ("orders", "/api/orders"), ("api2", "/api2")]:
        await deployer.deploy(write_package(sources, name=name, mount=mount))
    expected: dict[str, object] = {  # the root_path the package saw, or the status
        "/a/": "/a",
        "/ab/": "/ab",
        "/abc/": 404,
        "/api/orders/": "/api/orders",
        "/api/orders": 307,
        "/api/": 404,
        "/api/ordersx": 404,
        "/api2/": "/api2",
    }
    async with client_for(hot_host(deployer)) as client:
        responses = {path: await client.get(path) for path in expected}
    seen = {
        path: r.json()["root_path"] if r.status_code == 200 else r.status_code
        for path, r in responses.items()
    }
    assert seen == expected


async def test_routing_with_1_and_1000_mounts(deployer: Deployer, sources: Path) -> None:
    await deployer.deploy(write_package(sources))
    async with client_for(hot_host(deployer)) as client:

        async def answers(*paths: str) -> list[object]:
            responses = [await client.get(path) for path in paths]
            return [r.text if r.status_code == 200 else r.status_code for r in responses]

        greeter = ["/greeter/items/3", "/greeter", "/greeterx/"]
        expected = ['{"version":"1.0","item":3}', 307, 404]
        assert len(deployer.mounts) == 1
        assert await answers(*greeter) == expected
        for i in range(999):  # mounts one and three segments deep
            prefix = f"/s{i}" if i % 2 else f"/d/{i}/x"
            deployer._mount_table.add(stub_mount(prefix, f"stub{i}"))
        assert len(deployer.mounts) == 1000
        assert await answers(*greeter) == expected
        assert await answers(
            "/s501/any", "/s501", "/s5010/", "/d/500/x/y", "/d/500/x", "/d/500/", "/d/501/x/"
        ) == [
            "stub /s501",
            307,
            404,
            "stub /d/500/x",
            307,
            404,
            404,
        ]


# -- 5. lifespan state --------------------------------------------------------------------------


async def test_request_state_is_the_versions_over_the_hosts(deployer: Deployer, sources: Path) -> None:
    async def host_state(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{request.state.owner} {getattr(request.state, 'package_only', None)}")

    app = hot_host(deployer, Route("/state", host_state))

    async def server(scope: Scope, receive: Receive, send: Send) -> None:
        # A server copies its lifespan state into every request.
        await app({**scope, "state": {"owner": "host", "host_only": "yes"}}, receive, send)

    def package(version: str) -> Path:
        return write_package(sources, version=version, app=STATE_APP.replace("VERSION", version))

    async with client_for(server) as client:
        await deployer.deploy(package("1.0"))
        assert (await client.get("/greeter/state")).json() == {
            "owner": "package 1.0",
            "package_only": "1.0",
            "host_only": "yes",
        }
        assert (await client.get("/state")).text == "host None"
        await deployer.deploy(package("2.0"))
        assert (await client.get("/greeter/state")).json() == {
            "owner": "package 2.0",
            "package_only": "2.0",
            "host_only": "yes",
        }
