"""Thread hops that the event loop waits for in turns while an operation runs (_thread_hop):
the contract of `anyio.to_thread.run_sync` kept (result, errors, context, cancellation, limiter),
the loop still serving between turns and after what it lends, and a deployment's import going
through them. How much faster that is under load is the benchmarks' to say
(docs/benchmarks.md), not a test's. Every wait is bounded; nothing sleeps to order events."""

from __future__ import annotations

import contextvars
import gc
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from packages import write_package
from starlette_hotdeploy import Deployer
from starlette_hotdeploy import _thread_hop as thread_hops
from starlette_hotdeploy._thread_hop import thread_hop
from test_wakeup import answer_text

pytestmark = pytest.mark.anyio

BOUND = 5.0  # seconds: what no wait here should ever need
HOP_THREAD = "hotdeploy hop"


@pytest.fixture
def operation() -> Iterator[None]:
    """An operation runs in the process (as inside `Engine.operation`)."""
    assert not thread_hops.lending()  # none left running by another test
    thread_hops.operation_began()
    try:
        yield
    finally:
        thread_hops.operation_ended()


def thread_name() -> str:
    return threading.current_thread().name


async def test_outside_an_operation_a_hop_is_anyios_own() -> None:
    name = await thread_hop(thread_name)
    assert name != threading.current_thread().name
    assert name != HOP_THREAD


async def test_during_an_operation_a_hop_runs_in_a_thread_of_the_pool(operation: None) -> None:
    assert await thread_hop(thread_name) == HOP_THREAD
    assert await thread_hop(divmod, 7, 2) == (3, 1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio may run a batch in any order
async def test_a_hop_is_a_checkpoint_even_when_the_call_ends_at_once(operation: None) -> None:
    # Started before the hop, the other task has run by the time it returns, as with anyio's.
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(other)
        await thread_hop(int)
        assert ran == ["other"]


async def test_a_hop_keeps_nothing_of_its_call_once_it_returned(operation: None) -> None:
    # A retired version's app went through hops (its import's result): a pool thread that kept
    # its last call while waiting for the next one kept that version alive.
    class Thing:
        pass

    made = await thread_hop(Thing)
    passed = Thing()
    assert await thread_hop(id, passed) == id(passed)
    refs = [weakref.ref(made), weakref.ref(passed)]
    del made, passed
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


@pytest.mark.parametrize("error", [ValueError("bad"), TimeoutError("the function's own")])
async def test_the_functions_error_reaches_the_caller(operation: None, error: Exception) -> None:
    # A TimeoutError of the function is its error, not the end of a turn.
    def fails() -> None:
        raise error

    with anyio.fail_after(BOUND):
        with pytest.raises(type(error)) as raised:
            await thread_hop(fails)
    assert raised.value is error


async def test_the_callers_context_goes_with_the_call(operation: None) -> None:
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable")
    variable.set("the caller's")
    assert await thread_hop(variable.get) == "the caller's"


@pytest.mark.parametrize("lent", [BOUND * 10, 0.0], ids=["in-turns", "after-the-turns"])
async def test_the_loop_serves_between_turns_and_after_them(
    operation: None, monkeypatch: pytest.MonkeyPatch, lent: float
) -> None:
    # The call waits for something only another task of the loop does: a loop that lent all
    # its time (or never stopped lending) would leave it waiting until the bound.
    monkeypatch.setattr(thread_hops, "LENT", lent)
    started, answered = threading.Event(), threading.Event()

    def waits_for_the_loop() -> bool:
        started.set()
        return answered.wait(BOUND)

    async def answer() -> None:
        await anyio.to_thread.run_sync(started.wait, BOUND)
        answered.set()

    with anyio.fail_after(BOUND * 2):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(answer)
            assert await thread_hop(waits_for_the_loop)


@pytest.mark.parametrize("abandon", [True, False])
async def test_a_cancelled_caller_waits_for_the_call_unless_it_abandons_it(
    operation: None, abandon: bool
) -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def call() -> str:
        started.set()
        release.wait(BOUND)
        finished.append("call")
        return "done"

    returned: list[str] = []
    with anyio.fail_after(BOUND * 2):
        async with anyio.create_task_group() as tasks:
            with anyio.CancelScope() as scope:

                async def cancel() -> None:
                    await anyio.to_thread.run_sync(started.wait, BOUND)
                    scope.cancel()
                    if not abandon:
                        release.set()  # the caller is still waiting for it

                tasks.start_soon(cancel)
                returned.append(await thread_hop(call, abandon_on_cancel=abandon))
                await anyio.lowlevel.checkpoint()  # the cancellation arrives here
                returned.append("not cancelled")
    assert scope.cancelled_caught
    if abandon:
        assert (returned, finished) == ([], [])  # left to run on its own
        release.set()
    else:
        assert (returned, finished) == (["done"], ["call"])


async def test_the_limiter_bounds_the_calls_that_run_at_once(operation: None) -> None:
    limiter = anyio.CapacityLimiter(1)
    first_started, first_release = threading.Event(), threading.Event()
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        first_started.set()
        first_release.wait(BOUND)
        ran.append("first done")

    def second() -> None:
        ran.append("second")

    with anyio.fail_after(BOUND * 2):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: thread_hop(first, limiter=limiter))
            await anyio.to_thread.run_sync(first_started.wait, BOUND)
            tasks.start_soon(lambda: thread_hop(second, limiter=limiter))
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()  # the second one waits for the limiter
            assert ran == ["first"]
            first_release.set()
    assert ran == ["first", "first done", "second"]


APP_THAT_TELLS_ITS_THREAD = """
import threading

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

IMPORTED_IN = threading.current_thread().name


async def index(request):
    return PlainTextResponse(IMPORTED_IN)


app = Starlette(routes=[Route("/", index)])
"""


async def test_a_deployments_import_goes_through_a_lent_hop_and_a_restore_at_start_does_not(
    tmp_path: Path,
) -> None:
    source = write_package(tmp_path / "src", app=APP_THAT_TELLS_ITS_THREAD)

    with anyio.fail_after(BOUND * 2):
        deployer = Deployer(home=tmp_path / "home", entry_points=False)
        async with deployer.running():
            await deployer.deploy(source)
            assert await answer_text(deployer, "/greeter/") == HOP_THREAD
        restarted = Deployer(home=tmp_path / "home", entry_points=False)
        async with restarted.running():
            assert await answer_text(restarted, "/greeter/") not in ("", HOP_THREAD)
