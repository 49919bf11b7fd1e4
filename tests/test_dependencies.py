"""Package dependencies: a package imports the Python modules of the packages it requires,
bound to the versions that were active when it loaded; upgrading (or rolling back) one of
those loads a new instance of each dependent bound to the new version and switches them all in
one step; a dependent that fails bound to it aborts the whole operation.

`inventory` exports `inventory.api` (its version, and `reserve`); `orders` requires it, imports
it at module level and lazily in a request, and stamps both versions in every answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import testkit
from conftest import host_app, running_on
from drains import Drained
from packages import write_package
from starlette_hotdeploy import (
    Deployer,
    DeploymentError,
    DeploymentInProgress,
    PackageVersion,
    VersionState,
    hookimpl,
)
from starlette_hotdeploy._deployment import Deployment
from starlette_hotdeploy._errors import StoreError
from starlette_hotdeploy._operation import Operation, OperationKind
from starlette_hotdeploy._sqlite_store import SQLiteStore

pytestmark = pytest.mark.anyio

INVENTORY_APP = """
import contextlib

import testkit
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from inventory import api


@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    testkit.calls.append(f"shutdown inventory {api.VERSION}")


async def index(request):
    return JSONResponse({"inventory": api.VERSION})


app = Starlette(routes=[Route("/", index)], lifespan=lifespan)
"""

INVENTORY_API = """
VERSION = "{version}"


def reserve(item):
    return f"{{item}} reserved by inventory {{VERSION}}"
"""

ORDERS_APP = """
import contextlib

import testkit
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from inventory.api import VERSION as INVENTORY, reserve
from orders import models

VERSION = "{version}"


@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    testkit.calls.append(f"shutdown orders {{VERSION}} (inventory {{INVENTORY}})")


async def index(request):
    from inventory import api  # lazy: still the version this instance is bound to

    return JSONResponse(
        {{"orders": VERSION, "inventory": INVENTORY, "lazy": api.VERSION, "own": models.describe()}}
    )


async def hold(request):
    key = request.query_params["key"]
    testkit.event(key + ":entered").set()
    await testkit.event(key).wait()
    from inventory import api

    return JSONResponse({{"orders": VERSION, "inventory": api.VERSION, "reserved": reserve("a book")}})


