"""Package code cannot take the server down (issue #9, items 1-3 and the sync app).

Whatever a package raises, SystemExit and KeyboardInterrupt included, at import, in its factory,
its lifespan, its hooks or its health endpoint, fails that one deployment with an error that
names the cause; the previous version keeps serving, and the next deployment works. An import
runs in a worker thread under `load_timeout`; one that overruns is abandoned while the server
serves on. A load that touches `sys.modules` outside its namespace or the builtins is undone
and refused. A sync `def app(scope, receive, send)` is refused.

Most cases run in-process (httpx.ASGITransport, both backends). The ones seen on a real server
go through the admin API of uvicorn on 127.0.0.1 (asyncio only): there the failing package
pauses (on a threading gate at import, on a testkit event in its lifespan) while the test asks
the previous version to answer, and a background loop probes it for the whole deployment.
"""

from __future__ import annotations

import builtins
import logging
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import testkit
from packages import release_thread_gates, thread_gate, write_package, zip_directory
from starlette_hotdeploy import (
    CheckFailed,
    Deployer,
    DeploymentError,
    HotDeployMiddleware,
    LoadError,
    PackageVersion,
    StartupError,
    VersionState,
    _loader,
    hookimpl,
)
from starlette_hotdeploy._hooks import make_plugin_manager, run_checks
from test_e2e_uvicorn import serving

pytestmark = pytest.mark.anyio

TOKEN = "boundary-token"
GATE_WAIT = 10  # seconds a paused package waits for its gate at most (every wait is bounded)

# A package whose code raises where the test says: `@AT_IMPORT@` etc. are replaced by code.
APP = """
import contextlib

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

VERSION = "@VERSION@"


async def index(request):
    return JSONResponse({"version": VERSION})


async def lazy(request):
    from greeter.models import describe  # resolved through sys.modules at request time

    return JSONResponse({"version": VERSION, "model": describe()})


async def health(request):
    @IN_HEALTH@
    return PlainTextResponse("ok")


@contextlib.asynccontextmanager
async def lifespan(app):
    @AT_STARTUP@
    yield
    @AT_SHUTDOWN@


app = Starlette(
    routes=[Route("/", index), Route("/lazy", lazy), Route("/health", health)], lifespan=lifespan
)


def create():
    @IN_FACTORY@
    return app


@AT_IMPORT@
"""

HOOKS = """
from starlette_hotdeploy import hookimpl


@hookimpl
def hotdeploy_check_before_activate(version):
    @IN_HOOK@
"""


def app_source(
    version: str,
    *,
    at_import: str = "pass",
    in_factory: str = "pass",
    at_startup: str = "pass",
    at_shutdown: str = "pass",
    in_health: str = "pass",
    preamble: str = "",
) -> str:
    """The app module of the test package; `preamble` runs first (before any import)."""
    source = (
        APP.replace("@VERSION@", version)
        .replace("@AT_IMPORT@", at_import)
        .replace("@IN_FACTORY@", in_factory)
        .replace("@AT_STARTUP@", at_startup)
        .replace("@AT_SHUTDOWN@", at_shutdown)
        .replace("@IN_HEALTH@", in_health)
    )
    return preamble + source


def package(
    sources: Path,
    version: str,
    *,
    app: str | None = None,
    factory: bool = False,
    checks: str | None = None,
    manifest_extra: str = "",
    name: str = "greeter",
) -> Path:
    """Write a test package; `checks` is the source of its hooks module (`greeter.checks`)."""
    extra = manifest_extra
    files = None
    if checks is not None:
        extra += f'hooks = "{name}.checks"\n'
        files = {f"{name}/checks.py": checks}
    source = app if app is not None else app_source(version)
    root = write_package(sources, name, version, app=source, manifest_extra=extra, files=files)
    if factory:
        manifest = root / "hotdeploy.toml"
        manifest.write_text(manifest.read_text().replace(f'"{name}.app:app"', f'"{name}.app:create()"'))
    return root


def archive(root: Path) -> bytes:
    return zip_directory(root, root.parent / f"{root.name}.zip").read_bytes()


