"""In-flight tracking on the request path: what a drain timeout ends, and only that.

On asyncio a request is tracked by its task (no cancel scope per request); on trio by a cancel
scope. Both must count the same requests, end the same ones, and leave the caller's own
cancellations alone.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
import sniffio

import testkit
from drains import Drained
from packages import write_package
from starlette_hotdeploy import Deployer

pytestmark = pytest.mark.anyio

APP = """
import anyio
import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import testkit

VERSION = "{version}"


async def index(request):
    return PlainTextResponse(VERSION)


async def swallow(request):
    # Holds until ended, catches the cancellation and answers anyway.
    testkit.event("swallow:entered").set()
    try:
        await testkit.event("never").wait()
    except anyio.get_cancelled_exc_class():
        testkit.calls.append("swallowed")
    return PlainTextResponse("swallowed")


async def hold(request):
    testkit.event("hold:entered").set()
    await testkit.event("hold").wait()
    return PlainTextResponse("held")


async def nested(request):
    # A sub-request to the host, in this request's task, that reaches this same version.
    transport = httpx.ASGITransport(app=testkit.host)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        inner = await client.get("/greeter/")
    testkit.event("nested:entered").set()
    await testkit.event("nested").wait()
    return PlainTextResponse("outer " + inner.text)


app = Starlette(
    routes=[
        Route("/", index),
        Route("/swallow", swallow),
        Route("/hold", hold),
        Route("/nested", nested),
    ]
)
"""


def package(sources: Path, version: str, drain_timeout: float = 30.0) -> Path:
    return write_package(
        sources,
        version=version,
        app=APP.format(version=version),
        manifest_extra=f"drain_timeout = {drain_timeout}\n",
    )


def in_flight(deployer: Deployer, version: str) -> int:
    [status] = deployer.status()
    return next(v.in_flight for v in status.versions if v.version == version)


def task_is_cancelling() -> bool:
    """Whether the current task still counts a cancellation request (asyncio only)."""
    if sniffio.current_async_library() != "asyncio":
        return False
    import asyncio

    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def test_an_app_that_swallows_the_drain_timeout_still_ends_and_its_task_goes_on(
    deployer: Deployer,
    client: httpx.AsyncClient,
    sources: Path,
    drained: Drained,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await deployer.deploy(package(sources, "1.0", drain_timeout=0.1))
    after: list[object] = []
    async with anyio.create_task_group() as tg:

        async def held() -> None:
            answer = await client.get("/greeter/swallow")
            # The same task carries on: no cancellation is left pending on it.
            after.append(answer.status_code)
            after.append(task_is_cancelling())
            with anyio.fail_after(5):
                after.append((await client.get("/greeter/")).text)

        tg.start_soon(held)
        await testkit.event("swallow:entered").wait()
        await deployer.deploy(package(sources, "2.0"))
        await drained.wait_for("1.0")
    assert testkit.calls == ["swallowed"]
    # asyncio delivers the cancellation once, and the app answered; trio's scope cancels the
    # app's reply too, so the 503 of a drain timeout goes out instead.
    assert after[0] in (200, 503)
    assert after[1:] == [False, "2.0"]
    assert drained.terminated_by["1.0"] == 1
    assert in_flight(deployer, "2.0") == 0
    assert (
        "WARNING",
        "greeter 1.0: drain timeout (0.1s): 1 request(s), stream(s) or websocket(s) still open were ended",
    ) in [(r.levelname, r.getMessage()) for r in caplog.records]


async def test_a_request_cancelled_by_its_caller_is_not_ended_by_the_drain(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    await deployer.deploy(package(sources, "1.0", drain_timeout=0.1))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/greeter/hold")
        await testkit.event("hold:entered").wait()
        assert in_flight(deployer, "1.0") == 1
        tg.cancel_scope.cancel()  # the caller gives up (a client gone, a timeout of its own)
    assert in_flight(deployer, "1.0") == 0
    [status] = deployer.status()
    assert status.versions[0].terminated == 0
    await deployer.deploy(package(sources, "2.0"))
    await drained.wait_for("1.0")
    assert drained.terminated_by["1.0"] == 0  # nothing was left for the drain to end
    assert (await client.get("/greeter/")).text == "2.0"


async def test_a_sub_request_to_the_same_version_in_the_same_task_counts_once(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    testkit.host = client._transport.app  # type: ignore[attr-defined]
    await deployer.deploy(package(sources, "1.0"))
    answers: list[str] = []
    async with anyio.create_task_group() as tg:

        async def outer() -> None:
            answers.append((await client.get("/greeter/nested")).text)

        tg.start_soon(outer)
        await testkit.event("nested:entered").wait()
        # The inner request has finished; the outer one still runs and still counts.
        assert in_flight(deployer, "1.0") == 1
        await deployer.deploy(package(sources, "2.0"))
        assert in_flight(deployer, "1.0") == 1  # 1.0 drains: it waits for the outer request
        testkit.event("nested").set()
        await drained.wait_for("1.0")
    assert answers == ["outer 1.0"]
    assert drained.terminated_by["1.0"] == 0
    assert in_flight(deployer, "2.0") == 0