app = Starlette(routes=[Route("/", index), Route("/hold", hold)], lifespan=lifespan)
"""


def inventory(sources: Path, version: str, *, extra: str = "", api: str | None = None) -> Path:
    return write_package(
        sources,
        "inventory",
        version,
        app=INVENTORY_APP,
        manifest_extra=extra,
        files={"inventory/api.py": api if api is not None else INVENTORY_API.format(version=version)},
    )


def orders(sources: Path, version: str = "1.0", *, extra: str = "", app: str | None = None) -> Path:
    return write_package(
        sources,
        "orders",
        version,
        app=app if app is not None else ORDERS_APP.format(version=version),
        manifest_extra='requires = { inventory = ">=1" }\n' + extra,
    )


async def answer(client: httpx.AsyncClient, path: str = "/orders/") -> dict[str, str]:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    data: dict[str, str] = response.json()
    return data


def bound_to(deployer: Deployer, name: str) -> dict[str, str]:
    [status] = deployer.status(name)
    [active] = [v for v in status.versions if v.state is VersionState.ACTIVE]
    return active.bound_to


async def test_a_dependent_imports_the_active_version_of_what_it_requires(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    assert await answer(client) == {
        "orders": "1.0",
        "inventory": "1.0",
        "lazy": "1.0",
        "own": "models of orders 1.0",
    }
    assert bound_to(deployer, "orders") == {"inventory": "1.0"}
    assert bound_to(deployer, "inventory") == {}


async def test_upgrading_a_requirement_moves_its_dependents_in_the_same_switch(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient, drained: Drained
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    record = await deployer.deploy(inventory(sources, "2.0"))
    assert record.moved == ["orders 1.0"]
    assert any(step.name == "dependent orders 1.0" for step in record.steps)
    assert await answer(client) == {
        "orders": "1.0",
        "inventory": "2.0",
        "lazy": "2.0",
        "own": "models of orders 1.0",
    }
    assert await answer(client, "/inventory/") == {"inventory": "2.0"}
    assert bound_to(deployer, "orders") == {"inventory": "2.0"}
    await drained.wait(2)  # the old orders instance and inventory 1.0
    # The old orders instance may still run inventory 1.0's code: it went first.
    assert testkit.calls.index("shutdown orders 1.0 (inventory 1.0)") < testkit.calls.index(
        "shutdown inventory 1.0"
    )

    back = await deployer.rollback("inventory")
    assert back.moved == ["orders 1.0"]
    assert (await answer(client))["inventory"] == "1.0"
    assert bound_to(deployer, "orders") == {"inventory": "1.0"}


async def test_requests_in_flight_finish_on_the_old_pair(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    held: list[httpx.Response] = []

    async def hold() -> None:
        held.append(await client.get("/orders/hold?key=old"))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(hold)
        await testkit.event("old:entered").wait()
        await deployer.deploy(inventory(sources, "2.0"))
        assert (await answer(client))["inventory"] == "2.0"
        assert "shutdown inventory 1.0" not in testkit.calls
        testkit.event("old").set()
    assert held[0].json() == {
        "orders": "1.0",
        "inventory": "1.0",
        "reserved": "a book reserved by inventory 1.0",
    }


async def test_a_dependent_that_fails_bound_to_the_new_version_aborts_the_operation(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    # 2.0 drops `reserve`, which orders imports: orders cannot load bound to it.
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(inventory(sources, "2.0", api='VERSION = "2.0"\n'))
    error = caught.value.cause
    assert error.step == "dependent orders"
    assert "orders 1.0 requires inventory and moves with it" in error.message
    assert "cannot import name 'reserve'" in error.message
    assert "nothing switched" in error.message
    assert await answer(client) == {
        "orders": "1.0",
        "inventory": "1.0",
        "lazy": "1.0",
        "own": "models of orders 1.0",
    }
    assert await answer(client, "/inventory/") == {"inventory": "1.0"}
    [status] = deployer.status("orders")
    assert [v.state for v in status.versions] == [VersionState.ACTIVE]


async def test_a_package_imports_only_what_it_requires(deployer: Deployer, sources: Path) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    stray = write_package(sources, "stray", "1.0", app="from inventory import api\napp = None\n")
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(stray)
    assert caught.value.cause.step == "load"
    assert "stray 1.0 cannot import 'inventory' of package inventory: it does not require inventory" in str(
        caught.value.cause
    )


async def test_a_dependent_imports_only_what_its_requirement_exports(
    deployer: Deployer, sources: Path
) -> None:
    await deployer.deploy(
        inventory(
            sources, "1.0", extra='exports = ["inventory.api"]\n', api=INVENTORY_API.format(version="1.0")
        )
    )
    nosy = orders(sources, app="from inventory.app import app\n")
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(nosy)
    assert "orders 1.0 imports app from 'inventory.app', which inventory 1.0 does not export" in str(
        caught.value.cause
    )
    assert "(its exports: inventory.api)" in str(caught.value.cause)
    record = await deployer.deploy(orders(sources, "1.1"))  # inventory.api is exported
    assert record.outcome.value == "succeeded"


async def test_a_dependent_that_opts_out_stays_and_may_not_import(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    importing = orders(sources, extra="reload_with_requirements = false\n")
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(importing)
    assert "reload_with_requirements = false" in str(caught.value.cause)

    http_only = write_package(
        sources,
        "orders",
        "1.1",
        manifest_extra='requires = { inventory = ">=1" }\nreload_with_requirements = false\n',
    )
    await deployer.deploy(http_only)
    [before] = deployer.status("orders")
    record = await deployer.deploy(inventory(sources, "2.0"))
    assert record.moved == []
    [after] = deployer.status("orders")
    assert after.versions == before.versions  # the same instance, untouched
    assert (await client.get("/orders/")).json()["version"] == "1.1"


async def test_a_restart_binds_dependents_to_the_restored_versions(tmp_path: Path, sources: Path) -> None:
    home = tmp_path / "restart"
    first = Deployer(home=home, entry_points=False)
    async with first.running():
        await first.deploy(inventory(sources, "1.0"))
        await first.deploy(orders(sources))
        await first.deploy(inventory(sources, "2.0"))
    again = Deployer(home=home, entry_points=False)
    async with again.running():
        assert bound_to(again, "orders") == {"inventory": "2.0"}
        transport = httpx.ASGITransport(app=host_app(again))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await answer(client))["lazy"] == "2.0"


async def test_block_holds_the_dependents_too_until_their_old_instances_are_idle(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    answers: dict[str, dict[str, str]] = {}

    async def get(name: str, path: str) -> None:
        answers[name] = (await client.get(path)).json()

    async with anyio.create_task_group() as tasks, deployer.events.subscribe() as events:
        tasks.start_soon(get, "in flight", "/orders/hold?key=old")
        await testkit.event("old:entered").wait()
        tasks.start_soon(deployer.deploy, inventory(sources, "2.0", extra='strategy = "block"\n'))
        async for event in events:  # the gates go up before the switch step's first await
            if event["type"] == "step.started" and event["step"]["name"] == "switch":
                break
        tasks.start_soon(get, "held", "/orders/")
        await anyio.wait_all_tasks_blocked()
        assert "held" not in answers  # the dependent's mount is gated as well
        testkit.event("old").set()
    assert answers["in flight"]["inventory"] == "1.0"
    assert answers["held"]["inventory"] == "2.0"


# -- sets: several packages deployed as one operation ----------------------------------------------


async def test_a_set_is_prepared_then_switched_at_once_each_bound_to_the_others(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    record = await deployer.deploy_set([orders(sources), inventory(sources, "1.0")])  # any order
    assert record.bundle == ["inventory 1.0", "orders 1.0"]  # prepared in dependency order
    assert record.package == "inventory"
    assert [s.name for s in record.steps if s.name.startswith("prepare o")] == ["prepare orders 1.0"]
    assert (await answer(client))["inventory"] == "1.0"
    again = await deployer.deploy_set(
        [inventory(sources, "2.0"), orders(sources, "2.0"), write_package(sources, "greeter", "1.0")]
    )
    assert again.bundle == ["inventory 2.0", "orders 2.0", "greeter 1.0"]
    assert again.moved == []  # orders is in the set: it is not a dependent that moved
    assert await answer(client) == {
        "orders": "2.0",
        "inventory": "2.0",
        "lazy": "2.0",
        "own": "models of orders 2.0",
    }
    assert bound_to(deployer, "orders") == {"inventory": "2.0"}
    assert (await client.get("/greeter/")).json()["version"] == "1.0"
    assert [p.active_version for p in deployer.status()] == ["1.0", "2.0", "2.0"]


async def test_a_set_with_one_failing_package_switches_nothing(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy_set([inventory(sources, "1.0"), orders(sources)])
    broken = write_package(sources, "orders", "2.0", app="raise RuntimeError('no database')\n")
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy_set([inventory(sources, "2.0"), broken, write_package(sources, "greeter")])
    assert caught.value.cause.package == "orders"
    assert "RuntimeError" in caught.value.cause.message
    assert await answer(client) == {
        "orders": "1.0",
        "inventory": "1.0",
        "lazy": "1.0",
        "own": "models of orders 1.0",
    }
    assert (await client.get("/greeter/")).status_code == 404  # not installed either
    assert [p.name for p in deployer.status()] == ["inventory", "orders"]
    [inv] = deployer.status("inventory")
    assert [v.version for v in inv.versions] == ["1.0"]


async def test_a_set_whose_requirements_do_not_hold_together_is_refused(
    deployer: Deployer, sources: Path
) -> None:
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy_set([orders(sources), write_package(sources, "greeter")])
    assert "orders 1.0 requires inventory>=1, and it is not active" in caught.value.cause.message
    with pytest.raises(
        DeploymentError, match="a set deploys each package once; inventory came more than once"
    ):
        await deployer.deploy_set([inventory(sources, "1.0"), inventory(sources, "2.0")])
    assert deployer.status() == []


async def test_a_set_that_fails_its_bake_switches_every_package_back(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy_set([inventory(sources, "1.0"), orders(sources)])
    vetoes = write_package(
        sources,
        "orders",
        "2.0",
        app=ORDERS_APP.format(version="2.0"),
        manifest_extra='requires = { inventory = ">=1" }\nhooks = "orders.checks"\n',
        files={
            "orders/checks.py": """
            from starlette_hotdeploy import hookimpl


            @hookimpl
            def hotdeploy_check_after_activate(version, previous):
                return "orders 2.0 vetoes itself after activation"
            """
        },
    )
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy_set([inventory(sources, "2.0"), vetoes, write_package(sources, "greeter")])
    assert caught.value.deployment.outcome.value == "rolled_back"
    assert "vetoes itself" in caught.value.cause.message
    assert await answer(client) == {
        "orders": "1.0",
        "inventory": "1.0",
        "lazy": "1.0",
        "own": "models of orders 1.0",
    }
    assert (await client.get("/greeter/")).status_code == 404
    assert {p.name: p.active_version for p in deployer.status()} == {"inventory": "1.0", "orders": "1.0"}
    desired = deployer.cluster()["desired"]  # the store's desired state, switched back too
    assert {name: d["version"] for name, d in desired.items()} == {"inventory": "1.0", "orders": "1.0"}


# -- what must not happen under a dependent --------------------------------------------------------


class HoldInventory:
    """Holds the check of `version` of inventory until the test sets the event `release`."""

    def __init__(self, version: str) -> None:
        self.version = version

    @hookimpl
    async def hotdeploy_check_before_activate(self, version: PackageVersion) -> None:
        if (version.name, version.version) == ("inventory", self.version):
            testkit.event("checking").set()
            await testkit.event("release").wait()


async def test_a_dependent_is_not_deployed_while_what_it_requires_changes(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    deployer.plugins.register(HoldInventory("2.0"))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(deployer.deploy, inventory(sources, "2.0"))
        await testkit.event("checking").wait()
        # Bound to inventory 1.0 now, it would be left on a version about to go away.
        with pytest.raises(DeploymentInProgress, match="another operation on inventory is in progress"):
            await deployer.deploy(orders(sources))
        testkit.event("release").set()
    await deployer.deploy(orders(sources))
    assert (await answer(client))["inventory"] == "2.0"


class VetoAfter:
    """Vetoes the post-activation check of `version` of inventory."""

    def __init__(self, version: str) -> None:
        self.version = version

    @hookimpl
    def hotdeploy_check_after_activate(self, version: PackageVersion) -> str | None:
        if (version.name, version.version) == ("inventory", self.version):
            return f"inventory {self.version} is vetoed"
        return None


async def test_a_failed_warm_rollback_keeps_the_version_an_old_dependent_still_runs(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    held: list[httpx.Response] = []

    async def hold() -> None:
        held.append(await client.get("/orders/hold?key=old"))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(hold)
        await testkit.event("old:entered").wait()  # on the orders instance bound to 1.0
        await deployer.deploy(inventory(sources, "2.0"))
        deployer.plugins.register(VetoAfter("1.0"))
        with pytest.raises(DeploymentError) as caught:
            await deployer.activate("inventory", "1.0")  # warm: 1.0 still drains
        assert caught.value.deployment.outcome.value == "rolled_back"
        assert (await answer(client))["inventory"] == "2.0"
        testkit.event("old").set()  # its lazy import still finds inventory 1.0
    assert held[0].status_code == 200, held[0].text
    assert held[0].json()["reserved"] == "a book reserved by inventory 1.0"


async def test_import_of_a_submodule_would_expose_what_is_not_exported(
    deployer: Deployer, sources: Path
) -> None:
    await deployer.deploy(inventory(sources, "1.0", extra='exports = ["inventory.api"]\n'))
    sly = orders(sources, app="import inventory.api\n\napp = inventory.app.app\n")
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy(sly)
    assert "write `from inventory import api`" in caught.value.cause.message
    assert "`import inventory.api` would give it all of inventory" in caught.value.cause.message


# -- a canary of a package moves its dependents with it --------------------------------------------


async def test_a_canary_user_gets_the_dependents_bound_to_the_canary(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    record = await deployer.deploy(
        inventory(sources, "2.0", extra="[canary]\nkey = 'header:x-user'\n"), canary="50%"
    )
    assert record.outcome.value == "pending"
    assert record.moved == ["orders 1.0"]  # an instance of it, bound to the canary, follows it
    [status] = deployer.status("orders")
    assert status.canary is not None
    assert status.canary["follows"] == "inventory 2.0"
    mismatched, seen = [], set()
    for n in range(200):
        user = {"x-user": f"user-{n}"}
        inv = (await client.get("/inventory/", headers=user)).json()["inventory"]
        orders_answer = (await client.get("/orders/", headers=user)).json()
        assert orders_answer["inventory"] == orders_answer["lazy"]
        seen.add(inv)
        if orders_answer["inventory"] != inv:
            mismatched.append(n)
    assert seen == {"1.0", "2.0"}
    assert mismatched == []  # every user sees one inventory version, directly or through orders
    # A pin names the leader's versions, on the dependent's mount too.
    pinned = (await client.get("/orders/", headers={"hotdeploy-version": "2.0"})).json()
    assert pinned["inventory"] == "2.0"
    stable = (await client.get("/orders/", headers={"hotdeploy-version": "1.0"})).json()
    assert stable["inventory"] == "1.0"
    with pytest.raises(
        DeploymentInProgress, match=r"orders follows the canary of inventory \(it imports it\)"
    ):
        await deployer.deploy(orders(sources, "1.1"))

    await deployer.promote_canary("inventory", all_steps=True)
    with anyio.fail_after(10):
        async with deployer.events.subscribe() as events:
            while not record.decided:
                await events.receive()
    assert record.outcome.value == "succeeded"
    assert "orders 1.0" in record.moved
    for n in range(20):
        assert (await answer(client, "/orders/"))["inventory"] == "2.0", n
    assert bound_to(deployer, "orders") == {"inventory": "2.0"}
    [status] = deployer.status("orders")
    assert status.canary is None


async def test_an_aborted_canary_takes_its_followers_with_it(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient, drained: Drained
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    record = await deployer.deploy(inventory(sources, "2.0"), canary="50%")
    await deployer.abort_canary("inventory")
    await drained.wait(2)  # the canary and the orders instance bound to it
    assert record.outcome.value == "aborted"
    for n in range(20):
        assert (await client.get("/orders/", headers={"cookie": f"hotdeploy_canary={n}"})).json()[
            "inventory"
        ] == "1.0"
    [status] = deployer.status("orders")
    assert status.canary is None
    assert [v.state for v in status.versions] == [VersionState.ACTIVE]
    await deployer.deploy(orders(sources, "1.1"))  # no longer follows anything


# -- sets: what a review found -----------------------------------------------------------------------


async def test_a_set_whose_mounts_overlap_is_refused_before_anything_starts(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    alpha = write_package(sources, "alpha", mount="/shop")
    beta = write_package(sources, "beta", mount="/shop/beta")
    with pytest.raises(DeploymentError) as caught:
        await deployer.deploy_set([alpha, beta])
    assert "mount '/shop/beta' overlaps '/shop' of package 'alpha'" in caught.value.cause.message
    assert (await client.get("/shop/")).status_code == 404
    assert deployer.status() == []


async def test_a_set_refused_at_a_claim_is_recorded_failed_and_leaves_no_upload(
    deployer: Deployer, sources: Path
) -> None:
    await deployer.deploy_set([inventory(sources, "1.0"), orders(sources)])
    deployer.plugins.register(HoldInventory("2.0"))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(deployer.deploy, inventory(sources, "2.0"))
        await testkit.event("checking").wait()
        with pytest.raises(DeploymentInProgress) as caught:
            await deployer.deploy_set([orders(sources, "2.0"), write_package(sources, "greeter")])
        testkit.event("release").set()
    refused = caught.value.deployment
    assert refused is not None
    [stored] = [r for r in deployer.deployments() if r.id == refused.id]
    assert stored.outcome.value == "failed"
    assert {p.name: sorted(p.available_versions) for p in deployer.status()} == {
        "inventory": ["1.0", "2.0"],
        "orders": ["1.0"],  # orders 2.0 and greeter 1.0 were forgotten
    }


async def test_a_failed_set_restores_each_lineage_as_it_was(deployer: Deployer, sources: Path) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(inventory(sources, "2.0"))
    await deployer.deploy(orders(sources))
    deployer.plugins.register(VetoAfter("1.0"))
    with pytest.raises(DeploymentError):  # 1.0 again (it is in the lineage already): vetoed
        await deployer.deploy_set([inventory(sources, "1.0"), orders(sources, "1.1")])
    [status] = deployer.status("inventory")
    assert (status.active_version, status.previous_version) == ("2.0", "1.0")


CHECK_ON_THE_SECOND_WORKER = """
import testkit
from starlette_hotdeploy import hookimpl


