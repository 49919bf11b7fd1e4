"""Canary deploys in one process: the sticky share, pinning, steps, analysis, promote and abort.

Requests go straight into the host app's ASGI callable (no client library in between): the share
tests send tens of thousands, and what they check is the dispatch, not a transport.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from conftest import host_app, running_on
from packages import write_package, zip_directory
from starlette_hotdeploy import (
    CanaryRefused,
    Deployer,
    DeploymentError,
    DeploymentInProgress,
    HotDeployMiddleware,
    ManifestError,
    hookimpl,
)
from starlette_hotdeploy._canary_plan import parse_steps
from starlette_hotdeploy._errors import CanaryError
from starlette_hotdeploy._sqlite_store import SQLiteStore
from starlette_hotdeploy._store import STALE_UPLOAD_AFTER, StoredArchive
from starlette_hotdeploy._types import Message

pytestmark = pytest.mark.anyio

# Answers its version; the canary build answers 500 to every tenth request when FAIL_EVERY is set.
APP = """
import itertools

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

VERSION = "{version}"
FAIL_EVERY = {fail_every}
COUNT = itertools.count(1)


async def index(request):
    if FAIL_EVERY and next(COUNT) % FAIL_EVERY == 0:
        return JSONResponse({{"version": VERSION, "error": "boom"}}, status_code=500)
    return JSONResponse({{"version": VERSION}})


app = Starlette(routes=[Route("/", index)])
"""


def package(sources: Path, version: str, *, fail_every: int = 0, manifest: str = "") -> Path:
    return write_package(
        sources,
        "shop",
        version,
        app=APP.format(version=version, fail_every=fail_every),
        manifest_extra=manifest,
    )


async def call(
    app: Starlette, headers: dict[str, str] | None = None, path: str = "/shop/"
) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    """One HTTP request through the ASGI app: status, JSON body, response headers."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), list(start.get("headers", []))


async def served_by(app: Starlette, key: str) -> str:
    status, body, _ = await call(app, {"x-user": key})
    assert status == 200, body
    return str(body["version"])


async def canary_of(deployer: Deployer, sources: Path, steps: str, **manifest: Any) -> Any:
    await deployer.deploy(package(sources, "1.0"))
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in manifest.items())
    return await deployer.deploy(
        package(sources, "1.1", manifest=f"[canary]\nkey = 'header:x-user'\n{table}"), canary=steps
    )


async def until_decided(
    app: Starlette, record: Any, *, headers: dict[str, str] | None = None, limit: int = 20_000
) -> list[tuple[int, str]]:
    """Send requests until the deployment is decided (at most `limit`): what each one got."""
    seen: list[tuple[int, str]] = []
    for n in range(limit):
        if record.decided:
            return seen
        status, body, _ = await call(app, headers or {"x-user": f"user-{n}"})
        seen.append((status, str(body["version"])))
        if n % 50 == 0:
            await anyio.sleep(0.01)  # let the run's once-a-second analysis come round
    raise AssertionError(f"not decided after {limit} requests: {record.to_dict()}")


# -- the plan ---------------------------------------------------------------------------------


def test_steps_parse_into_growing_weights_ending_at_full() -> None:
    steps = parse_steps("5%:30s, 25% 1m, 50%")
    assert [(s.weight, s.pause) for s in steps] == [(500, 30.0), (2500, 60.0), (5000, None), (10000, None)]
    assert [s.weight for s in parse_steps(["0%", "10%:500ms", "100%"])] == [0, 1000, 10000]


@pytest.mark.parametrize(
    ("text", "says"),
    [("25%, 5%", "must grow"), ("150%", "between 0% and 100%"), ("five", "is not a step"), ("", "no steps")],
)
def test_bad_steps_are_refused_with_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(CanaryError, match=says):
        parse_steps(text)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("strategy = 'block'\n[canary]\nsteps = '10%:1m'\n", "exclude each other"),
        ("[canary]\nsteps = '10%:1m'\nkey = 'header:'\n", "canary.key"),
        ("[canary]\nmax_error_rate = 2\n", "canary.max_error_rate"),
        ("[canary]\nwhatever = 1\n", "canary.whatever: unknown key"),
    ],
)
async def test_a_bad_canary_table_is_refused_naming_its_key(
    deployer: Deployer, sources: Path, extra: str, says: str
) -> None:
    with pytest.raises(DeploymentError, match=says) as caught:
        await deployer.deploy(package(sources, "1.0", manifest=extra))
    assert isinstance(caught.value.cause, ManifestError)


