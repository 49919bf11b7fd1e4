"""The pytest plugin for package authors (starlette_hotdeploy.testing): its fixture serves packages
from a real uvicorn, and its upgrade helper passes a clean upgrade and fails one that drops
requests. These tests use the fixture as a user's tests would (the plugin is loaded by its
`pytest11` entry point, not imported here)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from packages import write_package
from starlette_hotdeploy import AdminProblem
from starlette_hotdeploy.testing import HotDeployServer, UpgradeFailed

FAILING_ROOT = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def index(request):
    return PlainTextResponse("broken", status_code=500)

app = Starlette(routes=[Route("/", index)])
"""


PLAIN_ROOT = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def index(request):
    return JSONResponse({"version": "1.0"})

app = Starlette(routes=[Route("/", index)])
"""


def test_a_deployed_package_answers_through_the_real_server(
    hotdeploy_server: HotDeployServer, tmp_path: Path
) -> None:
    record = hotdeploy_server.deploy(write_package(tmp_path / "sources", "greeter", "1.0"))
    assert (record["package"], record["to_version"], record["outcome"]) == ("greeter", "1.0", "succeeded")
    assert hotdeploy_server.url.startswith("http://127.0.0.1:")
    with hotdeploy_server.client("greeter") as client:
        answer = client.get("/").json()
    assert (answer["version"], answer["root_path"]) == ("1.0", "/greeter")


def test_an_upgrade_under_traffic_reports_both_versions_and_no_failure(
    hotdeploy_server: HotDeployServer, tmp_path: Path
) -> None:
    sources = tmp_path / "sources"
    report = hotdeploy_server.upgrade(
        write_package(sources, "greeter", "1.0"), write_package(sources, "greeter", "2.0"), path="/"
    )
    assert report.failed == 0
    assert report.versions_seen == {"1.0", "2.0"}
    assert report.requests >= 4 * 21  # each client: its first request and 20 after the answer
    assert report.deployment["to_version"] == "2.0"


def test_an_upgrade_whose_new_version_fails_requests_fails_the_test(
    hotdeploy_server: HotDeployServer, tmp_path: Path
) -> None:
    sources = tmp_path / "sources"
    with pytest.raises(UpgradeFailed) as failed:
        hotdeploy_server.upgrade(
            write_package(sources, "greeter", "1.0"),
            write_package(sources, "greeter", "2.0", app=FAILING_ROOT),
        )
    report = failed.value.report
    assert report.failed >= 4 * 20
    assert report.statuses[500] == report.failed
    assert "requests to / failed during the upgrade" in str(failed.value)
    assert "500: broken" in str(failed.value)


def test_a_refused_deploy_names_its_cause(hotdeploy_server: HotDeployServer, tmp_path: Path) -> None:
    broken = write_package(tmp_path / "sources", "greeter", "1.0", app="raise ImportError('nope')\n")
    with pytest.raises(AdminProblem) as refused:
        hotdeploy_server.deploy(broken)
    assert "ImportError" in str(refused.value)


class TestWithTheHostsOwnApp:
    @pytest.fixture
    def hotdeploy_host_app(self) -> Starlette:
        async def home(request: object) -> PlainTextResponse:
            return PlainTextResponse("the host")

        return Starlette(routes=[Route("/", home)])

    def test_packages_sit_beside_the_host_app(
        self, hotdeploy_server: HotDeployServer, tmp_path: Path
    ) -> None:
        hotdeploy_server.deploy(write_package(tmp_path / "sources", "greeter", "1.0"))
        with hotdeploy_server.client() as client:
            assert client.get("/").text == "the host"
            assert client.get("/greeter/").json()["version"] == "1.0"


def test_the_plugin_is_found_through_its_entry_point(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """A user's test file, in a fresh pytest process, with no conftest and no import of ours."""
    package = write_package(tmp_path / "sources", "greeter", "1.0", app=PLAIN_ROOT)
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            def test_mine(hotdeploy_server):
                hotdeploy_server.deploy({str(package)!r})
                with hotdeploy_server.client("greeter") as client:
                    assert client.get("/").json()["version"] == "1.0"
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