@hookimpl
def hotdeploy_check_after_activate(version, previous):
    testkit.calls.append(f"checked {version.name} {version.version}")
    if testkit.calls.count(f"checked {version.name} {version.version}") == 2:
        return f"{version.name} {version.version} fails on the second worker"
"""


async def test_every_worker_checks_every_package_of_a_set_after_the_switch(
    tmp_path: Path, sources: Path
) -> None:
    home = tmp_path / "home"
    first, second = (Deployer(home=home, entry_points=False) for _ in range(2))
    async with first.running(), second.running():
        await first.deploy_set([inventory(sources, "1.0"), orders(sources)])
        checked = write_package(
            sources,
            "orders",
            "2.0",
            app=ORDERS_APP.format(version="2.0"),
            manifest_extra='requires = { inventory = ">=1" }\nhooks = "orders.checks"\n',
            files={"orders/checks.py": CHECK_ON_THE_SECOND_WORKER},
        )
        with pytest.raises(DeploymentError) as caught:
            await first.deploy_set([inventory(sources, "2.0"), checked])
        assert caught.value.deployment.outcome.value == "rolled_back"
        assert "orders 2.0 fails on the second worker" in caught.value.cause.message
        assert testkit.calls.count("checked orders 2.0") == 2  # on both workers


# -- canaries and dependents: what a review found ---------------------------------------------------

BILLING_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from inventory.api import VERSION as INVENTORY
from orders.app import INVENTORY as ORDERS_INVENTORY


async def index(request):
    return JSONResponse({"inventory": INVENTORY, "orders_inventory": ORDERS_INVENTORY})


app = Starlette(routes=[Route("/", index)])
"""