async def version_of(client: httpx.AsyncClient, path: str = "/greeter/") -> tuple[int, str]:
    """(status, the version that answered), or (status, body) when it is not a 200."""
    response = await client.get(path)
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, str(response.json()["version"])


def namespaced(prefix: str) -> list[str]:
    """Names in sys.modules under the namespaces of a version ('_hotdeploy_greeter_2_0_')."""
    return [name for name in list(sys.modules) if name.startswith(prefix)]


@pytest.fixture(autouse=True)
def _open_thread_gates() -> Iterator[None]:
    release_thread_gates()
    yield
    release_thread_gates()  # never leave a package's import thread paused


# -- in-process: what package code raises, wherever it runs ------------------------------------------


@dataclass(frozen=True)
class Crash:
    error: type[Exception]
    step: str
    detail: str  # in the error's message, with {exc} for the exception's description


WHERE = {
    "import": Crash(LoadError, "load", "importing 'greeter.app' raised {exc} (app.py:"),
    "factory": Crash(LoadError, "load", "factory 'greeter.app:create()' raised {exc} (app.py:"),
    "hooks module": Crash(
        LoadError, "load", "cannot load the package's hooks module 'greeter.checks': {exc} (checks.py:"
    ),
    "lifespan startup": Crash(StartupError, "start", "lifespan startup raised {exc}"),
    "package hook": Crash(
        CheckFailed, "check", "greeter.checks.hotdeploy_check_before_activate raised {exc}"
    ),
    "health endpoint": Crash(CheckFailed, "check", "health check GET /greeter/health raised {exc}"),
}
RAISES = {
    "SystemExit(3)": "SystemExit(3)",
    "KeyboardInterrupt()": "KeyboardInterrupt",
    "GeneratorExit()": "GeneratorExit",
}
CASES = [
    pytest.param(where, code, id=f"{where}-{code}")
    for where in WHERE
    for code in ("SystemExit(3)", "KeyboardInterrupt()")
] + [
    pytest.param("hooks module", "GeneratorExit()", id="hooks module-GeneratorExit()"),
    pytest.param("lifespan startup", "GeneratorExit()", id="lifespan startup-GeneratorExit()"),
]


def crashing_package(sources: Path, where: str, code: str) -> Path:
    """Version 2.0, raising `code` in `where`."""
    statement = f"raise {code}"
    if where == "import":
        return package(sources, "2.0", app=app_source("2.0", at_import=statement))
    if where == "factory":
        return package(sources, "2.0", app=app_source("2.0", in_factory=statement), factory=True)
    if where == "hooks module":
        return package(sources, "2.0", checks=statement + "\n")
    if where == "lifespan startup":
        return package(sources, "2.0", app=app_source("2.0", at_startup=statement))
    if where == "package hook":
        return package(sources, "2.0", checks=HOOKS.replace("@IN_HOOK@", statement))
    assert where == "health endpoint"
    return package(
        sources, "2.0", app=app_source("2.0", in_health=statement), manifest_extra='health = "/health"\n'
    )


@pytest.mark.parametrize(("where", "code"), CASES)
async def test_what_package_code_raises_fails_only_its_deployment(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, where: str, code: str
) -> None:
    await deployer.deploy(package(sources, "1.0"))
    crash = WHERE[where]

    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(crashing_package(sources, where, code))

    assert isinstance(caught.value.cause, crash.error), repr(caught.value.cause)
    assert crash.detail.format(exc=RAISES[code]) in str(caught.value)
    record = caught.value.deployment
    assert (record.outcome, record.error_step) == ("failed", crash.step)
    assert await version_of(client) == (200, "1.0")
    assert [v.version for v in deployer.package("greeter").loaded] == ["1.0"]
    assert namespaced("_hotdeploy_greeter_2_0_") == []
    # Nothing is left claimed or broken: the next deployment of the package works.
    await deployer.deploy(package(sources, "3.0"))
    assert await version_of(client) == (200, "3.0")


class Drains:
    @hookimpl
    def hotdeploy_drained(self, version: PackageVersion) -> None:
        testkit.event(f"drained {version.version}").set()