async def test_a_first_deploy_and_a_block_strategy_cannot_be_canaries(
    deployer: Deployer, sources: Path
) -> None:
    with pytest.raises(DeploymentError, match="no active version to compare") as caught:
        await deployer.deploy(package(sources, "1.0"), canary="10%:1m")
    assert isinstance(caught.value.cause, CanaryRefused)
    await deployer.deploy(package(sources, "1.0"))
    with pytest.raises(DeploymentError, match="exclude each other"):
        await deployer.deploy(package(sources, "1.1", manifest="strategy = 'block'\n"), canary=True)
    assert deployer.status()[0].active_version == "1.0"
    assert deployer.status()[0].canary is None


# -- the share ------------------------------------------------------------------------------


async def test_the_share_follows_the_weight_and_no_user_ever_moves_back(
    deployer: Deployer, sources: Path
) -> None:
    app = host_app(deployer)
    record = await canary_of(deployer, sources, "5%, 25%, 50%")
    assert record.outcome == "pending"
    keys = [f"{random.getrandbits(64):016x}" for _ in range(10_000)]
    on_canary: set[str] = set()
    for weight in (5, 25, 50):
        assert (canary_state(deployer) or {})["weight_percent"] == weight
        chosen = {key: await served_by(app, key) for key in keys}
        now = {key for key, version in chosen.items() if version == "1.1"}
        share = len(now) / len(keys) * 100
        assert abs(share - weight) <= 1.5, (weight, share)
        assert on_canary <= now  # raising the weight never sends a canary user back
        on_canary = now
        # The same key, asked again, gets the same version.
        again = {key: await served_by(app, key) for key in keys[:500]}
        assert all(again[key] == chosen[key] for key in again)
        if weight != 50:
            await deployer.promote_canary("shop")
            await wait_for_weight(deployer, weight)
    await deployer.abort_canary("shop")


def canary_state(deployer: Deployer) -> dict[str, Any] | None:
    found = deployer.status()[0].canary
    return dict(found) if found is not None else None


