"""End to end: hot swaps inside a real uvicorn server while clients keep it busy.

The acceptance criterion of hot deployment: with plain requests, slow streaming responses and
websockets in flight, 20 swaps of one package (versions 1.0 ... 21.0) lose nothing. Every
answer names the one version that served it; a stream or websocket that was open during a swap
finishes on the version it started on; replaced versions drain and are unloaded. A second test
covers the drain timeout: whatever is still open when it expires is ended visibly (websocket
close 1012, an aborted chunked body), never silently.

uvicorn runs in the test's own event loop (it supports asyncio only) on a socket the test binds
and listens on itself, so clients may connect as soon as the host app's lifespan, which runs the
deployer, has started. Ordering uses events, never sleeps: the swap loop deploys the next version
only after every kind of client was served by the active one, and held streams and websockets
wait for the next swap before they finish.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import testkit
from packages import write_package
from starlette_hotdeploy import Deployer, HotDeployMiddleware, PackageVersion, VersionState, hookimpl

pytestmark = pytest.mark.anyio

FIRST, LAST = 1, 21  # versions 1.0 ... 21.0: 20 swaps
CHUNKS = 5  # chunks per streamed response
PLAIN_PER_VERSION = 3  # plain answers each version must give before it is replaced
WS_MESSAGES = 3  # messages exchanged on a websocket after the swap it waited for
PLAIN_WORKERS = 4
MAX_PLAIN = 5000  # per worker: every client loop is bounded
MAX_STREAMS = 200
MAX_WEBSOCKETS = 200
WS_IMPLEMENTATIONS = ["websockets-sansio", "wsproto"]  # uvicorn's default and the other one

# The package under test. `/stream` paces its chunks itself; `?hold=KEY` makes it wait for the
# testkit event KEY after the first chunk, `?forever` makes it never finish.
PACKAGE_APP = r"""
import anyio
import testkit
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute

VERSION = "@VERSION@"
CHUNKS = @CHUNKS@


async def index(request):
    return JSONResponse({"version": VERSION})


async def stream(request):
    hold = request.query_params.get("hold")
    forever = "forever" in request.query_params

    async def body():
        for i in range(CHUNKS):
            if i > 0:
                await anyio.sleep(0.02)
            yield f"{VERSION} {i}\n".encode()
            if hold and i == 0:
                await testkit.event(hold).wait()
            if forever:
                await anyio.sleep_forever()

    return StreamingResponse(body(), media_type="text/plain")