@pytest.mark.parametrize("code", ["SystemExit(4)", "KeyboardInterrupt()"])
async def test_a_lifespan_shutdown_that_raises_during_retirement_is_logged(
    deployer: Deployer,
    client: httpx.AsyncClient,
    sources: Path,
    caplog: pytest.LogCaptureFixture,
    code: str,
) -> None:
    deployer.plugins.register(Drains())
    await deployer.deploy(package(sources, "1.0", app=app_source("1.0", at_shutdown=f"raise {code}")))
    old = deployer.package("greeter").active
    assert old is not None

    await deployer.deploy(package(sources, "2.0"))
    with anyio.fail_after(10):
        await testkit.event("drained 1.0").wait()

    assert old.state is VersionState.RETIRED
    expected = RAISES.get(code, code)
    assert any(f"lifespan shutdown raised {expected}" in r.getMessage() for r in caplog.records), caplog.text
    assert await version_of(client) == (200, "2.0")
    await deployer.deploy(package(sources, "3.0"))  # the runtime is alive and well
    assert await version_of(client) == (200, "3.0")


async def test_deep_recursion_at_import(deployer: Deployer, client: httpx.AsyncClient, sources: Path) -> None:
    await deployer.deploy(package(sources, "1.0"))
    recursion = "def down(n):\n    return down(n + 1)\n\n\ndown(0)\n"
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(package(sources, "2.0", app=recursion))
    assert isinstance(caught.value.cause, LoadError)
    assert "importing 'greeter.app' raised RecursionError (app.py:2): maximum recursion depth" in str(
        caught.value
    )
    assert await version_of(client) == (200, "1.0")


class ServerPlugin:
    """A server plugin (not package code) that raises in a check and in a notification."""

    @hookimpl
    def hotdeploy_validate(self, manifest: Any) -> None:
        if manifest.version == "2.0":
            raise KeyboardInterrupt

    @hookimpl
    def hotdeploy_activated(self) -> None:
        raise SystemExit(5)


class Activations:
    @hookimpl
    def hotdeploy_activated(self, version: PackageVersion) -> None:
        testkit.event(f"activated {version.version}").set()


