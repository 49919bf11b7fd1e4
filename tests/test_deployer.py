"""Deployments through the Python API: switch, drain, failures that never reach users, rollback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

import testkit
from drains import Drained
from packages import DEPLOY_STEPS, write_package, zip_directory
from starlette_hotdeploy import (
    Deployer,
    DeploymentError,
    DeploymentInProgress,
    LoadError,
    NoPreviousVersion,
    NotRunning,
    PackageVersion,
    UnknownVersion,
    VersionState,
    hookimpl,
)

pytestmark = pytest.mark.anyio


async def version_of(client: httpx.AsyncClient, path: str = "/greeter/") -> str:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    return str(response.json()["version"])


def namespaces_of(name: str) -> set[str]:
    return {key for key in sys.modules if key.startswith(f"_hotdeploy_{name}_") and "." not in key}


async def test_upgrade_switches_new_requests_and_records_the_deployment(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    first = await deployer.deploy(write_package(sources, version="1.0"))
    assert await version_of(client) == "1.0"
    second = await deployer.deploy(zip_directory(write_package(sources, version="2.0"), sources / "g2.zip"))

    assert await version_of(client) == "2.0"
    assert (first.outcome, second.outcome) == ("succeeded", "succeeded")
    assert (second.package, second.from_version, second.to_version) == ("greeter", "1.0", "2.0")
    assert second.sha256 is not None
    assert len(second.sha256) == 64
    names = [step.name for step in second.steps]
    assert names[:11] == DEPLOY_STEPS
    assert all(step.ok and step.duration_ms is not None for step in second.steps[:11])
    assert deployer.deployment(second.id) is second
    assert list(deployer.history)[-2:] == [first, second]
    assert deployer.status()[0].active_version == "2.0"
    # Other paths never see the packages.
    assert (await client.get("/")).text == "host"


async def test_own_imports_resolve_to_their_version_while_two_versions_run(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    async with anyio.create_task_group() as tg:
        results: dict[str, Any] = {}

        async def held() -> None:
            results["old"] = (await client.get("/greeter/hold?key=k")).json()

        tg.start_soon(held)
        await testkit.event("k:entered").wait()
        await deployer.deploy(write_package(sources, version="2.0"))

        # Both versions are alive: 1.0 drains the held request, 2.0 takes new ones, and each
        # one's lazy `from greeter.models import describe` lands in its own version.
        package = deployer.package("greeter")
        assert [(v.version, v.state) for v in package.loaded] == [
            ("1.0", VersionState.DRAINING),
            ("2.0", VersionState.ACTIVE),
        ]
        assert len(namespaces_of("greeter")) == 2
        lazy = (await client.get("/greeter/lazy")).json()
        assert lazy == {"version": "2.0", "model": "models of greeter 2.0", "same": True}
        testkit.event("k").set()
    assert results["old"] == {"version": "1.0", "held": "k"}
    await drained.wait(1)
    assert [v.version for v in deployer.package("greeter").loaded] == ["2.0"]
    assert len(namespaces_of("greeter")) == 1
    assert deployer.retired_alive() == []


OVERLOADED = """
import typing

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


@typing.overload
def double(x: int) -> int: ...
@typing.overload
def double(x: str) -> str: ...
def double(x):
    return x * 2


async def index(request):
    return PlainTextResponse(double("{version}"))


app = Starlette(routes=[Route("/", index)])
"""


async def test_a_version_that_uses_typing_overload_is_freed(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    # typing keeps a registry of overloads by module name: it held every retired version.
    for index, version in enumerate(["1.0", "2.0", "3.0"]):
        await deployer.deploy(write_package(sources, version=version, app=OVERLOADED.format(version=version)))
        assert (await client.get("/greeter/")).text == version * 2
        if index:
            await drained.wait(index)
    assert deployer.retired_alive() == []


async def test_fifty_swaps_leave_no_retired_version_alive(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    a = write_package(sources, version="1.0")
    b = write_package(sources, version="2.0")
    for i in range(50):
        await deployer.deploy(a if i % 2 == 0 else b)
        assert await version_of(client, "/greeter/lazy") == ("1.0" if i % 2 == 0 else "2.0")
    await drained.wait(49)
    assert deployer.retired_alive() == []
    assert len(namespaces_of("greeter")) == 1
    shutdowns = [c for c in testkit.calls if c.startswith("shutdown")]
    assert len(shutdowns) == 49  # every replaced version ran its lifespan shutdown


LATER_APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def index(request):
    from greeter import later  # first imported by a request, long after the load

    return PlainTextResponse(later.VALUE)
"""