async def echo(websocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(f"{VERSION}: {text}")


app = Starlette(routes=[Route("/", index), Route("/stream", stream), WebSocketRoute("/ws", echo)])
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio only


# -- helpers ------------------------------------------------------------------------------------


def label(index: int) -> str:
    return f"{index}.0"


VERSIONS = {label(index): index for index in range(FIRST, LAST + 1)}


def package_source(sources: Path, index: int, *, drain_timeout: float | None = None) -> Path:
    """Write version `index` of the package "greeter" (mounted at /greeter)."""
    app = PACKAGE_APP.replace("@VERSION@", label(index)).replace("@CHUNKS@", str(CHUNKS))
    extra = f"drain_timeout = {drain_timeout}\n" if drain_timeout is not None else ""
    return write_package(sources, version=label(index), app=app, manifest_extra=extra)


def stream_body(index: int) -> list[str]:
    """The lines of a complete `/stream` answer from version `index`."""
    return [f"{label(index)} {i}" for i in range(CHUNKS)]


def open_websocket(
    client: httpx.AsyncClient, path: str
) -> AbstractAsyncContextManager[AsyncWebSocketSession]:
    """A websocket session through `client` (the session class is named for the type checker)."""
    return aconnect_ws(path, client, session_class=AsyncWebSocketSession)


async def get_version(client: httpx.AsyncClient) -> tuple[int, str]:
    """GET /greeter/: the status and the version that answered (or the body, if not a 200)."""
    response = await client.get("/greeter/")
    if response.status_code != 200:
        return response.status_code, response.text
    return response.status_code, str(response.json()["version"])


class Changes:
    """Wake-ups for tasks waiting on shared test state: call `notify()` after each change;
    `wait_for(predicate)` re-checks the predicate after each one."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


class DrainRecorder:
    """Deployer plugin: records each replaced version once it has drained and been unloaded."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes
        self.drained: dict[str, int] = {}  # version -> requests ended by the drain timeout

    @hookimpl
    def hotdeploy_drained(self, version: PackageVersion, terminated: int) -> None:
        self.drained[version.version] = terminated
        self.changes.notify()


@dataclass
class Board:
    """What the clients saw, shared by the workers and the swap loop.

    `generation` is the newest version whose deployment has returned: a request sent after that
    must be answered by it or a later one, and no later than the deployment in progress."""

    changes: Changes
    generation: int = FIRST
    stopping: bool = False
    plain: Counter[int] = field(default_factory=Counter)
    held_streams: Counter[int] = field(default_factory=Counter)
    free_streams: Counter[int] = field(default_factory=Counter)
    websockets: Counter[int] = field(default_factory=Counter)
    straddled: Counter[str] = field(default_factory=Counter)  # kind -> finished after a swap
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        self.changes.notify()

    def record(self, seen: Counter[int], index: int) -> None:
        seen[index] += 1
        self.changes.notify()

    def check(self, what: str, version: str, low: int) -> int | None:
        """The index of the version that answered a request sent at generation `low`, if it is
        a deployed one that was active at some point while the request was open."""
        high = min(self.generation + 1, LAST)
        index = VERSIONS.get(version)
        if index is None or not low <= index <= high:
            self.fail(f"{what}: answered by {version!r}, expected one of {label(low)}..{label(high)}")
            return None
        return index

    def finished(self, kind: str, index: int) -> None:
        """A stream or websocket served by version `index` completed; it straddled a swap if a
        later version had become active meanwhile."""
        if self.generation > index:
            self.straddled[kind] += 1

    async def wait_for_swap_after(self, index: int) -> None:
        """Until a version after `index` is active (or the clients are told to stop)."""
        await self.changes.wait_for(lambda: self.generation > index or self.stopping)

    def served_everywhere(self, index: int) -> bool:
        return (
            self.plain[index] >= PLAIN_PER_VERSION
            and self.held_streams[index] >= 1
            and self.websockets[index] >= 1
        )

    def stop(self) -> None:
        self.stopping = True
        self.changes.notify()


def host_app(deployer: Deployer, started: anyio.Event) -> Starlette:
    """The host: its own route at "/", packages through HotDeployMiddleware."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.set()  # runs inside the deployer's runtime: deployments may begin
        yield

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host")

    app = Starlette(routes=[Route("/", home)], lifespan=lifespan)
    app.add_middleware(HotDeployMiddleware, deployer=deployer)
    return app


@asynccontextmanager
async def serving(app: Starlette, started: anyio.Event, *, ws: str) -> AsyncIterator[str]:
    """Run uvicorn on 127.0.0.1 in this event loop; yield its base URL once the lifespan started.

    The socket listens before uvicorn takes it over, so connections made before uvicorn accepts
    them wait in the backlog instead of being refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        # Accepted connections inherit TCP_NODELAY; without it Nagle adds ~40 ms per request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen()
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, lifespan="on", log_level="warning", log_config=None, ws=ws, timeout_graceful_shutdown=5
        )
        server = uvicorn.Server(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                with anyio.fail_after(10):
                    await started.wait()
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True


# -- the swap loop and the clients of the main test -------------------------------------------------


async def swap_loop(deployer: Deployer, sources: Path, board: Board) -> None:
    """Deploy 2.0 ... 21.0, each once every kind of client was served by the active version."""
    for index in range(FIRST, LAST + 1):
        if index > FIRST:
            await deployer.deploy(package_source(sources, index))
            board.generation = index
            board.changes.notify()
        await board.changes.wait_for(
            lambda: bool(board.failures) or board.served_everywhere(board.generation)
        )
        if board.failures:
            return


async def plain_worker(client: httpx.AsyncClient, board: Board) -> None:
    """Plain requests one after another, each answered by one version in the expected range."""
    for _ in range(MAX_PLAIN):
        if board.stopping:
            return
        low = board.generation
        try:
            status, version = await get_version(client)
        except Exception as exc:
            board.fail(f"GET /greeter/: {exc!r}")
            return
        if status != 200:
            board.fail(f"GET /greeter/: {status} {version!r}")
            return
        index = board.check("GET /greeter/", version, low)
        if index is None:
            return
        board.record(board.plain, index)


async def read_stream(
    client: httpx.AsyncClient, board: Board, seen: Counter[int], *, hold: str | None = None
) -> bool:
    """One `/stream` request: every line must name the version of the first one, and the body
    must be complete. With `hold`, the app pauses after the first chunk until the next swap."""
    low = board.generation
    params = {"hold": hold} if hold is not None else {}
    try:
        async with client.stream("GET", "/greeter/stream", params=params) as response:
            if response.status_code != 200:
                board.fail(f"stream: {response.status_code} {(await response.aread())!r}")
                return False
            lines = response.aiter_lines()
            first = await anext(lines)
            index = board.check(f"stream {first!r}", first.partition(" ")[0], low)
            if index is None:
                return False
            board.record(seen, index)
            if hold is not None:
                await board.wait_for_swap_after(index)
                testkit.event(hold).set()
            body = [first] + [line async for line in lines]
    except Exception as exc:
        board.fail(f"stream: {exc!r}")
        return False
    finally:
        if hold is not None:
            testkit.event(hold).set()  # never leave the app waiting
    if body != stream_body(index):
        board.fail(f"stream from {label(index)} delivered {body!r}")
        return False
    board.finished("stream", index)
    return True


async def held_stream_worker(client: httpx.AsyncClient, board: Board) -> None:
    """Streams one after another, each kept open (server side) across a swap."""
    for n in range(MAX_STREAMS):
        if board.stopping or not await read_stream(client, board, board.held_streams, hold=f"e2e-{n}"):
            return


async def free_stream_worker(client: httpx.AsyncClient, board: Board) -> None:
    """Streams one after another at the app's own pace, whenever the swaps happen."""
    for _ in range(MAX_STREAMS):
        if board.stopping or not await read_stream(client, board, board.free_streams):
            return


async def websocket_worker(client: httpx.AsyncClient, board: Board) -> None:
    """Websockets one after another, each open across a swap: every reply must name the
    version that answered the first message."""
    for _ in range(MAX_WEBSOCKETS):
        if board.stopping:
            return
        low = board.generation
        try:
            async with open_websocket(client, "/greeter/ws") as ws:
                await ws.send_text("hello")
                version, _, text = (await ws.receive_text()).partition(": ")
                index = board.check(f"websocket {text!r}", version, low)
                if index is None:
                    return
                board.record(board.websockets, index)
                await board.wait_for_swap_after(index)
                replies = []
                for k in range(WS_MESSAGES):
                    await ws.send_text(f"message {k}")
                    replies.append(await ws.receive_text())
        except Exception as exc:
            board.fail(f"websocket: {exc!r}")
            return
        expected = [f"{label(index)}: message {k}" for k in range(WS_MESSAGES)]
        if text != "hello" or replies != expected:
            board.fail(f"websocket on {label(index)}: {text!r} then {replies!r}")
            return
        board.finished("websocket", index)


@pytest.mark.parametrize("ws", WS_IMPLEMENTATIONS)
async def test_twenty_swaps_under_load_lose_nothing(tmp_path: Path, sources: Path, ws: str) -> None:
    """20 swaps while plain requests, streams and websockets flow: no failure, no mixed answer."""
    changes = Changes()
    board = Board(changes)
    drains = DrainRecorder(changes)
    deployer = Deployer(home=tmp_path / "home", plugins=[drains], entry_points=False)
    started = anyio.Event()
    with anyio.fail_after(50):
        async with (
            serving(host_app(deployer, started), started, ws=ws) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=10) as client,
        ):
            await deployer.deploy(package_source(sources, FIRST))
            async with anyio.create_task_group() as tg:
                for _ in range(PLAIN_WORKERS):
                    tg.start_soon(plain_worker, client, board)
                tg.start_soon(held_stream_worker, client, board)
                tg.start_soon(free_stream_worker, client, board)
                tg.start_soon(websocket_worker, client, board)
                try:
                    await swap_loop(deployer, sources, board)
                finally:
                    board.stop()
            # The clients are done: every replaced version can finish draining.
            with anyio.move_on_after(10):
                await changes.wait_for(lambda: len(drains.drained) == LAST - FIRST)
            loaded = [(version.version, version.state) for version in deployer.package("greeter").loaded]
            host_answer = (await client.get("/")).text

    assert board.failures == []
    every_version = set(range(FIRST, LAST + 1))
    assert set(board.plain) == every_version
    assert set(board.held_streams) == every_version
    assert set(board.websockets) == every_version
    assert board.free_streams.total() > 0
    # Every held stream and websocket but the last ones (on 21.0) was opened before a deployment
    # completed and finished after it, on its own version (checked by the workers).
    assert board.straddled["stream"] >= LAST - FIRST, board.straddled
    assert board.straddled["websocket"] >= LAST - FIRST, board.straddled

    # Each replaced version drained without anything ended by its drain timeout and was
    # unloaded; only the last one stayed, until the server stopped and shut it down too.
    assert drains.drained == {label(index): 0 for index in range(FIRST, LAST)}
    assert loaded == [(label(LAST), VersionState.ACTIVE)]
    assert host_answer == "host"
    assert deployer.package("greeter").loaded == ()
    assert deployer.retired_alive() == []  # no module or app of the 21 versions is left in memory