async def test_server_plugins_that_raise_veto_or_are_logged(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deployer.plugins.register(Activations())
    deployer.plugins.register(ServerPlugin(), name="raiser")  # called first: registered last

    await deployer.deploy(package(sources, "1.0"))
    with anyio.fail_after(10):
        await testkit.event("activated 1.0").wait()  # after the raiser's notification
    assert any("raiser.hotdeploy_activated raised SystemExit(5)" in r.getMessage() for r in caplog.records)

    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(package(sources, "2.0"))
    assert isinstance(caught.value.cause, CheckFailed)
    assert "check raiser.hotdeploy_validate raised KeyboardInterrupt" in str(caught.value)
    assert await version_of(client) == (200, "1.0")


class Forever:
    @hookimpl
    async def hotdeploy_check_before_activate(self) -> None:
        testkit.event("checking").set()
        await anyio.sleep_forever()


async def test_cancellation_still_goes_through_the_boundary() -> None:
    """The boundary converts what hooks raise, never anyio's cancellation: a check cancelled
    while it runs is cancelled (no CheckFailed comes out instead)."""
    manager = make_plugin_manager([Forever()], entry_points=False)
    scope = anyio.CancelScope()

    async def check() -> None:
        with scope:
            await run_checks(
                "hotdeploy_check_before_activate",
                [manager],
                {"version": None, "previous": None},
                timeout=30,
                package="greeter",
                version="2.0",
                step="check",
            )

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(check)
            await testkit.event("checking").wait()
            scope.cancel()
    assert scope.cancelled_caught


# -- in-process: sync apps ---------------------------------------------------------------------------

SYNC_APPS = {
    "function": ("def app(scope, receive, send):\n    pass\n", "is a plain (sync) function"),
    "partial": (
        "import functools\n\n\ndef handle(tag, scope, receive, send):\n    pass\n\n\n"
        "app = functools.partial(handle, 'x')\n",
        "is a partial of a plain (sync) function",
    ),
    "object": (
        "class App:\n    def __call__(self, scope, receive, send):\n        pass\n\n\napp = App()\n",
        "is an instance of App whose __call__ is a plain (sync) function",
    ),
    "async generator": (
        "async def app(scope, receive, send):\n    yield\n",
        "is an async generator function",
    ),
}

ANSWER = """
import functools

from starlette.responses import JSONResponse


async def answer(version, scope, receive, send):
    if scope["type"] == "http":
        await JSONResponse({"version": version})(scope, receive, send)
"""
ASYNC_APPS = {
    "function": ANSWER
    + "\n\nasync def app(scope, receive, send):\n    await answer('2.0', scope, receive, send)\n",
    "partial": ANSWER + "\n\napp = functools.partial(answer, '2.0')\n",
    "object": ANSWER
    + "\n\nclass App:\n    async def __call__(self, scope, receive, send):\n"
    + "        await answer('2.0', scope, receive, send)\n\n\napp = App()\n",
}


@pytest.mark.parametrize("kind", SYNC_APPS)
async def test_a_sync_app_is_refused(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, kind: str
) -> None:
    source, why = SYNC_APPS[kind]
    await deployer.deploy(package(sources, "1.0"))
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(package(sources, "2.0", app=source))
    assert isinstance(caught.value.cause, LoadError)
    assert f"'greeter.app:app' {why}; an ASGI app is `async def app(scope, receive, send)`" in str(
        caught.value
    )
    assert await version_of(client) == (200, "1.0")


@pytest.mark.parametrize("kind", ASYNC_APPS)
async def test_async_callables_pass(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, kind: str
) -> None:
    await deployer.deploy(package(sources, "1.0"))  # a Starlette instance
    await deployer.deploy(package(sources, "2.0", app=ASYNC_APPS[kind]))
    assert await version_of(client) == (200, "2.0")


# -- in-process: loads that overlap --------------------------------------------------------------------


def paused_at_import(gate: str, version: str, *, then: str = "", before: str = "") -> str:
    """An app module that runs `before`, pauses its import on the thread gate `gate`
    (announcing `gate:entered`), runs `then`, then defines the app."""
    preamble = (
        f"{before}\nimport packages\n\n"
        f"packages.thread_gate({gate + ':entered'!r}).set()\n"
        f"packages.thread_gate({gate!r}).wait({GATE_WAIT})\n{then}\n"
    )
    return app_source(version, preamble=preamble)


async def entered(gate: str) -> None:
    """Until package code paused on the thread gate `gate` (bounded)."""
    assert await anyio.to_thread.run_sync(thread_gate(gate + ":entered").wait, GATE_WAIT)


async def test_versions_unloaded_during_a_load_are_not_tampering(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    """Another package is undeployed (its namespace closed, its modules gone from sys.modules)
    while a version's import runs: that is not the import's doing."""
    await deployer.deploy(package(sources, "1.0"))
    await deployer.deploy(package(sources, "1.0", name="other"))
    assert namespaced("_hotdeploy_other_1_0_")

    async with anyio.create_task_group() as tg:
        tg.start_soon(deployer.deploy, package(sources, "2.0", app=paused_at_import("load", "2.0")))
        await entered("load")
        await deployer.undeploy("other")
        assert namespaced("_hotdeploy_other_1_0_") == []
        thread_gate("load").set()

    assert await version_of(client) == (200, "2.0")


@pytest.mark.parametrize("seen_by", ["module locks", "module specs"])
async def test_an_import_that_fails_in_another_thread_during_a_load_is_not_tampering(
    deployer: Deployer,
    client: httpx.AsyncClient,
    sources: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    seen_by: str,
) -> None:
    """A third-party module is still being imported (in another thread) when a version's load
    begins, and its import fails meanwhile (the module leaves sys.modules): that is not the
    load's doing. Imports in flight are told by importlib's module locks, or, where those are
    not to be found, by each module's spec."""
    if seen_by == "module specs":
        monkeypatch.setattr(_loader, "_module_locks", None)
    third_party = tmp_path / "third_party"
    third_party.mkdir()
    (third_party / "hotdeploy_failing_dependency.py").write_text(
        "import packages\n\n"
        "packages.thread_gate('dependency:entered').set()\n"
        f"packages.thread_gate('dependency').wait({GATE_WAIT})\n"
        "raise RuntimeError('no database')\n"
    )
    monkeypatch.syspath_prepend(str(third_party))
    failed = anyio.Event()

    async def import_it() -> None:
        with pytest.raises(RuntimeError, match="no database"):
            await anyio.to_thread.run_sync(__import__, "hotdeploy_failing_dependency")
        failed.set()

    await deployer.deploy(package(sources, "1.0"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(import_it)
        await entered("dependency")
        tg.start_soon(deployer.deploy, package(sources, "2.0", app=paused_at_import("load", "2.0")))
        await entered("load")  # its snapshot has the dependency, half imported
        thread_gate("dependency").set()
        await failed.wait()
        assert "hotdeploy_failing_dependency" not in sys.modules
        thread_gate("load").set()

    assert await version_of(client) == (200, "2.0")


async def test_overlapping_loads_share_the_blame_for_tampering(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    """While greeter 2.0 imports, other 1.0's import adds a builtin: the change is undone, and
    both loads are refused (who did it cannot be told apart)."""
    await deployer.deploy(package(sources, "1.0"))
    tampering = app_source("1.0", preamble="import builtins\n\nbuiltins.hotdeploy_boundary_test = True\n")
    failures: dict[str, DeploymentError] = {}

    async def deploy(name: str, root: Path) -> None:
        with pytest.raises(DeploymentError) as caught:
            await deployer.deploy(root)
        failures[name] = caught.value

    async with anyio.create_task_group() as tg:
        tg.start_soon(deploy, "greeter", package(sources, "2.0", app=paused_at_import("slow", "2.0")))
        await entered("slow")
        await deploy("other", package(sources, "1.0", name="other", app=tampering))
        thread_gate("slow").set()

    assert not hasattr(builtins, "hotdeploy_boundary_test")
    assert "the import added builtins.hotdeploy_boundary_test; undone; loads overlapped" in str(
        failures["other"]
    )
    assert "another load's import added builtins.hotdeploy_boundary_test (undone)" in str(failures["greeter"])
    assert isinstance(failures["greeter"].cause, LoadError)
    assert await version_of(client) == (200, "1.0")


# -- through a real uvicorn ------------------------------------------------------------------------------


@asynccontextmanager
async def real_server(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """uvicorn on 127.0.0.1, in this event loop, serving a host app with the admin API; yields
    a client for it (with the admin token) once the deployer runs."""
    deployer = Deployer(home=tmp_path / "home", entry_points=False)
    started = anyio.Event()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.set()  # inside the deployer's runtime
        yield

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host")

    app = Starlette(
        routes=[Route("/", home)],
        lifespan=lifespan,
        middleware=[Middleware(HotDeployMiddleware, deployer=deployer, admin_token=TOKEN)],
    )
    async with serving(app, started, ws="websockets-sansio") as url:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as client:
            yield client


async def deploy_over_http(client: httpx.AsyncClient, root: Path) -> httpx.Response:
    return await client.post(
        "/_hotdeploy/packages", content=archive(root), headers={"Content-Type": "application/zip"}
    )


async def deployed(client: httpx.AsyncClient, root: Path) -> None:
    response = await deploy_over_http(client, root)
    assert response.status_code == 201, response.text


@dataclass
class Watch:
    """What the previous version answered while a failing deployment ran."""

    response: httpx.Response
    during: list[tuple[int, str]]  # asked while the failing package was paused
    background: list[tuple[int, str]]  # asked in a loop for the whole deployment


async def deploy_while_watching(
    client: httpx.AsyncClient,
    root: Path,
    *,
    paused: Callable[[], Awaitable[None]],
    release: Callable[[], None] | None,
    path: str = "/greeter/",
) -> Watch:
    """Deploy `root` over HTTP; once the package's code is `paused`, ask `path` three times
    (without `release`: until the deployment answered), then `release` it."""
    done = anyio.Event()
    result: list[httpx.Response] = []
    background: list[tuple[int, str]] = []
    during: list[tuple[int, str]] = []

    async def post() -> None:
        try:
            result.append(await deploy_over_http(client, root))
        finally:
            done.set()

    async def keep_probing() -> None:
        while not done.is_set() and len(background) < 5000:
            background.append(await version_of(client, path))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(post)
            tg.start_soon(keep_probing)
            await paused()
            if release is None:
                while not done.is_set() and len(during) < 5000:
                    during.append(await version_of(client, path))
            else:
                for _ in range(3):
                    during.append(await version_of(client, path))
                assert not done.is_set(), "the deployment ended before the package was released"
                release()
    (response,) = result
    return Watch(response, during, background)


def assert_problem(response: httpx.Response, *fragments: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    for fragment in fragments:
        assert fragment in problem["detail"], problem["detail"]
    return problem


def assert_kept_serving(watch: Watch, version: str = "1.0") -> None:
    assert watch.during, "nothing was asked while the package was paused"
    assert set(watch.during) == {(200, version)}, watch.during
    assert watch.background, "the background probe never got an answer"
    assert set(watch.background) == {(200, version)}, watch.background


uvicorn_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio only


def thread_paused(gate: str) -> Callable[[], Awaitable[None]]:
    async def paused() -> None:
        await entered(gate)

    return paused


def loop_paused(event: str) -> Callable[[], Awaitable[None]]:
    async def paused() -> None:
        with anyio.fail_after(GATE_WAIT):
            await testkit.event(event + ":entered").wait()

    return paused


@uvicorn_only
async def test_sys_exit_at_import_on_a_real_server(tmp_path: Path, sources: Path) -> None:
    async with real_server(tmp_path) as client:
        await deployed(client, package(sources, "1.0"))
        failing = package(
            sources, "2.0", app=paused_at_import("exit", "2.0", then="import sys\nsys.exit()\n")
        )

        result = await deploy_while_watching(
            client, failing, paused=thread_paused("exit"), release=thread_gate("exit").set
        )

        problem = assert_problem(result.response, "importing 'greeter.app' raised SystemExit (app.py:")
        assert (problem["step"], problem["deployment"]["outcome"]) == ("load", "failed")
        assert_kept_serving(result)
        await deployed(client, package(sources, "3.0"))  # not left claimed
        assert await version_of(client) == (200, "3.0")


@uvicorn_only
async def test_system_exit_in_lifespan_startup_on_a_real_server(tmp_path: Path, sources: Path) -> None:
    startup = (
        "import testkit\n"
        "    testkit.event('startup:entered').set()\n"
        "    await testkit.event('startup').wait()\n"
        "    raise SystemExit(3)"
    )
    async with real_server(tmp_path) as client:
        await deployed(client, package(sources, "1.0"))
        failing = package(sources, "2.0", app=app_source("2.0", at_startup=startup))

        result = await deploy_while_watching(
            client, failing, paused=loop_paused("startup"), release=testkit.event("startup").set
        )

        problem = assert_problem(result.response, "lifespan startup raised SystemExit(3)")
        assert problem["step"] == "start"
        assert_kept_serving(result)
        await deployed(client, package(sources, "3.0"))
        assert await version_of(client) == (200, "3.0")
        assert (await client.get("/")).text == "host"


class Returned(logging.Handler):
    """Sets an event when the engine logs that an abandoned import returned."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "abandoned import returned" in record.getMessage():
            self.event.set()


@uvicorn_only
async def test_an_import_past_its_load_timeout_is_abandoned_on_a_real_server(
    tmp_path: Path, sources: Path
) -> None:
    """greeter 2.0 sleeps at import past its load_timeout (1s): the deployment fails at 1s,
    other packages answer throughout, and what the thread installs once released is removed."""
    # Once released, the thread finds its namespace closed: no builtins, no imports (so it
    # imports what it needs first), and its module is no longer in sys.modules.
    late = "sys.modules[__name__ + '_late'] = types.ModuleType('late')\n"
    source = paused_at_import("slow", "2.0", before="import sys\nimport types\n", then=late)
    slow = package(sources, "2.0", app=source, manifest_extra="load_timeout = 1\n")
    returned = Returned()
    logging.getLogger("starlette_hotdeploy").addHandler(returned)
    try:
        async with real_server(tmp_path) as client:
            await deployed(client, package(sources, "1.0"))
            await deployed(client, package(sources, "1.0", name="other"))

            result = await deploy_while_watching(
                client, slow, paused=thread_paused("slow"), release=None, path="/other/"
            )

            assert_problem(
                result.response,
                "greeter 2.0: importing 'greeter.app' did not finish within 1s; the thread is abandoned",
            )
            assert_kept_serving(result)
            assert len(result.during) >= 3  # answered while the import was stuck, for ~1s
            assert await version_of(client) == (200, "1.0")
            # The thread still runs; its namespace is already closed.
            assert namespaced("_hotdeploy_greeter_2_0_") == []

            thread_gate("slow").set()
            assert await anyio.to_thread.run_sync(returned.event.wait, GATE_WAIT)
            assert namespaced("_hotdeploy_greeter_2_0_") == []  # its late module is gone too
            await deployed(client, package(sources, "3.0"))
            assert await version_of(client) == (200, "3.0")
    finally:
        logging.getLogger("starlette_hotdeploy").removeHandler(returned)


TAMPER_MODULES = """
import sys
import types

victim = next(k for k in list(sys.modules) if k.startswith("_hotdeploy_greeter_1_0_") and k.endswith(".greeter.models"))
fake = types.ModuleType(victim)
fake.describe = lambda: "evil"
sys.modules[victim] = fake
"""
TAMPER_BUILTINS = """
import builtins

builtins.ascii = lambda obj: "evil"
builtins.hotdeploy_was_here = True
"""


@uvicorn_only
@pytest.mark.parametrize("target", ["sys.modules", "builtins"])
async def test_a_load_that_tampers_is_undone_and_refused_on_a_real_server(
    tmp_path: Path, sources: Path, target: str
) -> None:
    original_ascii = builtins.ascii
    tamper = TAMPER_MODULES if target == "sys.modules" else TAMPER_BUILTINS
    async with real_server(tmp_path) as client:
        await deployed(client, package(sources, "1.0"))
        assert (await client.get("/greeter/lazy")).json()["model"] == "models of greeter 1.0"
        (victim,) = [k for k in namespaced("_hotdeploy_greeter_1_0_") if k.endswith(".greeter.models")]
        failing = package(sources, "2.0", app=paused_at_import("tamper", "2.0", then=tamper))

        result = await deploy_while_watching(
            client, failing, paused=thread_paused("tamper"), release=thread_gate("tamper").set
        )

        if target == "sys.modules":
            expected = f"the import replaced sys.modules[{victim!r}]; undone"
        else:
            expected = "the import replaced builtins.ascii, added builtins.hotdeploy_was_here; undone"
        problem = assert_problem(result.response, expected)
        assert problem["step"] == "load"
        assert_kept_serving(result)
        # The serving version answers with its own code again (its lazy import too).
        assert (await client.get("/greeter/lazy")).json() == {
            "version": "1.0",
            "model": "models of greeter 1.0",
        }
        assert builtins.ascii is original_ascii
        assert not hasattr(builtins, "hotdeploy_was_here")


@uvicorn_only
async def test_a_sync_app_is_refused_on_a_real_server(tmp_path: Path, sources: Path) -> None:
    sync_app = (
        "import packages\n\n"
        "packages.thread_gate('sync:entered').set()\n"
        f"packages.thread_gate('sync').wait({GATE_WAIT})\n\n\n"
        "def app(scope, receive, send):\n    pass\n"
    )
    async with real_server(tmp_path) as client:
        await deployed(client, package(sources, "1.0"))

        result = await deploy_while_watching(
            client,
            package(sources, "2.0", app=sync_app),
            paused=thread_paused("sync"),
            release=thread_gate("sync").set,
        )

        assert_problem(
            result.response,
            "'greeter.app:app' is a plain (sync) function; an ASGI app is `async def app(scope, receive, send)`",
        )
        assert_kept_serving(result)
