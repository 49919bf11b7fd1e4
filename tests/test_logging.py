"""What the server's log says: a line when a deployment starts and one when its outcome is
decided (ERROR with the cause when it failed), with the key fields on the record for structured
handlers; restores from the store are logged too."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import httpx
import pytest

from packages import write_package
from starlette_hotdeploy import Deployer, DeploymentError

pytestmark = pytest.mark.anyio

DEPLOYMENTS = "starlette_hotdeploy.deployments"


def lines(caplog: pytest.LogCaptureFixture, logger: str = DEPLOYMENTS) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == logger]


async def test_a_deploy_a_failed_deploy_and_a_rollback_are_logged(
    deployer: Deployer, sources: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="starlette_hotdeploy")
    await deployer.deploy(write_package(sources, version="1.0"))
    first = await deployer.deploy(write_package(sources, version="2.0"))
    with pytest.raises(DeploymentError):
        await deployer.deploy(write_package(sources, version="3.0", app="raise RuntimeError('no db')\n"))
    async with deployer.events.subscribe() as events:
        back = await deployer.rollback("greeter")
        with anyio.fail_after(30):  # until 2.0 has drained and the rollback finished
            async for event in events:
                if event["type"] == "deployment.finished" and event["deployment"]["id"] == back.id:
                    break

    said = [(r.levelname, r.getMessage()) for r in lines(caplog) if r.levelno >= logging.INFO]
    worker = first.worker
    assert ("INFO", f"deploy (deployment {first.id}, worker {worker}) started") in said
    assert (
        "INFO",
        f"deploy greeter 1.0 -> 2.0 (deployment {first.id}, worker {worker}) succeeded in {first.duration_ms:g} ms",
    ) in said
    [failure] = [r for r in lines(caplog) if r.levelno == logging.ERROR]
    assert failure.getMessage().startswith("deploy greeter 2.0 -> 3.0 (deployment ")
    assert " failed in " in failure.getMessage()
    assert failure.getMessage().endswith("raised RuntimeError (app.py:1): no db [load]")
    assert (failure.package, failure.to_version, failure.outcome, failure.error_step) == (  # type: ignore[attr-defined]
        "greeter",
        "3.0",
        "failed",
        "load",
    )
    rollback = [r for r in lines(caplog) if getattr(r, "deployment_id", None) == back.id]
    assert [r.getMessage().split(" (")[0] for r in rollback if r.levelno >= logging.INFO] == [
        "rollback greeter -> 1.0",  # started: what it replaces is known once it has the claim
        "rollback greeter 2.0 -> 1.0",
    ]
    assert rollback[-1].outcome == "succeeded"  # type: ignore[attr-defined]
    # Every deployment that replaced a version also says when that one had drained (DEBUG).
    assert any(r.getMessage().endswith(" ms") and "finished after" in r.getMessage() for r in rollback)


async def test_a_restart_logs_each_restored_package(
    tmp_path: Path, sources: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    async with Deployer(home=home, entry_points=False).running() as deployer:
        await deployer.deploy(write_package(sources, version="1.0"))
    caplog.set_level(logging.INFO, logger="starlette_hotdeploy")
    async with Deployer(home=home, entry_points=False).running():
        pass
    [restored] = [r for r in caplog.records if r.getMessage() == "greeter 1.0 restored from the store"]
    assert (restored.levelname, restored.package, restored.version) == ("INFO", "greeter", "1.0")  # type: ignore[attr-defined]


LOGGING_APP = """
import logging
from logging import getLogger

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

log = logging.getLogger(__name__)
other = getLogger("greeter.audit")
library = logging.getLogger("some_library")


async def index(request):
    log.info("hello from {version}")
    other.warning("audited {version}")
    library.info("a library's line")
    return PlainTextResponse("{version}")


app = Starlette(routes=[Route("/", index)])
"""


async def test_a_package_logs_under_its_own_stable_names_with_its_version(
    deployer: Deployer, client: httpx.AsyncClient, sources: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`logging.getLogger(__name__)` in greeter/app.py is `greeter.app` in every version (not
    the private namespace's name), under the shared `greeter` logger that a config sets up."""
    caplog.set_level(logging.INFO)
    seen: list[tuple[str, str, str]] = []
    for version in ("1.0", "2.0"):
        await deployer.deploy(
            write_package(sources, version=version, app=LOGGING_APP.format(version=version))
        )
        caplog.clear()
        assert (await client.get("/greeter/")).text == version
        seen += [
            (r.name, r.getMessage(), getattr(r, "hotdeploy_version", "-"))
            for r in caplog.records
            if r.name.startswith(("greeter", "some_library", "_hotdeploy"))
        ]
    assert seen == [
        ("greeter.app", "hello from 1.0", "1.0"),
        ("greeter.audit", "audited 1.0", "1.0"),
        ("some_library", "a library's line", "-"),
        ("greeter.app", "hello from 2.0", "2.0"),
        ("greeter.audit", "audited 2.0", "2.0"),
        ("some_library", "a library's line", "-"),
    ]
    # A level set for the package's own name applies to every version.
    logging.getLogger("greeter").setLevel(logging.WARNING)
    try:
        caplog.clear()
        await client.get("/greeter/")
        assert [r.getMessage() for r in caplog.records if r.name.startswith("greeter")] == ["audited 2.0"]
    finally:
        logging.getLogger("greeter").setLevel(logging.NOTSET)