def billing(sources: Path) -> Path:
    return write_package(
        sources,
        "billing",
        app=BILLING_APP,
        manifest_extra='requires = { inventory = ">=1", orders = ">=1" }\n',
    )


async def test_a_dependent_of_two_moving_packages_is_bound_to_both_new_instances(
    deployer: Deployer, sources: Path, client: httpx.AsyncClient
) -> None:
    await deployer.deploy(inventory(sources, "1.0"))
    await deployer.deploy(orders(sources))
    await deployer.deploy(billing(sources))  # "billing" sorts before "orders", which it requires
    record = await deployer.deploy(inventory(sources, "2.0"))
    assert record.moved == ["orders 1.0", "billing 1.0"]  # each after what it requires
    assert (await client.get("/billing/")).json() == {"inventory": "2.0", "orders_inventory": "2.0"}


def follows(deployer: Deployer, name: str) -> str | None:
    canary = deployer.status(name)[0].canary
    return canary.get("follows") if canary is not None else None


async def test_on_every_worker_a_following_dependent_is_left_alone_and_a_late_worker_follows_too(
    tmp_path: Path, sources: Path
) -> None:
    home = tmp_path / "home"
    first, second = (Deployer(home=home, entry_points=False) for _ in range(2))
    async with first.running(), second.running():
        await first.deploy(inventory(sources, "1.0"))
        await first.deploy(orders(sources))
        await first.deploy(inventory(sources, "2.0"), canary="50%")  # once every worker splits
        assert follows(second, "orders") == "inventory 2.0"
        # On the worker that does not run the canary, orders may not move either.
        with pytest.raises(DeploymentInProgress, match=r"orders follows the canary of inventory"):
            await second.deploy(orders(sources, "1.1"))
        late = Deployer(home=home, entry_points=False)
        async with late.running():  # restores inventory (with its canary), then orders
            assert follows(late, "orders") == "inventory 2.0"
        await first.abort_canary("inventory")