async def until(deployer: Deployer, holds: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until `holds()`, looking again after each of the deployer's events (a record's
    step, outcome or end: a canary's every move saves its record)."""
    with anyio.fail_after(timeout):
        async with deployer.events.subscribe() as events:
            while not holds():
                await events.receive()


async def wait_for_weight(deployer: Deployer, old: float) -> None:
    await until(deployer, lambda: (canary_state(deployer) or {}).get("weight_percent") != old)


async def test_without_a_key_the_middleware_sets_a_cookie_that_keeps_the_user(
    deployer: Deployer, sources: Path
) -> None:
    await deployer.deploy(package(sources, "1.0"))
    await deployer.deploy(package(sources, "1.1"), canary="50%")
    app = host_app(deployer)
    versions = set()
    for _ in range(40):
        _status, body, headers = await call(app)
        cookie = next(v.decode() for k, v in headers if k == b"set-cookie")
        assert cookie.startswith("hotdeploy_canary=")
        assert "Path=/" in cookie
        assert "HttpOnly" in cookie
        value = cookie.split(";")[0]
        again = {(await call(app, {"cookie": value}))[1]["version"] for _ in range(5)}
        assert again == {body["version"]}  # kept on its side
        assert all(k != b"set-cookie" for k, _ in (await call(app, {"cookie": value}))[2])
        versions.add(body["version"])
    assert versions == {"1.0", "1.1"}
    await deployer.abort_canary("shop")


# -- pinning --------------------------------------------------------------------------------


async def test_a_request_can_be_pinned_to_a_loaded_version_only(deployer: Deployer, sources: Path) -> None:
    app = host_app(deployer)
    await canary_of(deployer, sources, "0%")  # a preview: no user gets it unpinned
    assert {await served_by(app, f"u{n}") for n in range(300)} == {"1.0"}
    assert (await call(app, {"hotdeploy-version": "1.1"}))[1]["version"] == "1.1"
    assert (await call(app, {"hotdeploy-version": "1.0"}))[1]["version"] == "1.0"
    assert (await call(app, {"cookie": "hotdeploy_version_shop=1.1"}))[1]["version"] == "1.1"
    status, body, _ = await call(app, {"hotdeploy-version": "9.9"})
    assert status == 409
    assert "shop 9.9 is not loaded" in body["detail"]
    assert "1.1 (canary)" in body["detail"]
    await deployer.abort_canary("shop")


async def test_with_a_pin_secret_only_requests_that_carry_it_are_pinned(
    tmp_path: Path, sources: Path
) -> None:
    deployer = Deployer(home=tmp_path / "home", entry_points=False, pin_secret="s3cret")
    async with deployer.running():
        app = host_app(deployer)
        await canary_of(deployer, sources, "0%")
        status, body, _ = await call(app, {"hotdeploy-version": "1.1"})
        assert status == 403
        assert "needs the pin secret" in body["detail"]
        assert (await call(app, {"hotdeploy-version": "1.1", "hotdeploy-pin-secret": "wrong"}))[0] == 403
        good = {"hotdeploy-version": "1.1", "hotdeploy-pin-secret": "s3cret"}
        assert (await call(app, good))[1]["version"] == "1.1"
        await deployer.abort_canary("shop")


# -- steps, analysis, promote, abort -------------------------------------------------------------


async def test_a_canary_that_fails_a_tenth_of_its_requests_is_aborted_by_the_analysis(
    deployer: Deployer, sources: Path
) -> None:
    app = host_app(deployer)
    await deployer.deploy(package(sources, "1.0"))
    record = await deployer.deploy(
        package(
            sources, "1.1", fail_every=10, manifest="[canary]\nkey = 'header:x-user'\nmin_requests = 30\n"
        ),
        canary="30%:30s, 100%",
    )
    seen = await until_decided(app, record)
    assert record.outcome == "aborted"
    assert "analysis failed: 5xx share" in (record.error or "")
    stable = [status for status, version in seen if version == "1.0"]
    assert stable
    assert set(stable) == {200}
    [analysis] = record.canary["analyses"]
    assert analysis["verdict"] == "fail"
    assert analysis["figures"]["canary"]["requests"] >= 30
    assert analysis["figures"]["canary"]["error_rate"] > 0.05
    assert analysis["figures"]["stable"]["errors"] == 0
    # The canary is gone; the stable version serves everyone.
    await until(deployer, lambda: record.finished_at is not None)
    assert [v.version for v in deployer.package("shop").loaded] == ["1.0"]
    assert {await served_by(app, f"u{n}") for n in range(100)} == {"1.0"}
    assert deployer.status()[0].canary is None


async def test_a_healthy_canary_is_promoted_through_every_step(deployer: Deployer, sources: Path) -> None:
    app = host_app(deployer)
    await deployer.deploy(package(sources, "1.0"))
    record = await deployer.deploy(
        package(sources, "1.1", manifest="[canary]\nkey = 'header:x-user'\nmin_requests = 10\n"),
        canary="20%:0.2s, 60%:0.2s, 100%",
    )
    seen = await until_decided(app, record)
    assert record.outcome == "succeeded", record.to_dict()
    assert {status for status, _ in seen} == {200}
    assert [a["verdict"] for a in record.canary["analyses"]] == ["pass", "pass"]
    steps = [step.name for step in record.steps]
    assert (
        steps.index("canary 20%:0.2s")
        < steps.index("canary 60%:0.2s")
        < steps.index("promote")
        < steps.index("switch")
    )
    assert deployer.status()[0].active_version == "1.1"
    assert {await served_by(app, f"u{n}") for n in range(100)} == {"1.1"}


async def test_promote_all_and_abort_by_hand_and_one_canary_at_a_time(
    deployer: Deployer, sources: Path
) -> None:
    record = await canary_of(deployer, sources, "5%, 50%")
    with pytest.raises(DeploymentInProgress, match=r"a canary of shop 1\.1 is running"):
        await deployer.deploy(package(sources, "1.2"))
    with pytest.raises(DeploymentInProgress, match="promote or abort it first"):
        await deployer.activate("shop", "1.0")
    state = await deployer.promote_canary("shop", all_steps=True)
    assert state["requested"] == "promote_all"
    await until(deployer, lambda: record.decided)
    assert record.outcome == "succeeded"
    assert deployer.status()[0].active_version == "1.1"
    with pytest.raises(CanaryRefused, match="no canary of shop is running"):
        await deployer.abort_canary("shop")

    second = await deployer.deploy(package(sources, "1.2"), canary="10%")
    await deployer.abort_canary("shop")
    await until(deployer, lambda: second.finished_at is not None)
    assert second.outcome == "aborted"
    assert "aborted by the admin API" in (second.error or "")
    assert deployer.status()[0].active_version == "1.1"


class PruneGate(SQLiteStore):
    """The SQLite store, with a gate the test closes on `prune` (a worker thread): the last
    store write of a promotion, after its record is decided."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.closed = False
        self.reached, self.opened = threading.Event(), threading.Event()

    def prune(
        self, name: str, keep: int, protect: set[tuple[str, str]], *, stale_after: float = STALE_UPLOAD_AFTER
    ) -> list[StoredArchive]:
        if self.closed:
            self.closed = False
            self.reached.set()
            if not self.opened.wait(timeout=30):  # a guard against a hang, not a wait
                raise TimeoutError("the test never opened the gate")
        return super().prune(name, keep, protect, stale_after=stale_after)


async def test_a_deploy_right_after_a_promotion_is_decided_waits_for_its_run_to_end(
    tmp_path: Path, sources: Path
) -> None:
    # A client that deploys as soon as the canary's record says `succeeded` was refused ("a
    # canary of shop 1.1 is running") while the run still pruned and let go of the package.
    async with running_on(tmp_path, PruneGate) as (deployer, store, _):
        record = await canary_of(deployer, sources, "5%, 50%")
        store.closed = True
        await deployer.promote_canary("shop", all_steps=True)
        with anyio.fail_after(10):  # a guard against a hang, not a wait
            await anyio.to_thread.run_sync(store.reached.wait)  # decided, still pruning
            assert record.outcome == "succeeded"
            deployed: list[Any] = []

            async def deploy() -> None:
                deployed.append(await deployer.deploy(package(sources, "1.2")))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(deploy)
                await anyio.wait_all_tasks_blocked()
                assert deployed == []  # waiting for the run, not refused
                store.opened.set()
        assert deployed[0].outcome == "succeeded"
        assert deployer.status()[0].active_version == "1.2"


class FailingAnalysis:
    @hookimpl
    def hotdeploy_analyze_canary(self, package: str, stable: Any, canary: Any, step: Any) -> Any:
        return (
            f"{package}: {canary.requests} canary requests are not enough for me"
            if canary.requests > 5
            else None
        )


async def test_a_plugin_analysis_can_fail_a_canary(deployer: Deployer, sources: Path) -> None:
    deployer.plugins.register(FailingAnalysis())
    app = host_app(deployer)
    await deployer.deploy(package(sources, "1.0"))
    record = await deployer.deploy(
        package(sources, "1.1", manifest="[canary]\nkey = 'header:x-user'\nmin_requests = 5\n"),
        canary="50%:30s",
    )
    await until_decided(app, record)
    assert record.outcome == "aborted"
    assert "FailingAnalysis.hotdeploy_analyze_canary: shop:" in (record.error or "")


async def test_the_admin_api_deploys_promotes_and_aborts_canaries(deployer: Deployer, sources: Path) -> None:
    app = Starlette()
    app.add_middleware(HotDeployMiddleware, deployer=deployer, admin_token="t")
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": "Bearer t", "content-type": "application/zip"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as admin:
        await deployer.deploy(package(sources, "1.0"))
        bad = await admin.post("/_hotdeploy/packages?canary=lots", content=zipped(sources, "1.1"))
        assert bad.status_code == 400
        assert "'lots' is not a step" in bad.json()["detail"]
        response = await admin.post("/_hotdeploy/packages?canary=10%25,50%25", content=zipped(sources, "1.1"))
        assert response.status_code == 202, response.text
        assert response.json()["outcome"] == "pending"
        assert response.json()["canary"]["plan"] == "10% (until promoted), 50% (until promoted), 100%"
        shown = (await admin.get("/_hotdeploy/packages/shop")).json()["canary"]
        assert (shown["version"], shown["weight_percent"], shown["step"]) == ("1.1", 10.0, 1)
        promoted = await admin.post("/_hotdeploy/packages/shop/canary/promote")
        assert promoted.status_code == 202
        assert promoted.json()["requested"] == "promote"
        await until(deployer, lambda: (canary_state(deployer) or {}).get("weight_percent") == 50)
        assert (await admin.get("/_hotdeploy/packages/shop")).json()["canary"]["weight_percent"] == 50
        aborted = await admin.post("/_hotdeploy/packages/shop/canary/abort")
        assert aborted.status_code == 202
        await until(deployer, lambda: canary_state(deployer) is None)
        assert (await admin.get("/_hotdeploy/packages/shop")).json()["canary"] is None
        again = await admin.post("/_hotdeploy/packages/shop/canary/abort")
        assert again.status_code == 409
        assert again.json()["title"] == "canary refused"
        record = (await admin.get(response.headers["location"])).json()
        assert record["outcome"] == "aborted"


def zipped(sources: Path, version: str) -> bytes:
    return zip_directory(package(sources, version), sources / f"shop-{version}.zip").read_bytes()