async def test_a_module_first_imported_by_a_request_is_unloaded_with_its_version(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    app = LATER_APP + "\napp = Starlette(routes=[Route('/', index)])\n"
    files = {"greeter/later.py": "VALUE = 'later'\n"}
    await deployer.deploy(write_package(sources, version="1.0", app=app, files=files))
    assert [key for key in sys.modules if key.endswith(".greeter.later")] == []
    assert (await client.get("/greeter/")).text == "later"
    [late] = [key for key in sys.modules if key.endswith(".greeter.later")]
    await deployer.deploy(write_package(sources, version="2.0"))
    await drained.wait_for("1.0")
    assert late not in sys.modules
    assert deployer.retired_alive() == []


async def test_lifespan_state_is_per_version(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    assert (await client.get("/greeter/state")).json()["owner"] == "greeter 1.0"
    await deployer.deploy(write_package(sources, version="2.0"))
    assert (await client.get("/greeter/state")).json()["owner"] == "greeter 2.0"
    assert testkit.calls[:2] == ["startup greeter 1.0", "startup greeter 2.0"]


BROKEN_APPS = {
    "syntax": ("def broken(:\n", LoadError, "syntax error in 'greeter.app' (app.py:1)"),
    "missing module": ("import greeter.nothing_here\n", LoadError, "no module named 'greeter.nothing_here'"),
    "raises": (
        "raise RuntimeError('no database')\n",
        LoadError,
        "raised RuntimeError (app.py:1): no database",
    ),
    "no attribute": ("other = 1\n", LoadError, "has no attribute 'app'"),
    "not callable": ("app = 42\n", LoadError, "is int, not an ASGI application"),
    "a class": ("class app:\n    pass\n", LoadError, "is type, not an ASGI application"),
    "wrong signature": ("def app(scope):\n    pass\n", LoadError, "does not take (scope, receive, send)"),
}


@pytest.mark.parametrize("case", BROKEN_APPS, ids=list(BROKEN_APPS))
async def test_broken_code_fails_with_its_cause_and_the_old_version_keeps_serving(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, case: str
) -> None:
    source, error_type, message = BROKEN_APPS[case]
    await deployer.deploy(write_package(sources, version="1.0"))
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(write_package(sources, version="2.0", app=source))
    assert isinstance(caught.value.cause, error_type)
    assert message in str(caught.value)
    assert "greeter 2.0" in str(caught.value)
    record = caught.value.deployment
    assert (record.outcome, record.error_step) == ("failed", "load")
    assert await version_of(client) == "1.0"
    assert len(namespaces_of("greeter")) == 1  # the broken version's modules are gone


async def test_factory_app(deployer: Deployer, client: httpx.AsyncClient, sources: Path) -> None:
    factory = (
        "from starlette.applications import Starlette\n"
        "from starlette.responses import JSONResponse\n"
        "from starlette.routing import Route\n"
        "def create():\n"
        "    async def index(request):\n"
        "        return JSONResponse({'version': 'made'})\n"
        "    return Starlette(routes=[Route('/', index)])\n"
    )
    root = write_package(sources, version="1.0", app=factory)
    (root / "hotdeploy.toml").write_text(
        (root / "hotdeploy.toml").read_text().replace('"greeter.app:app"', '"greeter.app:create()"')
    )
    await deployer.deploy(root)
    assert await version_of(client) == "made"


LIFESPAN_FAILS = """
import contextlib
import anyio
from starlette.applications import Starlette

@contextlib.asynccontextmanager
async def lifespan(app):
    {body}
    yield

app = Starlette(lifespan=lifespan)
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise RuntimeError('cannot open the database')", "cannot open the database"),
        ("await anyio.sleep_forever()", "did not complete within 0.2s"),
    ],
    ids=["raises", "hangs"],
)
async def test_failed_startup_is_discarded(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, body: str, message: str
) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(
            write_package(
                sources,
                version="2.0",
                app=LIFESPAN_FAILS.format(body=body),
                manifest_extra="startup_timeout = 0.2\n",
            )
        )
    assert caught.value.step == "start"
    assert message in str(caught.value)
    assert await version_of(client) == "1.0"


async def test_health_path_vetoes_activation(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, version="1.0", manifest_extra='health = "/health"\n'))
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(write_package(sources, version="2.0", manifest_extra='health = "/nope"\n'))
    assert "health check GET /greeter/nope answered 404: Not Found" in str(caught.value)
    assert caught.value.step == "check"
    assert await version_of(client) == "1.0"
    # The discarded version was started, so it was shut down cleanly too.
    assert testkit.calls[-1] == "shutdown greeter 2.0"


class Veto:
    def __init__(self, result: Any = None, *, before: bool = True, raises: bool = False) -> None:
        self.result = result
        self.before = before
        self.raises = raises
        self.seen: list[tuple[str, str | None]] = []

    def _answer(self, version: PackageVersion, previous: PackageVersion | None) -> Any:
        self.seen.append((version.version, previous.version if previous else None))
        if version.version == "1.0":
            return None
        if self.raises:
            raise ValueError("error budget exceeded")
        return self.result

    @hookimpl
    async def hotdeploy_check_before_activate(
        self, version: PackageVersion, previous: PackageVersion | None
    ) -> Any:
        return self._answer(version, previous) if self.before else None

    @hookimpl
    def hotdeploy_check_after_activate(self, version: PackageVersion, previous: PackageVersion | None) -> Any:
        return None if self.before else self._answer(version, previous)


@pytest.mark.parametrize(
    ("veto", "message"),
    [
        (Veto(False), "vetoed: returned a failure"),
        (Veto("schema migration missing"), "vetoed: schema migration missing"),
        (Veto(raises=True), "raised ValueError: error budget exceeded"),
    ],
    ids=["false", "message", "raises"],
)
async def test_pre_activation_hook_veto(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, veto: Veto, message: str
) -> None:
    deployer.plugins.register(veto, name="gatekeeper")
    await deployer.deploy(write_package(sources, version="1.0"))
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(write_package(sources, version="2.0"))
    assert f"check gatekeeper.hotdeploy_check_before_activate {message}" in str(caught.value)
    assert veto.seen[-1] == ("2.0", "1.0")
    assert await version_of(client) == "1.0"


async def test_post_activation_veto_switches_back_at_once(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    events: list[str] = []

    class Watcher:
        @hookimpl
        def hotdeploy_rolled_back(self, version: PackageVersion, previous: PackageVersion) -> None:
            events.append(f"rolled back {version.version} -> {previous.version}")

        @hookimpl
        def hotdeploy_failed(self, error: Exception) -> None:
            events.append(f"failed: {error}")

    deployer.plugins.register(Veto("p99 latency doubled", before=False), name="canary")
    deployer.plugins.register(Watcher())
    await deployer.deploy(write_package(sources, version="1.0"))
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(write_package(sources, version="2.0"))
    record = caught.value.deployment
    assert record.outcome == "rolled_back"
    assert [s.name for s in record.steps][-4:] == ["bake", "switch back", "commit", "converge"]
    assert await version_of(client) == "1.0"
    assert deployer.package("greeter").lineage == ["1.0"]
    assert events[0] == "rolled back 2.0 -> 1.0"
    assert "p99 latency doubled" in events[1]


async def test_validate_hook_sees_the_manifest_before_any_import(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    class Policy:
        @hookimpl
        def hotdeploy_validate(self, manifest: Any) -> Any:
            return None if manifest.strategy == "drain" else "only drain is allowed here"

    deployer.plugins.register(Policy(), name="policy")
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(
            write_package(
                sources, version="1.0", app="raise SystemExit", manifest_extra='strategy = "block"\n'
            )
        )
    assert "only drain is allowed here" in str(caught.value)
    assert caught.value.step == "validate"
    assert (await client.get("/greeter/")).status_code == 404  # never mounted


async def test_a_package_ships_its_own_checks(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    checks = """
    from starlette_hotdeploy import hookimpl

    @hookimpl
    def hotdeploy_check_before_activate(version):
        if version.version == "2.0":
            return "2.0 refuses itself"
    """
    files = {"greeter/checks.py": checks}
    await deployer.deploy(
        write_package(sources, version="1.0", files=files, manifest_extra='hooks = "greeter.checks"\n')
    )
    with pytest.raises(DeploymentError, match=r"2\.0 refuses itself"):
        await deployer.deploy(
            write_package(sources, version="2.0", files=files, manifest_extra='hooks = "greeter.checks"\n')
        )
    # The hook belongs to that package only.
    await deployer.deploy(write_package(sources, name="other", version="2.0"))
    assert await version_of(client) == "1.0"


async def test_slow_check_times_out(tmp_path: Path, sources: Path) -> None:
    class Slow:
        @hookimpl
        async def hotdeploy_check_before_activate(self) -> None:
            await anyio.sleep_forever()

    deployer = Deployer(home=tmp_path / "h", plugins=[Slow()], entry_points=False, check_timeout=0.1)
    async with deployer.running():
        with pytest.raises(DeploymentError, match=r"did not answer within 0.1s"):
            await deployer.deploy(write_package(sources, version="1.0"))


async def test_rollback_and_activate(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    for version in ("1.0", "2.0", "3.0"):
        await deployer.deploy(write_package(sources, version=version))
    await drained.wait(2)
    record = await deployer.rollback("greeter")  # 1.0 and 2.0 are retired: reloaded from disk
    assert (record.operation, record.from_version, record.to_version) == ("rollback", "3.0", "2.0")
    assert await version_of(client) == "2.0"
    await deployer.rollback("greeter")
    assert await version_of(client) == "1.0"
    with pytest.raises(NoPreviousVersion):
        await deployer.rollback("greeter")
    await deployer.activate("greeter", "3.0")
    assert await version_of(client) == "3.0"
    with pytest.raises(UnknownVersion, match=r"no version '9.0' available \(available: 1.0, 2.0, 3.0\)"):
        await deployer.activate("greeter", "9.0")


async def test_rollback_while_the_old_version_drains_is_one_assignment(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/greeter/hold?key=k")
        await testkit.event("k:entered").wait()
        await deployer.deploy(write_package(sources, version="2.0"))
        record = await deployer.rollback("greeter")
        assert record.steps[0].detail == "warm: the version was still loaded"
        assert await version_of(client) == "1.0"
        testkit.event("k").set()
    assert testkit.calls.count("startup greeter 1.0") == 1  # never restarted


async def test_operations_on_one_package_are_refused_while_one_runs(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    class Pause:
        @hookimpl
        async def hotdeploy_check_before_activate(self, version: PackageVersion) -> None:
            if version.name == "greeter":
                testkit.event("checking").set()
                await testkit.event("resume").wait()

    deployer.plugins.register(Pause())
    async with anyio.create_task_group() as tg:
        tg.start_soon(deployer.deploy, write_package(sources, version="1.0"))
        await testkit.event("checking").wait()
        with pytest.raises(DeploymentInProgress, match="another operation on greeter is in progress"):
            await deployer.deploy(write_package(sources, version="2.0"))
        # Another package deploys meanwhile.
        await deployer.deploy(write_package(sources, name="other", version="1.0"))
        assert await version_of(client, "/other/") == "1.0"
        testkit.event("resume").set()
    assert await version_of(client) == "1.0"


async def gate_closed(deployer: Deployer, events: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
    """Wait until the block strategy's gate is up: the "switch" step has started (the gate goes
    up before that step's first await)."""
    async for event in events:
        if event["type"] == "step.started" and event["step"]["name"] == "switch":
            break
    mount = deployer.package("greeter").mount
    assert mount is not None
    assert mount.gate is not None


async def test_block_strategy_holds_new_requests_until_the_old_version_is_idle(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    answers: dict[str, str] = {}

    async def get(name: str, path: str) -> None:
        answers[name] = (await client.get(path)).json()["version"]

    async with anyio.create_task_group() as tg, deployer.events.subscribe() as events:
        tg.start_soon(get, "in flight", "/greeter/hold?key=old")
        await testkit.event("old:entered").wait()
        tg.start_soon(
            deployer.deploy, write_package(sources, version="2.0", manifest_extra='strategy = "block"\n')
        )
        await gate_closed(deployer, events)
        tg.start_soon(get, "held", "/greeter/")
        await anyio.wait_all_tasks_blocked()
        assert "held" not in answers  # held, not rejected
        testkit.event("old").set()
    assert answers == {"in flight": "1.0", "held": "2.0"}


async def test_block_strategy_gives_up_and_keeps_the_old_version(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/greeter/hold?key=old")
        await testkit.event("old:entered").wait()
        with pytest.raises(DeploymentError, match=r"block: 1 request\(s\) still running on 1.0 after 0.1s"):
            await deployer.deploy(
                write_package(
                    sources, version="2.0", manifest_extra='strategy = "block"\ndrain_timeout = 0.1\n'
                )
            )
        assert await version_of(client) == "1.0"
        testkit.event("old").set()


async def test_drain_timeout_ends_what_is_still_open(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, drained: Drained
) -> None:
    await deployer.deploy(write_package(sources, version="1.0", manifest_extra="drain_timeout = 0.1\n"))
    async with anyio.create_task_group() as tg:
        answers: list[httpx.Response] = []

        async def held() -> None:
            answers.append(await client.get("/greeter/hold?key=never"))

        tg.start_soon(held)
        await testkit.event("never:entered").wait()
        await deployer.deploy(write_package(sources, version="2.0"))
        await drained.wait(1)
    assert answers[0].status_code == 503
    assert answers[0].headers["retry-after"] == "1"
    assert drained.terminated == [1]
    assert "greeter 1.0 retired" in answers[0].text


async def test_undeploy_unmounts_and_shuts_down(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path
) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    record = await deployer.undeploy("greeter")
    assert record.outcome == "succeeded"
    assert (await client.get("/greeter/")).status_code == 404
    assert testkit.calls[-1] == "shutdown greeter 1.0"
    assert deployer.status() == []
    assert namespaces_of("greeter") == set()


async def test_unchanged_redeploy_is_a_no_op(deployer: Deployer, sources: Path) -> None:
    root = write_package(sources, version="1.0")
    await deployer.deploy(root)
    record = await deployer.deploy(root)
    assert [s.name for s in record.steps] == ["unpack", "unchanged"]
    assert testkit.calls == ["startup greeter 1.0"]


async def test_mount_of_a_package_cannot_change(deployer: Deployer, sources: Path) -> None:
    await deployer.deploy(write_package(sources, version="1.0"))
    with pytest.raises(DeploymentError, match="mount changed from '/greeter' to '/hello'"):
        await deployer.deploy(write_package(sources, version="2.0", mount="/hello"))


async def test_operations_need_a_running_deployer(tmp_path: Path, sources: Path) -> None:
    deployer = Deployer(home=tmp_path, entry_points=False)
    with pytest.raises(NotRunning, match=r"async with deployer\.running"):
        await deployer.deploy(write_package(sources))


async def test_wheel_and_bytes_sources(deployer: Deployer, client: httpx.AsyncClient, sources: Path) -> None:
    # A wheel keeps the manifest inside its top-level import package.
    root = write_package(sources, version="1.0")
    (root / "greeter" / "hotdeploy.toml").write_text((root / "hotdeploy.toml").read_text())
    (root / "hotdeploy.toml").unlink()
    (root / "greeter-1.0.dist-info").mkdir()
    (root / "greeter-1.0.dist-info" / "WHEEL").write_text("Wheel-Version: 1.0\n")
    wheel = zip_directory(root, sources / "greeter-1.0-py3-none-any.whl")
    await deployer.deploy(wheel)
    assert await version_of(client) == "1.0"

    archive = zip_directory(write_package(sources, version="2.0"), sources / "g2.zip")
    record = await deployer.deploy(archive.read_bytes())
    assert record.to_version == "2.0"
    assert await version_of(client) == "2.0"


async def test_plugins_load_from_the_entry_point_group(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed distribution that advertises a plugin in the `starlette_hotdeploy` group.
    site = tmp_path / "site"
    dist = site / "acme_checks-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-checks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[starlette_hotdeploy]\nacme = acme_checks\n")
    (site / "acme_checks.py").write_text(
        "from starlette_hotdeploy import hookimpl\n\n"
        "@hookimpl\n"
        "def hotdeploy_validate(manifest):\n"
        "    return 'acme policy: no packages today'\n"
    )
    monkeypatch.syspath_prepend(str(site))
    deployer = Deployer(home=tmp_path / "home")
    assert not deployer.plugins.has_plugin("acme")  # constructing does no I/O: scanned at start
    async with deployer.running():
        assert deployer.plugins.has_plugin("acme")
        with pytest.raises(DeploymentError, match=r"check acme\.hotdeploy_validate vetoed: acme policy"):
            await deployer.deploy(write_package(sources))


async def test_a_failing_background_task_ends_the_runtime_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind uvicorn the error would not show: the runtime names it before it ends."""

    async def broken() -> None:
        raise RuntimeError("a background task broke")

    deployer = Deployer(home=tmp_path / "home", entry_points=False)

    async def run() -> None:
        async with deployer.running():
            deployer._engine.runtime().start_soon(broken)
            await anyio.sleep_forever()

    with pytest.raises(BaseExceptionGroup) as info:
        await run()
    assert info.group_contains(RuntimeError, match="a background task broke")
    assert "the deployer's runtime failed: this worker no longer follows deployments" in caplog.text
    assert not deployer.is_running