class FailingPromotion(SQLiteStore):
    """The SQLite store, failing a promotion (an ACTIVATE) at its commit."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.fail_commit = False

    def commit(self, operation: Operation, canary: dict[str, Any] | None = None) -> int:
        if self.fail_commit and operation.kind is OperationKind.ACTIVATE:
            raise StoreError("the store failed: connection refused (the test's outage)")
        return super().commit(operation, canary)


async def promote_and_wait(deployer: Deployer, record: Deployment) -> None:
    """Promote, and wait until the failed promotion has ended the canary. That last act of its
    run publishes no event (the record is finished by then): look again, bounded."""
    await deployer.promote_canary("inventory", all_steps=True)
    for _ in range(500):
        if "ended" in record.canary:
            return
        await anyio.sleep(0.02)
    raise AssertionError(f"the canary did not end: {record.to_dict()}")


@asynccontextmanager
async def failing_promotion(
    tmp_path: Path,
) -> AsyncIterator[tuple[Deployer, FailingPromotion, httpx.AsyncClient]]:
    """A deployer on a FailingPromotion store that waits for a silent worker's vote 1 s, not 60."""
    home = tmp_path / "home"
    home.mkdir()
    store = FailingPromotion(home)
    deployer = Deployer(home=home, store=store, entry_points=False, cluster_timeout=1.0)
    async with deployer.running():
        transport = httpx.ASGITransport(app=host_app(deployer))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield deployer, store, client