# -- the drain timeout --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one long-lived client received, and how it ended."""

    received: list[str] = field(default_factory=list)
    error: Exception | None = None


async def endless_stream(client: httpx.AsyncClient, opened: anyio.Event, outcome: Outcome) -> None:
    """A stream whose app never finishes it: read until the connection ends."""
    try:
        async with client.stream("GET", "/greeter/stream", params={"forever": "1"}) as response:
            outcome.received.append(str(response.status_code))
            async for line in response.aiter_lines():
                outcome.received.append(line)
                opened.set()
    except Exception as exc:
        outcome.error = exc
    finally:
        opened.set()


async def idle_websocket(client: httpx.AsyncClient, opened: anyio.Event, outcome: Outcome) -> None:
    """A websocket that says hello, then only listens: the client never closes it."""
    try:
        async with open_websocket(client, "/greeter/ws") as ws:
            await ws.send_text("hello")
            outcome.received.append(await ws.receive_text())
            opened.set()
            try:
                # Nothing more is sent: only the server closing the websocket ends this.
                outcome.received.append(await ws.receive_text())
            except WebSocketDisconnect as exc:  # raised here, not wrapped in the session's group
                outcome.error = exc
    except Exception as exc:
        outcome.error = exc
    finally:
        opened.set()


@pytest.mark.parametrize("ws", WS_IMPLEMENTATIONS)
async def test_drain_timeout_ends_what_is_still_open(tmp_path: Path, sources: Path, ws: str) -> None:
    """A stream and a websocket still open on 1.0 at its drain timeout (0.5s) are ended visibly,
    while plain requests go to 2.0 throughout."""
    changes = Changes()
    drains = DrainRecorder(changes)
    deployer = Deployer(home=tmp_path / "home", plugins=[drains], entry_points=False)
    started = anyio.Event()
    stream, websocket = Outcome(), Outcome()
    answers: list[tuple[int, str]] = []
    served_while_draining = 0
    with anyio.fail_after(30):
        async with (
            serving(host_app(deployer, started), started, ws=ws) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=10) as client,
        ):
            await deployer.deploy(package_source(sources, 1, drain_timeout=0.5))
            old = deployer.package("greeter").active
            assert old is not None
            async with anyio.create_task_group() as tg:
                stream_opened, websocket_opened = anyio.Event(), anyio.Event()
                tg.start_soon(endless_stream, client, stream_opened, stream)
                tg.start_soon(idle_websocket, client, websocket_opened, websocket)
                await stream_opened.wait()
                await websocket_opened.wait()

                await deployer.deploy(package_source(sources, 2))
                # While 1.0 drains (and after it is ended), plain requests are answered by 2.0.
                for _ in range(MAX_PLAIN):
                    if "1.0" in drains.drained:
                        break
                    answers.append(await get_version(client))
                    if old.state is VersionState.DRAINING:
                        served_while_draining += 1
                await changes.wait_for(lambda: "1.0" in drains.drained)
            answers.append(await get_version(client))

    assert served_while_draining > 0
    assert set(answers) == {(200, "2.0")}
    assert drains.drained == {"1.0": 2}  # the stream and the websocket were ended
    assert old.state is VersionState.RETIRED

    # The websocket got "service restart" from the version it was opened on.
    assert websocket.received == ["1.0: hello"]
    assert isinstance(websocket.error, WebSocketDisconnect), repr(websocket.error)
    assert websocket.error.code == 1012
    assert "1.0" in websocket.error.reason, websocket.error.reason

    # The stream was cut off: the client sees an error, not a body that looks complete.
    assert stream.received == ["200", "1.0 0"]
    assert isinstance(stream.error, httpx.RemoteProtocolError), repr(stream.error)