async def test_a_promotion_that_fails_lets_the_followers_finish_their_requests(
    tmp_path: Path, sources: Path
) -> None:
    async with failing_promotion(tmp_path) as (deployer, store, client):
        await deployer.deploy(inventory(sources, "1.0"))
        await deployer.deploy(orders(sources))
        record = await deployer.deploy(inventory(sources, "2.0"), canary="50%")
        held: list[httpx.Response] = []

        async def hold() -> None:  # a canary user, on the orders instance bound to 2.0
            held.append(await client.get("/orders/hold?key=canary", headers={"hotdeploy-version": "2.0"}))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold)
            await testkit.event("canary:entered").wait()
            # A worker of another host that never prepares it: the promotion fails before its
            # commit, when the votes are awaited.
            await anyio.to_thread.run_sync(store.heartbeat, "elsewhere:1:silent", {})
            await promote_and_wait(deployer, record)
            await anyio.to_thread.run_sync(store.remove_worker, "elsewhere:1:silent")
            assert record.outcome.value == "failed"
            testkit.event("canary").set()
        assert held[0].status_code == 200, held[0].text
        assert held[0].json()["inventory"] == "2.0"
        assert (await answer(client))["inventory"] == "1.0"  # the canary ended with it
        assert store.desired()["inventory"].canary is None


async def test_a_promotion_whose_commit_fails_ends_the_canary_in_the_store_too(
    tmp_path: Path, sources: Path
) -> None:
    async with running_on(tmp_path, FailingPromotion) as (deployer, store, _client):
        await deployer.deploy(inventory(sources, "1.0"))
        await deployer.deploy(orders(sources))
        record = await deployer.deploy(inventory(sources, "2.0"), canary="50%")
        store.fail_commit = True
        await promote_and_wait(deployer, record)
        store.fail_commit = False
        assert record.outcome.value == "failed"
        assert store.desired()["inventory"].canary is None  # no worker splits for it any more
        assert deployer.status("inventory")[0].canary is None
        assert deployer.status("orders")[0].canary is None
        await deployer.deploy(orders(sources, "1.1"))  # nothing follows a canary any more
